"""The per-request LoRA adapters of one batch (`AdapterBatch`), handed down with every call.

A batch of b rows uses s distinct adapters ("slots", as multi-LoRA servers such as Punica, S-LoRA and
vLLM call them); ``slot[i]`` is row i's adapter, -1 for none. For each target layer (an absolute decoder
layer index in ``layers``) the slots are stacked::

    A[l]: (s, d_out, r)    B[l]: (s, r, d_in)    slot: (b,) in [-1, s)

Semantics (what `lora_delta` and the wrappers compute; `reference_lora_forward` is the loop)::

    for i in range(b):
        W_i = W if slot[i] == -1 else W + alpha * A[l][slot[i]] @ B[l][slot[i]]
        y[i] = x[i] @ W_i.T            # shrink = x B^T (b, T, r); expand = shrink A^T (b, T, d_out)

Rows without an adapter get zero matrices, so their output is exactly ``x @ W.T``. The update is
``alpha * A @ B`` with a plain multiplier (paper Eq. 7), not PEFT's ``lora_alpha / r``.

Naming: haps' A (d_out, r) is PEFT's ``lora_B.weight``; haps' B (r, d_in) is PEFT's ``lora_A.weight``.

How the batch reaches the wrappers: our own layer steps (`haps.models.layer_step`) pass it as an
argument; forwards we do not own (the transformers decoder in `HFDecode` and `LocalModel.score`) run
inside `adapters_in_scope(batch)`, a context variable private to the calling thread (and asyncio task).
Nothing is stored on the modules, so two threads may run one model with different adapters at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal

import torch

from haps.errors import ShapeError
from haps.models.types import RowAdapter

# "bmm": two batched matmuls for all rows (the fast path); "row_loop": each row with its merged weight
# W + alpha * A_i @ B_i (the naive strategy, kept as a benchmark baseline and as the reference).
LoraStrategy = Literal["bmm", "row_loop"]


@dataclass(frozen=True, eq=False)
class AdapterBatch:
    """Stacked adapters of one batch (see the module docstring for shapes and semantics)."""

    layers: tuple[int, ...]
    A: tuple[torch.Tensor, ...]
    B: tuple[torch.Tensor, ...]
    slot: torch.Tensor
    alpha: float
    strategy: LoraStrategy = "bmm"
    _rows: dict = field(default_factory=dict, init=False, repr=False)  # layer -> per-row (A, B), built once

    def __post_init__(self) -> None:
        if not (len(self.layers) == len(self.A) == len(self.B)) or not self.layers:
            raise ShapeError(f"AdapterBatch needs one A and one B per target layer: {len(self.layers)} layers, "
                             f"{len(self.A)} A, {len(self.B)} B.")
        s = self.A[0].shape[0]
        for li, (A, B) in zip(self.layers, zip(self.A, self.B, strict=True), strict=True):
            if A.dim() != 3 or B.dim() != 3 or A.shape[0] != s or B.shape[0] != s or A.shape[2] != B.shape[1]:
                raise ShapeError(f"layer {li}: adapters must be A (s, d_out, r) and B (s, r, d_in) with the same s "
                                 f"and r, got A {tuple(A.shape)} and B {tuple(B.shape)}.")
        if self.slot.dim() != 1 or (self.slot.numel() and (int(self.slot.min()) < -1 or int(self.slot.max()) >= s)):
            raise ShapeError(f"slot must be a (b,) index in [-1, {s}), got {self.slot.tolist()}.")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_rows(cls, adapters: Sequence[RowAdapter | None], layers: Sequence[int],
                  shapes: Sequence[tuple[int, int]], alpha: float, rank: int, *, device=None, dtype=None,
                  strategy: LoraStrategy = "bmm") -> AdapterBatch | None:
        """Stack one `RowAdapter` (or None) per row; None when no row has one.

        ``shapes``: (d_out, d_in) of each target layer. Rows holding the same `RowAdapter` object share a
        slot (one copy, and one gradient path when it carries gradients). Every adapter must have one
        (A, B) per target layer, of rank ``rank`` (the target's ``LoraTarget.rank``).
        """
        slots: dict[int, int] = {}
        uniq: list[RowAdapter] = []
        index = []
        for row, a in enumerate(adapters):
            if a is None:
                index.append(-1)
                continue
            if id(a) not in slots:
                _check_row(row, a, shapes, rank)
                slots[id(a)] = len(uniq)
                uniq.append(a)
            index.append(slots[id(a)])
        if not uniq:
            return None
        ref = uniq[0].A[0]
        dev, dt = device or ref.device, dtype or ref.dtype
        A = tuple(torch.stack([a.A[li].to(dev, dt) for a in uniq]) for li in range(len(shapes)))  # (s, d_out, r)
        B = tuple(torch.stack([a.B[li].to(dev, dt) for a in uniq]) for li in range(len(shapes)))  # (s, r, d_in)
        return cls(tuple(layers), A, B, torch.tensor(index, dtype=torch.long, device=dev), alpha, strategy)

    # ------------------------------------------------------------------ views
    @property
    def rows(self) -> int:
        return self.slot.numel()

    @property
    def rank(self) -> int:
        return self.A[0].shape[2]

    def select(self, rows: torch.Tensor | Sequence[int]) -> AdapterBatch:
        """The same slots for the given rows (a sub-batch, or the rows that stay after compaction)."""
        idx = rows if isinstance(rows, torch.Tensor) else torch.tensor(list(rows), dtype=torch.long)
        return AdapterBatch(self.layers, self.A, self.B, self.slot.index_select(0, idx.to(self.slot.device)),
                            self.alpha, self.strategy)

    def row_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-row (A (b, d_out, r), B (b, r, d_in)) of decoder layer ``layer`` (zeros for rows without an
        adapter), or None when the batch has no adapter there."""
        if layer not in self.layers:
            return None
        if layer not in self._rows:
            j = self.layers.index(layer)
            A, B = self.A[j], self.B[j]
            zero_A, zero_B = A.new_zeros((1, *A.shape[1:])), B.new_zeros((1, *B.shape[1:]))
            idx = torch.where(self.slot < 0, A.shape[0], self.slot)  # -1 -> the appended zero slot
            self._rows[layer] = (torch.cat([A, zero_A]).index_select(0, idx),
                                 torch.cat([B, zero_B]).index_select(0, idx))
        return self._rows[layer]


def _check_row(row: int, a: RowAdapter, shapes: Sequence[tuple[int, int]], rank: int) -> None:
    if len(a.A) != len(shapes):
        raise ShapeError(f"row {row}: the adapter has {len(a.A)} layers; the target injects {len(shapes)} "
                         "(LoraTarget.last_k_layers): generate adapters for that target.")
    for li, ((d_out, d_in), A, B) in enumerate(zip(shapes, a.A, a.B, strict=True)):
        if tuple(A.shape) != (d_out, rank) or tuple(B.shape) != (rank, d_in):
            raise ShapeError(f"row {row}, layer {li}: expected A ({d_out}, {rank}) and B ({rank}, {d_in}) "
                             f"(LoraTarget.rank={rank}), got A {tuple(A.shape)} and B {tuple(B.shape)}.")


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * A_i (B_i x_i) for every row: x (b, T, d_in), A (b, d_out, r), B (b, r, d_in) -> (b, T, d_out)."""
    if x.shape[0] != A.shape[0]:
        raise ShapeError(f"the batch has {x.shape[0]} rows but its adapters {A.shape[0]}: pass the AdapterBatch "
                         "of exactly these rows (AdapterBatch.select).")
    shrink = torch.bmm(x, B.to(x.dtype).transpose(1, 2))  # (b, T, r)
    return alpha * torch.bmm(shrink, A.to(x.dtype).transpose(1, 2))  # (b, T, d_out)


# ---------------------------------------------------------------------- scope for forwards we do not own
_CURRENT: ContextVar[AdapterBatch | None] = ContextVar("haps_adapter_batch", default=None)


@contextmanager
def adapters_in_scope(batch: AdapterBatch | None) -> Iterator[None]:
    """Run a transformers forward with ``batch`` as its adapters (this thread / task only)."""
    token = _CURRENT.set(batch)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def scoped_adapters() -> AdapterBatch | None:
    """The batch of the innermost `adapters_in_scope` of this thread / task (None outside)."""
    return _CURRENT.get()
