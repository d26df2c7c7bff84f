"""haps: hierarchical routing of multi-agent LLM workflows over models and per-request LoRA parameters.

The Python API (`haps.api`) is exported lazily, so ``import haps`` loads nothing heavy:
``haps.load_router(DIR, pool=...)``, ``haps.run(problem, router=..., workflow=...)``, ``haps.HapsRouter``.
"""

__version__ = "0.1.0"

_API = ("load_router", "run", "HapsRouter", "RouteDecision", "BudgetError", "UntrainedRouterWarning")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from haps import api

        return getattr(api, name)
    raise AttributeError(f"module 'haps' has no attribute {name!r}")
