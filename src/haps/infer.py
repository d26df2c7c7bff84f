"""Inference with a trained hierarchical router: route each problem, generate its adapters, run the episodes.

Semantics::

    for each problem p:  z = argmax_z P(z | p);  w = s_z(p)      (one router batch for all problems)
    run every episode (p, z, w) greedily in lockstep              (the adapters injected per row)

The episode log is `haps run`'s, with each turn's model and its adapter's update norm ||alpha A B||_F
(null when the call ran without one).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


@torch.no_grad()
def run_infer(router_dir: str | Path, task: str, problems: Sequence, *, pool=None, adapters: bool = True,
              workflow=None, log_path: Path | None = None, progress: bool = False, max_new_tokens: int | None = None,
              router=None) -> list:
    """Greedy episodes routed by the hierarchical router at ``router_dir`` (or ``router``); returns their
    `EpisodeResult`s in problem order. ``adapters=False`` runs the same routing without generated adapters."""
    from haps.config import load_pool
    from haps.models.pool import ModelPool
    from haps.routing.checkpoints import load_hierarchical
    from haps.routing.prompt import build_routing_prompt
    from haps.workflows import EpisodeJob, get_workflow, run_episodes

    workflow = workflow or get_workflow(task)
    if router is None:
        if pool is None:
            from haps.routing.checkpoints import read_manifest

            pool_name = read_manifest(router_dir).get("meta", {}).get("pool", "tiny")
            pool = ModelPool(load_pool(pool_name))
        router = load_hierarchical(router_dir, pool, workflow.name)
    router.train_mode(False)
    prompts = [build_routing_prompt(workflow, pool.config, p) for p in problems]
    decisions = router.decide(prompts, "argmax", adapters=adapters)
    jobs = [EpisodeJob(p, router.space.to_names(d.assignment), d.adapters if adapters else None)
            for p, d in zip(problems, decisions, strict=True)]
    sampling = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    return run_episodes(pool, workflow, jobs, sampling=sampling, log_path=log_path, progress=progress)
