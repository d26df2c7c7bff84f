"""The decode-engine protocol: what `LocalModel`'s decode loop asks of an engine, and the prefill plan.

One engine object serves one batch. The loop (`LocalModel._generate_batch`) calls::

    out = engine.prefill(plan, adapters)       # every prompt; out: the engine's output for each row's next token
    while rows are live:
        tokens, lps = engine.pick(out[live], temps, top_ps, gen, logprobs)
        engine.select_rows(keep)               # finished rows leave (cache, masks, positions compacted)
        out = engine.step(tokens, adapters)    # one token per row

``adapters`` is the `AdapterBatch` of exactly the rows in the batch (None: no adapter anywhere); the loop
narrows it with ``adapters.select(keep)`` when rows leave. ``out`` is engine-specific (logits (b, V) or
final-normed hidden states (b, d)): only the engine's own ``pick`` reads it.

`PrefillPlan` says how the prompts are prefilled; every engine executes the same plan and gives the same
keys, values and next-token distribution as a plain left-padded prefill, up to float rounding:

1. prefixes: rows grouped by a common token prefix (`plan_prefix_groups`; rows with different adapters
   share only when the adapters change no key or value, i.e. they sit on the last layer only); each
   group's prefix runs once at batch 1;
2. bodies: each row's tokens past its prefix, except the last, in buckets of similar length
   (`plan_length_buckets`);
3. last tokens: one token per row, as the first decode step.

A plan with no group and at most one bucket is ``plain``: one left-padded batch of width max(len).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from haps.models.adapters import AdapterBatch, LoraStrategy
from haps.models.prefix import PrefixGroup, plan_length_buckets, plan_prefix_groups

EngineKind = Literal["auto", "lean", "hf"]


class DecodeOptions(BaseModel):
    """How `LocalModel` decodes (none of these change results beyond float rounding)."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineKind = Field(default="auto", description="`auto`: the lean static-cache engine for the families "
                               "it knows (`LeanDecode.supports`), else the transformers forward; `lean`; `hf`: "
                               "always the transformers forward (the reference).")
    share_prefix: bool = Field(default=True, description="Prefill a prefix shared by rows of a batch once.")
    min_shared_prefix: int = Field(default=16, ge=1, description="Rows share only prefixes of at least this many "
                                   "tokens.")
    bucket_overhead_tokens: int = Field(default=64, ge=0, description="One more prefill bucket (one more forward "
                                        "call) is worth this many padded tokens saved.")
    lora_strategy: LoraStrategy = Field(default="bmm", description="`bmm`: batched adapter matmuls; `row_loop`: "
                                        "each row with its merged weight (benchmark baseline).")


@dataclass(frozen=True)
class PrefillPlan:
    """How b prompts ``seqs`` are prefilled (see the module docstring). ``covered[r]``: the prefix length of
    row r's group (0: none); ``buckets``: row indices whose bodies ``seqs[r][covered[r]:-1]`` run together."""

    seqs: list[list[int]]
    groups: list[PrefixGroup]
    covered: list[int]
    buckets: list[list[int]]

    @property
    def plain(self) -> bool:
        return not self.groups and len(self.buckets) <= 1

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.seqs]

    def body(self, r: int) -> int:
        """Tokens of row r prefilled in its bucket: all but its prefix and its last token."""
        return len(self.seqs[r]) - 1 - self.covered[r]

    @property
    def prefill_tokens(self) -> int:
        """Token positions the plan computes (padding included; the last tokens once each)."""
        b = len(self.seqs)
        if self.plain:
            return b * max(self.lengths)
        return (sum(g.length for g in self.groups)
                + sum(len(rows) * max(self.body(r) for r in rows) for rows in self.buckets) + b)

    def stats(self) -> dict:
        return {"prompt_len": max(self.lengths), "prefill_tokens": self.prefill_tokens,
                "prefix_groups": len(self.groups), "buckets": max(1, len(self.buckets))}


def plan_prefill(seqs: Sequence[Sequence[int]], options: DecodeOptions,
                 adapters: AdapterBatch | None = None, adapters_change_kv: bool = True) -> PrefillPlan:
    """The prefill plan of ``seqs`` (b non-empty token lists). Rows with different adapter slots share a prefix
    only when the adapters change no key or value (``adapters_change_kv`` False, see
    `haps.models.lora.changes_keys_values`): then the prefix runs with its first row's adapter, which reaches
    only the prefix's own outputs past the keys/values, and those are never read."""
    seqs = [list(s) for s in seqs]
    b = len(seqs)
    plain = PrefillPlan(seqs, [], [0] * b, [])
    if not options.share_prefix or b == 1 or max(len(s) for s in seqs) == 1:
        return plain
    keys = adapters.slot.tolist() if adapters is not None and adapters_change_kv else None
    groups = [g for g in plan_prefix_groups(seqs, keys, min_prefix=options.min_shared_prefix) if g.length > 0]
    covered = [0] * b
    for g in groups:
        for r in g.rows:
            covered[r] = g.length
    buckets = plan_length_buckets([len(s) - 1 - c for s, c in zip(seqs, covered, strict=True)],
                                  options.bucket_overhead_tokens)
    plan = PrefillPlan(seqs, groups, covered, buckets)
    return plain if plan.plain else plan


class DecodeEngine(Protocol):
    """One batch's decode state (see the module docstring). Capabilities are class attributes, never probed."""

    #: finished rows leave cheaply: `select_rows` moves only the rows that fill holes (else it copies the cache,
    #: and the loop compacts only once an eighth of the batch is idle)
    compacts_in_place: ClassVar[bool]
    #: a group's prompt prefix is stored once and attended in two parts (else copied into every row)
    shares_prefixes: ClassVar[bool]
    #: keeps the hidden states entering ``capture_layer`` (``prompt_states`` after prefill, ``step_states``
    #: after each step); engines without it leave those empty and scoring runs the whole model
    captures_states: ClassVar[bool]
    #: shared prefixes that the last prefill copied into their rows after all (too small to pay)
    inlined_prefixes: int

    def prefill(self, plan: PrefillPlan, adapters: AdapterBatch | None) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor, adapters: AdapterBatch | None) -> torch.Tensor: ...

    def pick(self, out: torch.Tensor, temps: torch.Tensor, top_ps: torch.Tensor, gen: torch.Generator,
             logprobs: bool) -> tuple[list[int], list[float]]: ...

    def select_rows(self, keep: torch.Tensor) -> None: ...
