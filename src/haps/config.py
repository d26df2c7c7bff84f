"""Typed configuration (pydantic), loadable from YAML.

Every field carries a description; validation errors name the field, the rule, the value given and
the fix. Nothing here touches the network, the disk (except ``load_yaml``) or loads a model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from haps.errors import ConfigError

SourceKind = Literal["hub", "folder", "gguf_file", "gguf_package"]
Dtype = Literal["float32", "bfloat16", "float16", "auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ModelSpec(_Strict):
    """One candidate model of the pool."""

    name: str = Field(description="Short unique name used in assignments, logs and the routing prompt.")
    backend: Literal["local", "api"] = Field(
        default="local", description="`local`: transformers in this process; `api`: OpenAI-compatible HTTP."
    )
    source_kind: SourceKind = Field(
        default="hub",
        description="How `source` is read: a Hugging Face hub id, a local folder, a GGUF file, or a GGUF "
        "shipped inside an installed Python package.",
    )
    source: str = Field(
        default="",
        description="Hub id, folder, GGUF path, or (gguf_package) the import name of the package. For "
        "`api` models: the model id sent to the server.",
    )
    gguf_file: str | None = Field(
        default=None,
        description="gguf_package: file name inside the package (default: the only *.gguf there, or the "
        "package's own `assemble()` for chunked packages).",
    )
    open_weights: bool = Field(
        default=True, description="Open models may receive generated LoRA adapters; closed (API) ones never do."
    )
    price_in: float = Field(default=0.0, ge=0, description="USD per 1M input (prompt) tokens.")
    price_out: float = Field(default=0.0, ge=0, description="USD per 1M output (completion) tokens.")
    chat_template: str | None = Field(
        default=None,
        description="Jinja chat template overriding the tokenizer's (needed for base models without one).",
    )
    completion_style: bool = Field(
        default=False,
        description="Base model: workflows render completion-style prompts with a worked example and rely on "
        "stop strings rather than a chat turn structure.",
    )
    dtype: Dtype = Field(default="float32", description="Weights dtype for local models (auto: bfloat16 where "
                         "bf16 matmuls are native, else float32; haps.dtypes). fp32 keeps batched and "
                         "one-at-a-time greedy decoding equal; bf16 rounding lets them differ.")
    description: str = Field(default="", description="One line shown to the high-level router.")
    # api backend
    base_url: str | None = Field(default=None, description="api: OpenAI-compatible base URL, e.g. http://host/v1.")
    api_key_env: str | None = Field(
        default=None, description="api: name of the environment variable holding the key (never the key)."
    )
    timeout_s: float = Field(default=60.0, gt=0, description="api: per-request timeout in seconds.")
    max_retries: int = Field(default=3, ge=0, description="api: retries of the openai client (connection errors, "
                             "timeouts, 429, 5xx; exponential backoff with jitter, Retry-After honoured).")
    max_concurrency: int = Field(default=8, ge=1, description="api: requests in flight at once.")

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.backend == "api":
            if self.open_weights:
                # an API model cannot take adapters; say so instead of silently changing it
                raise ConfigError(
                    f"model {self.name!r}: backend 'api' needs open_weights: false (API models receive no "
                    "adapters). Set open_weights: false in the pool config."
                )
            if not self.base_url:
                raise ConfigError(f"model {self.name!r}: backend 'api' needs base_url (e.g. http://127.0.0.1:8000/v1).")
        elif not self.source:
            raise ConfigError(f"model {self.name!r}: backend 'local' needs a source ({self.source_kind}).")
        return self

    @property
    def weights_dtype(self) -> str:
        """``dtype`` with ``auto`` resolved for this machine's CPU, where local models load."""
        from haps.dtypes import resolve_dtype_name

        return resolve_dtype_name(self.dtype, "cpu")

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        """USD cost of one call: L_in * P_in + L_out * P_out (prices per 1M tokens)."""
        return (tokens_in * self.price_in + tokens_out * self.price_out) / 1e6


class LoraTarget(_Strict):
    """Where generated adapters are injected."""

    module_name: str = Field(default="self_attn.o_proj", description="Dotted name inside each decoder layer.")
    last_k_layers: int = Field(default=1, ge=1, description="Inject into the last k decoder layers (paper: l_k).")
    rank: int = Field(default=8, ge=1, description="LoRA rank r.")
    alpha: float = Field(default=0.01, description="Scaling of the update: y = W x + alpha * A (B x).")


