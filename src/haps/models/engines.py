"""Choosing the decode engine of a batch (the implementations of `haps.models.engine.DecodeEngine`)."""

from __future__ import annotations

import torch

from haps.errors import ConfigError
from haps.models.decode import LeanDecode
from haps.models.engine import DecodeEngine, EngineKind
from haps.models.hf_decode import HFDecode


def make_engine(model: torch.nn.Module, kind: EngineKind, max_new_tokens: int, pad_id: int = 0,
                capture_layer: int | None = None) -> DecodeEngine:
    """The engine for one batch of ``model`` generating at most ``max_new_tokens`` per row: `LeanDecode` where
    it applies (``auto``) or is asked for, else `HFDecode`. ``pad_id`` fills padded positions;
    ``capture_layer``: keep the states entering that layer (engines that can)."""
    if kind == "hf" or (kind == "auto" and not LeanDecode.supports(model)):
        return HFDecode(model, pad_id)
    if not LeanDecode.supports(model):
        raise ConfigError(f"decode engine 'lean' does not support this {model.config.model_type!r} model (its "
                          "family, attention implementation or a layer feature such as attention soft-capping); "
                          "use engine 'auto' or 'hf'.")
    return LeanDecode(model, max_new_tokens, pad_id, capture_layer)
