"""`haps bench rl`: joint-RL throughput against the authors' approach, on the same models and settings.

Side by side in one run (machines drift, so only ratios measured together are compared):

- ``haps``: `RLRecipe` steps (a batch of problems per update, lockstep sampled episodes with the generated
  adapters, batched re-scoring of only the adapted layers from kept states, one backward);
- ``authors``: the authors' loop: one problem per update, the pool's models reloaded for every problem, each
  agent call sampled token by token with gradients through the merged adapter (``W + alpha A B``, one
  forward per token with a KV cache), the loss backpropagated through that graph.

Both route with the same fresh router and run the same workflow, sampling and token caps. Also measured:
the peak memory of one haps step with a batch of `memory_batch` problems where Gemma is the chosen model
(RSS sampled every 5 ms above the level before the step), and routing + adapter generation for
`routing_batch` prompts as a share of one greedy lockstep episode batch of the same problems: in fp32 (as
RL trains it) and, where bf16 matmuls are native, with the backbone in bf16 (as `haps serve` routes by default).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from haps.bench.machine import cpu_info
from haps.dtypes import resolve_dtype_name
from haps.metrics import RewardConfig


class RLBenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pool: str = Field(default="tiny", description="Pool (built-in name or YAML).")
    task: str = Field(default="mmlu", description="Workflow.")
    data: str | None = Field(default="mmlu/val.jsonl", description="Problems (relative to $HAPS_DATA or a path).")
    limit: int = Field(default=80, ge=4, description="Problems read (seeded subset).")
    workflow_options: dict[str, Any] = Field(default_factory=lambda: {"rounds": 3}, description="Workflow options.")
    max_new_tokens: int = Field(default=48, ge=1, description="Tokens per call (both approaches).")
    ours_steps: int = Field(default=2, ge=1, description="haps updates timed.")
    ours_batch: int = Field(default=4, ge=1, description="Problems per haps update.")
    authors_problems: int = Field(default=2, ge=1, description="Authors' updates timed (one problem each).")
    memory_batch: int = Field(default=8, ge=1, description="Problems of the memory-measured step (Gemma chosen).")
    routing_batch: int = Field(default=8, ge=1, description="Prompts of the routing-share measurement.")
    threads: int | None = Field(default=None, ge=1, description="torch threads (None: torch's).")


class _PeakRSS:
    """Peak resident memory above the level at entry (a sampling thread; Linux /proc)."""

    def __enter__(self) -> _PeakRSS:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def above_bytes(self) -> int:
        return self.peak - self.base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rl_config(cfg: RLBenchConfig, **kw) -> Any:
    from haps.cli.common import data_path
    from haps.train.rl import RLConfig

    base = dict(task=cfg.task, data=data_path(cfg.data), limit=cfg.limit, problem_seed=0, pool=cfg.pool,
                workflow_options=cfg.workflow_options, batch_size=cfg.ours_batch, train_limit=None, valid_limit=1,
                test_limit=1, max_new_tokens=cfg.max_new_tokens, reward=RewardConfig(kind="shaped"),
                validate_every=10_000, save_every=10_000)
    base.update(kw)
    return RLConfig(**base)


def bench_ours(cfg: RLBenchConfig) -> dict[str, Any]:
    """haps updates: per-phase seconds of each step, updates and problems per hour."""
    from haps.train.rl import RLRecipe

    rec = RLRecipe(_rl_config(cfg), tempfile.mkdtemp(prefix="haps-bench-rl-"), progress=False)
    rec.setup()
    rec.step(0)  # untimed warm-up (allocator growth, first-call set-up)
    steps = [rec.step(k) for k in range(1, 1 + cfg.ours_steps)]
    total = sum(sum(s.seconds.values()) for s in steps)
    phases = {k: sum(s.seconds.get(k, 0.0) for s in steps) for k in steps[0].seconds}
    return {"updates": len(steps), "problems": len(steps) * cfg.ours_batch, "seconds": total,
            "updates_per_hour": 3600 * len(steps) / total, "problems_per_hour": 3600 * len(steps) * cfg.ours_batch / total,
            "phase_seconds": phases, "tokens": sum(s.tokens for s in steps), "recipe": rec}


def bench_memory_and_routing(cfg: RLBenchConfig, rec) -> dict[str, Any]:
    """Peak RSS of one step of `memory_batch` problems on Gemma; routing share of a greedy episode batch."""
    from haps.routing.prompt import build_routing_prompt
    from haps.workflows import EpisodeJob, run_episodes

    gemma = next(m.name for m in rec.pool.config.models if "gemma" in m.name)
    mem_cfg = rec.cfg.model_copy(update={"batch_size": cfg.memory_batch, "high_level": "fixed",
                                         "fixed_assignment": f"teacher={gemma},student={gemma}"})
    rec.cfg = mem_cfg
    with _PeakRSS() as peak:
        rec.step(0)
    problems = rec.data.train[: cfg.routing_batch]
    prompts = [build_routing_prompt(rec.workflow, rec.pool.config, p) for p in problems]
    with torch.no_grad():
        t0 = time.perf_counter()
        decs = rec.router.decide(prompts, "argmax")
        t_route = time.perf_counter() - t0
        jobs = [EpisodeJob(p, rec.router.space.to_names(d.assignment), d.adapters) for p, d in zip(problems, decs, strict=True)]
        t0 = time.perf_counter()
        run_episodes(rec.pool, rec.workflow, jobs, sampling={"max_new_tokens": cfg.max_new_tokens}, progress=False)
        t_episodes = time.perf_counter() - t0
        routing = {"prompts": len(prompts), "route_and_adapters_s": t_route, "episode_batch_s": t_episodes,
                   "share": t_route / (t_route + t_episodes)}
        served = resolve_dtype_name("auto", next(rec.router.high.model.parameters()).device)
        if served != "float32":  # as served (`haps serve --router-dtype auto`): the backbone in bf16, last
            rec.router.train_mode(False)
            rec.router.backbone_to(getattr(torch, served))
            rec.router.decide(prompts[:1], "argmax")  # first-call set-up of the bf16 kernels, untimed
            t0 = time.perf_counter()
            rec.router.decide(prompts, "argmax")
            t_fast = time.perf_counter() - t0
            routing["served"] = {"dtype": served, "route_and_adapters_s": t_fast,
                                 "share": t_fast / (t_fast + t_episodes)}
    return {"memory": {"batch": cfg.memory_batch, "assignment": f"teacher={gemma},student={gemma}",
                       "peak_rss_above_gib": peak.above_bytes / 2**30, "rss_before_gib": peak.base / 2**30},
            "routing": routing}


def run_bench(cfg: RLBenchConfig, progress=None) -> dict[str, Any]:
    from haps.bench.rl_authors import bench_authors

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    say = progress or (lambda _msg: None)
    say("haps: RL steps")
    ours = bench_ours(cfg)
    rec = ours.pop("recipe")
    say("the authors' approach: one problem per update, token by token")
    authors = bench_authors(cfg, rec)
    say("memory and routing share")
    extra = bench_memory_and_routing(cfg, rec)
    return {"config": cfg.model_dump(), "cpu": cpu_info(), "haps": ours, "authors": authors, **extra,
            "ratio_updates_per_hour": ours["updates_per_hour"] / authors["updates_per_hour"],
            "ratio_problems_per_hour": ours["problems_per_hour"] / authors["problems_per_hour"]}