class PoolConfig(_Strict):
    """The candidate models. Order matters: it defines the model ids in the routing prompt."""

    name: str = "custom"
    models: list[ModelSpec]
    lora: LoraTarget = Field(default_factory=LoraTarget)
    cache_dir: str | None = Field(
        default=None,
        description="Where converted weights are cached (default: $HAPS_CACHE or ~/.cache/haps).",
    )
    composition_prices: dict[str, float] = Field(
        default_factory=dict,
        description="USD per 1M tokens (input and output alike) of a whole episode by its composition, the sorted "
        "model names of its roles joined by '+' (e.g. gemma3-270m+smollm2-135m); when set, every token of an episode "
        "is priced by its composition instead of by each model's price_in/price_out (paper Table 4: LL 0.2, mixed "
        "0.5, QQ 0.8).",
    )

    @field_validator("models")
    @classmethod
    def _unique(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        if not models:
            raise ConfigError("pool has no models: list at least one under `models:`.")
        names = [m.name for m in models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"pool model names must be unique; repeated: {dup}. Rename them.")
        return models

    @model_validator(mode="after")
    def _prices(self) -> PoolConfig:
        names = set(self.names)
        for key, price in self.composition_prices.items():
            unknown = [m for m in key.split("+") if m not in names]
            if unknown or price < 0:
                raise ConfigError(f"composition_prices: {key!r}: " + (f"{unknown} not in the pool ({sorted(names)})"
                                  if unknown else f"a price must be >= 0, got {price}") + "; key each composition by "
                                  "its roles' model names, sorted and joined by '+'.")
        return self

    @staticmethod
    def composition(models) -> str:
        """The `composition_prices` key of an episode whose roles run ``models``."""
        return "+".join(sorted(models))

    def episode_price(self, models) -> float | None:
        """USD per 1M tokens of an episode whose roles run ``models`` (None: priced per model, no
        `composition_prices`); a composition the table lacks is a ConfigError."""
        if not self.composition_prices:
            return None
        key = self.composition(models)
        if key not in self.composition_prices:
            raise ConfigError(f"composition_prices has no price for {key!r}; add one for every composition of the "
                              f"pool's models (it has {sorted(self.composition_prices)}).")
        return float(self.composition_prices[key])

    def get(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"unknown model {name!r}; the pool has: {[m.name for m in self.models]}.")

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]


def cache_root(pool: PoolConfig | None = None) -> Path:
    """Root folder for converted weights, embeddings and other derived files."""
    if pool is not None and pool.cache_dir:
        return Path(pool.cache_dir).expanduser()
    env = os.environ.get("HAPS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "haps"


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing YAML file.")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{where}: not valid YAML ({what}); fix the file.") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at top level, got {type(data).__name__}.")
    return data


def validation_message(e: ValidationError) -> str:
    """A pydantic ValidationError as one line: ``field.sub: what is wrong (got value); ...``."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "value"
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        got = f" (got {err['input']!r})" if "input" in err and err.get("type") != "missing" else ""
        if len(got) > 80:
            got = got[:77] + "...)"
        parts.append(f"{loc}: {msg}{got}")
    return "; ".join(parts).replace("\n", " ")


def load_pool(name_or_path: str) -> PoolConfig:
    """A built-in pool by name (``tiny``: `haps.pools`) or a pool YAML file."""
    from haps.pools import builtin_pool_file, builtin_pool_names

    builtin = builtin_pool_file(name_or_path)
    if builtin is not None:
        return PoolConfig.model_validate(load_yaml(builtin))
    if not Path(name_or_path).is_file():
        raise ConfigError(
            f"unknown pool {name_or_path!r}: the built-in pools are {builtin_pool_names()}; a pool YAML file works "
            "too (give its path, e.g. examples/pool_mixed.yaml)."
        )
    try:
        return PoolConfig.model_validate(load_yaml(name_or_path))
    except ValidationError as e:
        raise ConfigError(f"pool file {name_or_path!r} is invalid: {validation_message(e)}. Fix the file (see "
                          "examples/pool_mixed.yaml).") from e
