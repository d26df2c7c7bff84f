"""The model pool: builds each model's backend from its spec, once per process, and accounts cost.

Backends are registered by name (`local`, `api`); `ModelPool.generate` sends a list of requests for
one model to its backend and returns one Generation per request, each priced from the pool.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from haps.config import ModelSpec, PoolConfig, cache_root
from haps.errors import ConfigError
from haps.models.types import Generation, GenRequest


class Backend(Protocol):
    spec: ModelSpec

    def generate(self, requests: Sequence[GenRequest], target=None, seed: int | None = None) -> list[Generation]:
        ...


BACKENDS: dict[str, Callable[[ModelSpec, Path], Backend]] = {}


def register_backend(name: str):
    def deco(factory):
        BACKENDS[name] = factory
        return factory

    return deco


@register_backend("local")
def _local(spec: ModelSpec, cache: Path) -> Backend:
    from haps.models.local import LocalModel

    return LocalModel.load(spec, cache)


@register_backend("api")
def _api(spec: ModelSpec, cache: Path) -> Backend:
    from haps.models.api import ApiModel

    return ApiModel(spec)


# Loaded local models, shared across pools in this process: loading the same weights twice reuses them.
_LOADED: dict[tuple, Backend] = {}


def _key(spec: ModelSpec, cache: Path) -> tuple:
    return (spec.backend, spec.source_kind, spec.source, spec.gguf_file, spec.weights_dtype, spec.chat_template,
            spec.base_url, str(cache))


class ModelPool:
    """Lazily loaded backends for the models of a PoolConfig."""

    def __init__(self, config: PoolConfig, backends: Mapping[str, Backend] | None = None) -> None:
        """``backends``: already-built backends by model name (e.g. a LocalModel made in a test); they
        are used as they are instead of being loaded from the spec. Each name must be in ``config``."""
        self.config = config
        self.cache = cache_root(config)
        self._given: dict[str, Backend] = {}
        for name, be in (backends or {}).items():
            self.config.get(name)  # raises ConfigError naming the pool's models
            self._given[name] = be

    @property
    def names(self) -> list[str]:
        return self.config.names

    def spec(self, name: str) -> ModelSpec:
        return self.config.get(name)

    def backend(self, name: str) -> Backend:
        spec = self.spec(name)
        if name in self._given:
            return self._given[name]
        if spec.backend not in BACKENDS:
            raise ConfigError(f"model {name!r}: unknown backend {spec.backend!r}; known: {sorted(BACKENDS)}.")
        key = _key(spec, self.cache)
        if key not in _LOADED:
            _LOADED[key] = BACKENDS[spec.backend](spec, self.cache)
        be = _LOADED[key]
        be.spec = spec  # prices or names may differ between pools sharing the weights
        return be

    def generate(self, name: str, requests: Sequence[GenRequest], seed: int | None = None) -> list[Generation]:
        """One batched call to model ``name``; closed models never receive adapters."""
        spec = self.spec(name)
        if not spec.open_weights and any(r.adapter is not None for r in requests):
            raise ConfigError(f"model {name!r} is closed (API): requests for it must carry no adapter.")
        target = self.config.lora if any(r.adapter is not None for r in requests) else None
        return self.backend(name).generate(requests, target=target, seed=seed)
