"""Hierarchical router checkpoints: safetensors + JSON only, written atomically, checked when read.

Layout of a router folder::

    DIR/router.json            {"format": "haps-hierarchical-router/1", "roles", "models", "open_models",
                                "task", "target", "sites": {model: {"layers", "shapes"}}, "low_level",
                                "heads_sha256", "meta"}
    DIR/high_level/            the high-level router (`HighLevelRouter.save`: backbone, tokenizer, its JSON)
    DIR/heads.safetensors      every generator's weights, keys "<model>/<parameter>"
    DIR/heads_backbone.safetensors   share_backbone=false only: the generators' frozen backbone copy

`load_router` reads either this format or a high-level-only checkpoint, and refuses one made for another
pool or task with a one-line error naming both.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from haps.config import LoraTarget
from haps.errors import ConfigError
from haps.files import atomic_dir
from haps.models.lora import LoraSites

FORMAT = "haps-hierarchical-router/1"
MANIFEST = "router.json"
HEADS = "heads.safetensors"
HEADS_BACKBONE = "heads_backbone.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_hierarchical(router, path: str | Path, *, task: str | None = None, meta: dict[str, Any] | None = None) -> Path:
    """Write ``router`` (a `HierarchicalRouter`) to the folder ``path`` (replaced atomically)."""
    from safetensors.torch import save_file, save_model

    path = Path(path)
    with atomic_dir(path) as tmp:
        router.high.save(tmp / "high_level")
        state = {f"{name}/{k}": v.detach().contiguous() for name, gen in router.generators.items()
                 for k, v in gen.state_dict().items()}
        save_file(state, str(tmp / HEADS))
        if router.heads_backbone is not None:
            save_model(router.heads_backbone, str(tmp / HEADS_BACKBONE))
        info = {
            "format": FORMAT, "roles": list(router.space.roles), "models": list(router.space.models),
            "open_models": sorted(router.sites), "task": task if task is not None else router.meta.get("task"),
            "target": router.target.model_dump(),
            "sites": {m: {"layers": list(s.layers), "shapes": [list(x) for x in s.shapes]} for m, s in router.sites.items()},
            "low_level": router.cfg.model_dump(), "heads_sha256": _sha256(tmp / HEADS),
            "meta": {**router.meta, **(meta or {})},
        }
        (tmp / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path) / MANIFEST
    if not p.exists():
        raise ConfigError(f"{str(path)!r} is not a router checkpoint (no {MANIFEST}); pass a folder written by "
                          "`haps sft` or `haps rl`.")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is not valid JSON ({e.msg}); the checkpoint is corrupt: retrain or restore it.") from None


def check_pool(info: dict[str, Any], pool, where: str) -> None:
    """``pool`` (a PoolConfig or ModelPool) must have the checkpoint's models, in its order, open/closed alike."""
    cfg = getattr(pool, "config", pool)
    names = [m.name for m in cfg.models]
    open_now = sorted(m.name for m in cfg.models if m.open_weights)
    if names != list(info["models"]) or open_now != sorted(info.get("open_models", open_now)):
        raise ConfigError(f"router {where} was trained for the pool {info['models']} (open: "
                          f"{info.get('open_models')}), but the pool given is {names} (open: {open_now}); use the "
                          "pool it was trained on, or train a router for this pool.")


def check_task(info: dict[str, Any], task: str | None, where: str) -> None:
    trained = info.get("task")
    if task is not None and trained is not None and trained != task:
        raise ConfigError(f"router {where} was trained for the task {trained!r}, not {task!r}; pass --task {trained} "
                          f"or train a router for {task!r}.")


def load_hierarchical(path: str | Path, pool=None, task: str | None = None):
    """The `HierarchicalRouter` saved at ``path``; with ``pool``/``task`` checked against what it was trained on."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    from haps.routing.high_level import load_router as load_high
    from haps.routing.low_level import GENERATORS, HierarchicalRouter, LowLevelConfig

    path = Path(path)
    info = read_manifest(path)
    if info.get("format") != FORMAT:
        raise ConfigError(f"{path / MANIFEST}: format {info.get('format')!r} is not a hierarchical router "
                          f"({FORMAT!r}).")
    if pool is not None:
        check_pool(info, pool, str(path))
    check_task(info, task, str(path))
    heads_p = path / HEADS
    if not heads_p.exists() or _sha256(heads_p) != info.get("heads_sha256"):
        raise ConfigError(f"{heads_p} is missing or does not match its recorded checksum (a corrupt or partial "
                          "copy); restore the checkpoint folder or retrain.")
    high = load_high(path / "high_level")
    cfg = LowLevelConfig.model_validate(info["low_level"])
    target = LoraTarget.model_validate(info["target"])
    sites = {m: LoraSites(tuple(s["layers"]), tuple(tuple(x) for x in s["shapes"])) for m, s in info["sites"].items()}
    d_model = high.model.config.hidden_size
    try:
        state = load_file(str(heads_p))
    except SafetensorError as e:
        raise ConfigError(f"{heads_p} cannot be read ({e}); the checkpoint is corrupt: restore it or retrain.") from None
    gens = {}
    for name, s in sorted(sites.items()):
        gen = GENERATORS[cfg.generator](d_model, s, target.rank, cfg, len(info["roles"]))
        gen.load_state_dict({k.split("/", 1)[1]: v for k, v in state.items() if k.split("/", 1)[0] == name})
        gens[name] = gen
    heads_backbone = None
    if not cfg.share_backbone:
        heads_backbone = copy.deepcopy(high.model)
        try:
            load_model(heads_backbone, str(path / HEADS_BACKBONE))
        except (SafetensorError, FileNotFoundError, RuntimeError) as e:
            raise ConfigError(f"{path / HEADS_BACKBONE} cannot be read ({e}); restore the checkpoint or retrain.") from None
    router = HierarchicalRouter(high, gens, target, sites, cfg, heads_backbone, meta=info.get("meta"))
    router.meta["task"] = info.get("task")
    return router


def load_router(path: str | Path, pool=None, task: str | None = None):
    """A router checkpoint of either format: a `HierarchicalRouter` (``haps rl``) or a `HighLevelRouter`
    (``haps sft``)."""
    info = read_manifest(path)
    if info.get("format") == FORMAT:
        return load_hierarchical(path, pool, task)
    from haps.routing.high_level import load_router as load_high

    router = load_high(path)
    if pool is not None:
        check_pool({"models": list(router.space.models)}, pool, str(path))
    return router
