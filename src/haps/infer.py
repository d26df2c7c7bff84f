"""Inference with a trained hierarchical router: route each problem, generate its adapters, run the episodes.

Semantics::

    for each problem p:  z = argmax_z P(z | p);  w = s_z(p)      (one router batch for all problems)
    run every episode (p, z, w) greedily in lockstep              (the adapters injected per row)

The episode log is `haps run`'s, with each turn's model and its adapter's update norm ||alpha A B||_F
(null when the call ran without one). A router from `haps sft` (high level only) routes without adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


@torch.no_grad()
def run_infer(router_dir: str | Path, task: str, problems: Sequence, *, pool=None, adapters: bool = True,
              workflow=None, log_path: Path | None = None, progress: bool = False, max_new_tokens: int | None = None,
              router=None) -> list:
    """Greedy episodes routed by the router at ``router_dir`` (or ``router``): a hierarchical one (its generated
    adapters, unless ``adapters=False``) or a high-level-only one (`haps sft`: no adapters). Returns the
    `EpisodeResult`s in problem order."""
    from haps.config import load_pool
    from haps.models.pool import ModelPool
    from haps.routing.checkpoints import load_router, read_manifest
    from haps.routing.prompt import build_routing_prompt
    from haps.workflows import EpisodeJob, get_workflow, run_episodes

    workflow = workflow or get_workflow(task)
    if router is None:
        if pool is None:
            pool = ModelPool(load_pool(read_manifest(router_dir).get("meta", {}).get("pool", "tiny")))
        router = load_router(router_dir, pool.config, workflow.name)
    prompts = [build_routing_prompt(workflow, pool.config, p) for p in problems]
    if hasattr(router, "decide"):
        router.train_mode(False)
        decisions = router.decide(prompts, "argmax", adapters=adapters)
        picks = [(d.assignment, d.adapters if adapters else None) for d in decisions]
    else:  # a high-level router alone: assignments, no adapters
        picks = [(z, None) for z in router.route(prompts)]
    jobs = [EpisodeJob(p, router.space.to_names(z), a) for p, (z, a) in zip(problems, picks, strict=True)]
    sampling = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    return run_episodes(pool, workflow, jobs, sampling=sampling, log_path=log_path, progress=progress)


def split_of(problems: Sequence, split: str, workflow, fractions=(0.6, 0.2, 0.2), seed: int = 0) -> list:
    """The problems of one split, as `haps collect` and `haps rl` cut them (same fractions and seed)."""
    from haps.data import split_problems

    return split_problems(problems, fractions, seed, stratify_by=getattr(workflow, "stratify_by", None))[split]
