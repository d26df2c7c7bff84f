"""Every router by name: the registry of `haps.routing.base` (``ROUTERS``) filled with the built-in routers.

The built-in routers live in their own modules and register on import: `fixed` and `random`
(`haps.routing.base`), the high-level router (`haps.routing.high_level`: torch + transformers) and the
baselines (`haps.baselines`; torch_geometric is imported only when a GraphRouter is built). This module sits
above both packages, so neither imports the other to fill the registry.
"""

from __future__ import annotations

from haps.errors import ConfigError
from haps.routing.base import ROUTERS, Router
from haps.routing.space import AssignmentSpace


def load_builtin_routers() -> None:
    """Import the modules of the built-in routers (importing one registers it)."""
    import haps.baselines.graphrouter  # noqa: F401
    import haps.baselines.irt  # noqa: F401
    import haps.baselines.knn  # noqa: F401
    import haps.baselines.routellm_clf  # noqa: F401
    import haps.baselines.routellm_mf  # noqa: F401
    import haps.baselines.static  # noqa: F401
    import haps.routing.high_level  # noqa: F401


def get_router(spec: str, *, space: AssignmentSpace, **kwargs) -> Router:
    """Build a router from ``name`` or ``name:argument`` (e.g. ``fixed:0,1``, ``random``)."""
    load_builtin_routers()
    name, _, arg = spec.partition(":")
    if name not in ROUTERS:
        raise ConfigError(f"unknown router {name!r}; known routers: {sorted(ROUTERS)}.")
    return ROUTERS[name].from_spec(arg, space=space, **kwargs)
