"""Name -> class registries (routers, workflows): one decorator factory for all of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from haps.errors import ConfigError


def class_registrar(store: dict[str, Any], kind: str) -> Callable[[str], Callable[[type], type]]:
    """``register = class_registrar(STORE, "router")``; then ``@register("name")`` on a class puts it in
    ``STORE`` under ``name`` and sets ``cls.name``. Registering a name twice with another class is an
    error naming both; re-registering the same class (a module reloaded) is allowed."""

    def register(name: str) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            if name in store and store[name] is not cls:
                raise ConfigError(f"{kind} name {name!r} is already registered by {store[name].__name__}.")
            cls.name = name
            store[name] = cls
            return cls

        return deco

    return register
