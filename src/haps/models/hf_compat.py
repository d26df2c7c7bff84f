"""What differs between the transformers releases haps supports."""

from __future__ import annotations

import functools
import inspect

from torch import nn


@functools.cache
def _cache_argument(cls: type) -> str:
    """The keyword a transformers forward takes its KV cache by: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (earlier releases, deprecated since)."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def with_cache(module: nn.Module, cache) -> dict:
    """``{<the module's cache keyword>: cache}`` for a transformers forward call. A PEFT wrapper passes its
    keywords through to the model it wraps, so that model's forward decides."""
    inner = module.get_base_model() if is_peft(module) else module
    return {_cache_argument(type(inner)): cache}


def is_peft(model: nn.Module) -> bool:
    """A PEFT wrapper (``PeftModel``), told apart without importing peft."""
    return hasattr(model, "peft_config")
