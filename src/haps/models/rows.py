"""A request's row in a decode batch: its progress, the stop-string tail, leaving the batch, and fitting its
prompt to the model's context window (the bookkeeping `haps.models.local.LocalModel` runs its loop with)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from haps.models.types import GenRequest


@dataclass
class Row:
    """One request's progress through a batch."""

    prompt_text: str
    prompt_ids: list[int]
    out_ids: list[int] = field(default_factory=list)
    out_lp: list[float] = field(default_factory=list)
    finish: str | None = None
    states: list[torch.Tensor] = field(default_factory=list)  # kept hidden states: the prompt's, then per token


def context_window(model: nn.Module) -> int | None:
    """The longest sequence (prompt + generated tokens) the model's config allows, or None if it names none."""
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if n else None


def fit_to_window(ids: list[int], req: GenRequest, window: int | None, model: str) -> tuple[list[int], str | None]:
    """``ids`` as they fit ``window`` with ``req.max_new_tokens`` to generate: unchanged, or with their middle cut
    (``req.truncation == "middle"``: the first and last tokens kept), or an error naming ``model``."""
    if window is None or len(ids) + req.max_new_tokens <= window:
        return ids, None
    room = window - req.max_new_tokens
    if req.truncation == "middle" and room >= 2:
        head = room // 2
        return ids[:head] + ids[len(ids) - (room - head):], None
    return ids, (f"model {model!r}: the prompt has {len(ids)} tokens and {req.max_new_tokens} are to "
                 f"be generated, more than its context window of {window}; shorten the prompt, ask for fewer "
                 "tokens, or set the request's truncation='middle'.")


def kept_states(req: GenRequest, row: Row, layer: int | None) -> dict:
    """Generation fields for the row's kept states: (prompt + completion - 1, d) entering ``layer``."""
    if layer is None or not req.keep_states or req.adapter is None:
        return {}
    return {"states": torch.cat(row.states), "states_layer": layer}


def stop_tail(req: GenRequest) -> int:
    """Generated tokens to decode when looking for the request's stop strings."""
    return max((len(s) for s in req.stop), default=0) + 2


def fill_holes(live: list[bool]) -> list[int]:
    """Batch rows to keep, in their new order: the m live rows in slots 0..m-1, where each finished row below m
    is replaced by a live row from the end. Every ``keep[j] >= j``, so caches can move the few replacing rows in
    place instead of copying the batch."""
    m = sum(live)
    donors = iter(j for j in range(m, len(live)) if live[j])
    return [j if live[j] else next(donors) for j in range(m)]
