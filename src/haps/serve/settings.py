"""`ServeSettings`: batching, limits and routing of one server (light: the CLI imports it at start)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from haps.dtypes import DtypeName
from haps.errors import ConfigError


class ServeSettings(BaseModel):
    """Batching, limits and routing of one server (`haps serve` options of the same names)."""

    model_config = ConfigDict(extra="forbid")

    routing: bool = Field(default=True, description="Serve `haps` and `haps/<workflow>` (needs a pool).")
    batching: bool = Field(default=True, description="Dynamic batching across requests; off: every request is its "
                           "own router pass and generate call.")
    batch_window_ms: float = Field(default=5.0, ge=0, le=10_000, description="How long a batch's first request "
                                   "waits for companions, ms.")
    max_batch_size: int = Field(default=32, ge=1, description="Most rows per generate call of a local model.")
    router_batch_size: int = Field(default=32, ge=1, description="Most requests per router batch.")
    router_dtype: DtypeName = Field(default="auto", description="The router backbone's dtype (auto: bf16 where bf16 "
                                    "matmuls are native: AMX/AVX512-BF16 CPUs, bf16 GPUs; else fp32).")
    default_max_tokens: int = Field(default=256, ge=1, description="max_tokens of requests that give none.")
    max_tokens_limit: int = Field(default=4096, ge=1, description="The most tokens a request may ask for.")
    max_prompt_tokens: int = Field(default=4096, ge=1, description="The most prompt tokens a request may have.")
    max_messages: int = Field(default=64, ge=1, description="The most messages a request may have.")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="The largest request body, bytes.")
    workflows: list[str] = Field(default_factory=lambda: ["mmlu", "hotpotqa"],
                                 description="Workflows served as haps/<name> (names, plugins or file.py:Class).")
    workflow_options: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                        description="Options per served workflow.")
    default_workflow: str | None = Field(default=None, description="Routing prompt of `haps` requests (None: the "
                                         "router's task, else the first served workflow).")
    answer_role: str | None = Field(default=None, description="Role whose model answers `haps` requests (None: "
                                    "the workflow's last role).")
    call_overhead_tokens: int | None = Field(default=None, ge=0, description="Cost model: prompt tokens a workflow "
                                             "call adds to the problem's (None: per workflow, haps.api.call_overhead).")
    seed: int = Field(default=0, description="Seed of fresh adapter heads (no --router).")

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ConfigError(f"default_max_tokens ({self.default_max_tokens}) must be <= max_tokens_limit "
                              f"({self.max_tokens_limit}).")
        return self
