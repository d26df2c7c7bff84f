"""Fit a baseline router from a ``haps collect`` folder (the inputs every baseline is trained on).

    router = fit_from_collection("routellm_mf", "runs/mmlu-actions", config=MFConfig(epochs=50))
    router.save("runs/baselines/routellm_mf")
    get_router("routellm_mf:runs/baselines/routellm_mf", space=router.space)

The train split's action table, the valid split's (when collected), the problems' texts as the
workflow renders them for the routing prompt, the workflow name as the task, and the pool's model
descriptions all come from the collection (its manifest and recorded data path; the problems are
reloaded, so ``$HAPS_DATA`` files must be where they were).
"""

from __future__ import annotations

import os
from typing import Any

from haps.baselines.base import BaselineConfig, BaselineRouter, Embedder
from haps.errors import ConfigError, DataError


def baseline_class(name: str) -> type[BaselineRouter]:
    """The registered baseline router class called ``name``."""
    from haps.routers import load_builtin_routers
    from haps.routing.base import ROUTERS

    load_builtin_routers()
    cls = ROUTERS.get(name)
    if cls is None or not issubclass(cls, BaselineRouter):
        known = sorted(n for n, c in ROUTERS.items() if issubclass(c, BaselineRouter))
        raise ConfigError(f"unknown baseline {name!r}; known baselines: {known}.")
    return cls


def collection_inputs(collection) -> dict[str, Any]:
    """Everything `BaselineRouter.fit` takes, from an opened collection (`haps.train.collect.Collection`):
    ``{"space", "train", "valid" (or None), "texts", "tasks", "descriptions"}``."""
    from haps.evaluate import ActionTable

    space = collection.space
    train = ActionTable.from_records(collection.records, space, split="train")
    try:
        valid = ActionTable.from_records(collection.records, space, split="valid")
    except DataError:
        valid = None
    workflow = collection.workflow()
    texts = {str(p.id): workflow.problem_text(p) for p in collection.problems()}
    descriptions = {m.name: m.description for m in collection.pool_config().models}
    return {"space": space, "train": train, "valid": valid, "texts": texts, "tasks": workflow.name,
            "descriptions": descriptions}


def fit_from_collection(name: str, collection: str | os.PathLike | Any, *, config: BaselineConfig | None = None,
                        embedder: Embedder | None = None) -> BaselineRouter:
    """Fit baseline ``name`` (e.g. ``"knn"``) on the train split of ``collection`` (a folder or an opened
    `Collection`); ``best_static`` uses the valid split."""
    from haps.train.collect import open_collection

    cls = baseline_class(name)
    col = open_collection(collection) if isinstance(collection, str | os.PathLike) else collection
    inp = collection_inputs(col)
    router = cls(inp["space"], config, embedder=embedder)
    return router.fit(inp["train"], inp["texts"], valid=inp["valid"], tasks=inp["tasks"],
                      descriptions=inp["descriptions"])
