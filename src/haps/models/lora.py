"""Per-request LoRA: every batch row carries its own low-rank update of a frozen linear layer.

Vocabulary (as in multi-adapter servers): *shrink* projects the input to rank r with B, *expand* maps
it back with A. For a frozen ``W: (d_out, d_in)`` and row i's adapter ``A_i: (d_out, r)``,
``B_i: (r, d_in)``::

    Semantics (the slow, obviously-correct loop that `reference_lora_forward` runs):
        for i in range(b):
            y[i] = x[i] @ (W + alpha * A_i @ B_i).T

    Fast path (two batched matmuls, no loop over rows):
        y = x @ W.T + alpha * bmm(bmm(x, B^T), A^T)      # x: (b, T, d_in) -> y: (b, T, d_out)

Rows without an adapter get A_i = 0, so their output is exactly ``x @ W.T`` (adding 0.0 changes no
float). The wrapper never patches a library class: it replaces the target submodule by a module that
holds the original as ``base_layer`` and calls it (PEFT's pattern), and `detach_lora` puts it back.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from haps.config import LoraTarget
from haps.errors import ConfigError, ShapeError
from haps.models.types import RowAdapter


class PerRequestLoRALinear(nn.Module):
    """Wraps a frozen ``nn.Linear``; applies the current batch's per-row adapters, if any are set."""

    def __init__(self, base_layer: nn.Linear, alpha: float) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ConfigError(f"LoRA target must be nn.Linear, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.alpha = alpha
        self.A: torch.Tensor | None = None  # (b, d_out, r)
        self.B: torch.Tensor | None = None  # (b, r, d_in)
        # The naive strategy, kept as a benchmark baseline: one row at a time with that row's merged weight
        # W + alpha * A_i @ B_i (what `reference_lora_forward` does). Off: two batched matmuls for all rows.
        self.row_loop = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def set_adapters(self, A: torch.Tensor | None, B: torch.Tensor | None) -> None:
        if A is None or B is None:
            self.A = self.B = None
            return
        d_out, d_in = self.out_features, self.in_features
        if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[2] != B.shape[1]:
            raise ShapeError(
                f"adapters must be A: (b, {d_out}, r) and B: (b, r, {d_in}); got A {tuple(A.shape)}, B {tuple(B.shape)}."
            )
        if A.shape[1] != d_out or B.shape[2] != d_in:
            raise ShapeError(
                f"adapter does not fit this layer ({d_in} -> {d_out}): expected A (b, {d_out}, r) and "
                f"B (b, r, {d_in}), got A {tuple(A.shape)}, B {tuple(B.shape)}."
            )
        self.A, self.B = A, B

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (b, T, d_in) -> (b, T, d_out)
        if self.A is not None and self.row_loop:
            self._check_rows(x)
            W, bias = self.base_layer.weight, self.base_layer.bias
            return torch.stack([nn.functional.linear(x[i], W + self.alpha * (self.A[i] @ self.B[i]).to(W.dtype), bias)
                                for i in range(x.shape[0])])
        y = self.base_layer(x)  # (b, T, d_out)
        return y if self.A is None else y + self.delta(x)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapters' term alpha * A_i (B_i x) of every row: x (b, T, d_in) -> (b, T, d_out); needs adapters set."""
        self._check_rows(x)
        B_t = self.B.to(x.dtype).transpose(1, 2)  # (b, d_in, r)
        A_t = self.A.to(x.dtype).transpose(1, 2)  # (b, r, d_out)
        shrink = torch.bmm(x, B_t)  # (b, T, r)
        return self.alpha * torch.bmm(shrink, A_t)  # (b, T, d_out)

    def _check_rows(self, x: torch.Tensor) -> None:
        if x.shape[0] != self.A.shape[0]:
            raise ShapeError(
                f"batch has {x.shape[0]} rows but adapters were set for {self.A.shape[0]} rows; "
                "set one adapter row (zeros for none) per batch row."
            )


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a HF causal LM (``model.model.layers`` for Llama/Gemma/Qwen/Mistral ...)."""
    base = getattr(model, "base_model", model)
    for cand in (getattr(base, "layers", None), getattr(getattr(base, "model", None), "layers", None),
                 getattr(getattr(base, "decoder", None), "layers", None), getattr(base, "h", None)):
        if isinstance(cand, nn.ModuleList):
            return cand
    raise ConfigError(
        f"cannot find the decoder layers of {type(model).__name__}: expected a ModuleList at "
        "`model.layers`, `model.decoder.layers` or `transformer.h`."
    )


def _get_submodule(layer: nn.Module, dotted: str) -> tuple[nn.Module, str, nn.Module]:
    parent = layer
    parts = dotted.split(".")
    for p in parts[:-1]:
        if not hasattr(parent, p):
            raise ConfigError(f"decoder layer {type(layer).__name__} has no submodule {dotted!r} (missing {p!r}).")
        parent = getattr(parent, p)
    if not hasattr(parent, parts[-1]):
        raise ConfigError(
            f"decoder layer {type(layer).__name__} has no submodule {dotted!r}; "
            f"children of {type(parent).__name__}: {[n for n, _ in parent.named_children()]}."
        )
    return parent, parts[-1], getattr(parent, parts[-1])


class LoRAInjector:
    """Owns the wrappers on the last k layers of one model and sets per-batch adapters on them."""

    def __init__(self, model: nn.Module, target: LoraTarget) -> None:
        layers = _decoder_layers(model)
        if target.last_k_layers > len(layers):
            raise ConfigError(
                f"last_k_layers={target.last_k_layers} but the model has only {len(layers)} decoder layers."
            )
        self.target = target
        self.wrappers: list[PerRequestLoRALinear] = []
        for layer in layers[len(layers) - target.last_k_layers:]:
            parent, name, mod = _get_submodule(layer, target.module_name)
            if not isinstance(mod, PerRequestLoRALinear):
                mod = PerRequestLoRALinear(mod, target.alpha)
                setattr(parent, name, mod)
            else:
                mod.alpha = target.alpha
            self.wrappers.append(mod)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(d_out, d_in) of each wrapped projection, last-k order."""
        return [(w.out_features, w.in_features) for w in self.wrappers]

    def stack(self, adapters: Sequence[RowAdapter | None], device=None, dtype=None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Stack per-row adapters into per-layer (A: (b, d_out, r), B: (b, r, d_in)); zeros for None rows.

        Returns None when no row has an adapter (the base path then runs untouched).
        """
        if all(a is None for a in adapters):
            return None
        first = next(a for a in adapters if a is not None)
        r = first.A[0].shape[-1]
        out = []
        for li, (d_out, d_in) in enumerate(self.shapes):
            As, Bs = [], []
            for row, a in enumerate(adapters):
                if a is None:
                    As.append(None)
                    Bs.append(None)
                    continue
                if len(a.A) != len(self.wrappers):
                    raise ShapeError(
                        f"row {row}: adapter has {len(a.A)} layers, the model is injected at {len(self.wrappers)} "
                        f"(last_k_layers={self.target.last_k_layers})."
                    )
                A, B = a.A[li], a.B[li]
                if tuple(A.shape) != (d_out, r) or tuple(B.shape) != (r, d_in):
                    raise ShapeError(
                        f"row {row}, layer {li}: expected A ({d_out}, {r}) and B ({r}, {d_in}), "
                        f"got A {tuple(A.shape)} and B {tuple(B.shape)}."
                    )
                As.append(A)
                Bs.append(B)
            ref = first.A[li]
            dev = device or ref.device
            dt = dtype or ref.dtype
            zA = torch.zeros(d_out, r, device=dev, dtype=dt)
            zB = torch.zeros(r, d_in, device=dev, dtype=dt)
            A_b = torch.stack([zA if A is None else A.to(dev, dt) for A in As])  # (b, d_out, r)
            B_b = torch.stack([zB if B is None else B.to(dev, dt) for B in Bs])  # (b, r, d_in)
            out.append((A_b, B_b))
        return out

    def set(self, stacked: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        for i, w in enumerate(self.wrappers):
            if stacked is None:
                w.set_adapters(None, None)
            else:
                w.set_adapters(*stacked[i])

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the given batch rows (used when finished rows leave the decode batch)."""
        for w in self.wrappers:
            if w.A is not None:
                w.A = w.A.index_select(0, index)
                w.B = w.B.index_select(0, index)

    @contextmanager
    def active(self, adapters: Sequence[RowAdapter | None], device=None, dtype=None) -> Iterator[None]:
        self.set(self.stack(adapters, device, dtype))
        try:
            yield
        finally:
            self.set(None)


def detach_lora(model: nn.Module) -> int:
    """Replace every PerRequestLoRALinear in ``model`` by its base layer; returns how many were removed."""
    n = 0
    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PerRequestLoRALinear):
                setattr(parent, name, child.base_layer)
                n += 1
    return n


@torch.no_grad()
def merged_weight(base: nn.Linear, A: torch.Tensor, B: torch.Tensor, alpha: float) -> torch.Tensor:
    """W + alpha * A @ B, shape (d_out, d_in): the per-row weight the fast path must reproduce."""
    return base.weight + alpha * (A.to(base.weight.dtype) @ B.to(base.weight.dtype))


def reference_lora_forward(x: torch.Tensor, base: nn.Linear, A: torch.Tensor | None, B: torch.Tensor | None,
                           alpha: float) -> torch.Tensor:
    """Slow twin of `PerRequestLoRALinear.forward`: one row at a time with a merged weight.

    x: (b, T, d_in); A: (b, d_out, r) or None; B: (b, r, d_in) or None -> (b, T, d_out).
    """
    rows = []
    for i in range(x.shape[0]):
        W = base.weight if A is None else base.weight + alpha * (A[i] @ B[i])
        y = x[i] @ W.T
        if base.bias is not None:
            y = y + base.bias
        rows.append(y)
    return torch.stack(rows)
