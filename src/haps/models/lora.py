"""Per-request LoRA on a frozen model: wrappers on the target linear layers that apply the batch's adapters.

`inject` replaces each target submodule (e.g. ``self_attn.o_proj`` of the last k decoder layers) by a
`PerRequestLoRALinear` that holds the original as ``base_layer`` and calls it (PEFT's pattern: no
library class is patched); `detach_lora` puts the originals back. Wrapping is idempotent and only ever
adds wrappers, so targets of different depths can share one model. A wrapper holds no adapters: each
call brings its `haps.models.adapters.AdapterBatch` (explicitly from our layer steps, or through
`adapters_in_scope` for transformers forwards), and a wrapper whose layer the batch does not cover is the
base layer.

Semantics (the slow, obviously-correct loop that `reference_lora_forward` runs)::

    for i in range(b):
        y[i] = x[i] @ (W + alpha * A_i @ B_i).T        # A_i = B_i = 0 for rows without an adapter

Fast path (two batched matmuls, no loop over rows, `haps.models.adapters.lora_delta`)::

    y = x @ W.T + alpha * bmm(bmm(x, B^T), A^T)      # x: (b, T, d_in) -> y: (b, T, d_out)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from haps.config import LoraTarget
from haps.errors import ConfigError
from haps.models.adapters import AdapterBatch, lora_delta, scoped_adapters

# Projections that act after their layer's keys/values are made (queries, attention output, MLP): adapters
# on these in the last layer leave every key and value unchanged (`changes_keys_values`).
AFTER_KEYS_VALUES = frozenset({"q_proj", "o_proj", "out_proj", "c_proj", "gate_proj", "up_proj", "down_proj",
                               "fc1", "fc2"})


class PerRequestLoRALinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` of decoder layer ``layer_idx``; adds the call's per-row adapters."""

    def __init__(self, base_layer: nn.Linear, layer_idx: int) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ConfigError(f"LoRA target must be nn.Linear, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.layer_idx = layer_idx

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def weights_of(self, adapters: AdapterBatch | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This layer's per-row (A (b, d_out, r), B (b, r, d_in)) in ``adapters``, or None."""
        w = None if adapters is None else adapters.row_weights(self.layer_idx)
        if w is not None and (w[0].shape[1] != self.out_features or w[1].shape[2] != self.in_features):
            from haps.errors import ShapeError

            raise ShapeError(f"layer {self.layer_idx}: the adapters do not fit this projection ({self.in_features} -> "
                             f"{self.out_features}): expected A (s, {self.out_features}, r) and B (s, r, "
                             f"{self.in_features}), got A {tuple(w[0].shape)} and B {tuple(w[1].shape)}.")
        return w

    def forward(self, x: torch.Tensor, adapters: AdapterBatch | None = None) -> torch.Tensor:
        """x: (b, T, d_in) -> (b, T, d_out); ``adapters`` default to the scoped batch (`adapters_in_scope`)."""
        batch = adapters if adapters is not None else scoped_adapters()
        w = self.weights_of(batch)
        if w is None:
            return self.base_layer(x)
        if batch.strategy == "row_loop":
            return reference_lora_forward(x, self.base_layer, *w, batch.alpha)
        return self.base_layer(x) + lora_delta(x, *w, batch.alpha)


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


@dataclass(frozen=True)
class LoraSites:
    """Where a target's adapters go: absolute decoder-layer indices and each projection's (d_out, d_in)."""

    layers: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]


def _targets(model: nn.Module, target: LoraTarget):
    layers = _decoder_layers(model)
    if target.last_k_layers > len(layers):
        raise ConfigError(f"last_k_layers={target.last_k_layers} but the model has only {len(layers)} decoder layers.")
    for idx in range(len(layers) - target.last_k_layers, len(layers)):
        yield idx, _get_submodule(layers[idx], target.module_name)


def lora_sites(model: nn.Module, target: LoraTarget) -> LoraSites:
    """The sites of ``target`` in ``model``, read without wrapping anything."""
    idx, shapes = [], []
    for i, (_, _, mod) in _targets(model, target):
        lin = mod.base_layer if isinstance(mod, PerRequestLoRALinear) else mod
        if not isinstance(lin, nn.Linear):
            raise ConfigError(f"LoRA target {target.module_name!r} of layer {i} must be nn.Linear, got "
                              f"{type(lin).__name__}; set lora.module_name to a linear layer.")
        idx.append(i)
        shapes.append((lin.out_features, lin.in_features))
    return LoraSites(tuple(idx), tuple(shapes))


def changes_keys_values(target: LoraTarget) -> bool:
    """Whether adapters at ``target`` can change any layer's keys/values.

    Layer j's keys and values are projections of the residual stream entering layer j, which only layers
    below j shape. So adapters on the last layer alone (paper default l_k = 1), on a module that acts after
    that layer's keys/values are made (`AFTER_KEYS_VALUES`), leave every key and value as they are without
    adapters. Anything else (more layers, or a module not known to be one of those) counts as changing them."""
    return target.last_k_layers > 1 or target.module_name.rsplit(".", 1)[-1] not in AFTER_KEYS_VALUES


def inject(model: nn.Module, target: LoraTarget) -> LoraSites:
    """Wrap every site of ``target`` in a `PerRequestLoRALinear` (sites already wrapped are kept)."""
    sites = lora_sites(model, target)
    for i, (parent, name, mod) in _targets(model, target):
        if not isinstance(mod, PerRequestLoRALinear):
            setattr(parent, name, PerRequestLoRALinear(mod, i))
    return sites


def wrappers(model: nn.Module) -> list[PerRequestLoRALinear]:
    """Every wrapper in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, PerRequestLoRALinear)]


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
    """Slow twin of the fast path: one row at a time with a merged weight.

    x: (b, T, d_in); A: (b, d_out, r) or None; B: (b, r, d_in) or None -> (b, T, d_out).
    """
    rows = []
    for i in range(x.shape[0]):
        W = base.weight if A is None else base.weight + alpha * (A[i] @ B[i]).to(base.weight.dtype)
        rows.append(nn.functional.linear(x[i], W, base.bias))
    return torch.stack(rows)
