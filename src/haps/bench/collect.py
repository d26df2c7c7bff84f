"""Collection with and without the shared episode tree (`haps bench collect`).

The same `haps.train.collect.collect` run twice on the same problems, pool and greedy settings, once
with ``share_tree`` (identical requests of a step answered by one row: the Student's first turn of a
problem is one call whatever the Teacher's model) and once without, each into its own fresh folder.
Modes alternate in rounds (the order rotated every round, best round kept), after an untimed
episode on each model has loaded them. Reported: wall time, episodes/s, rows generated and shared per mode,
the ratio (no sharing / sharing; the target is >= 1.3x on MMLU), and whether the two collections hold
identical action records (score, reward, tokens, cost per (problem, assignment)) and identical turns
(every prompt, output and action of every episode).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from haps.bench.machine import cpu_info

MODES = ("no_share", "share")


class CollectBenchConfig(BaseModel):
    """The benchmark's settings (YAML via --config; options given on the command line win)."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(default="mmlu", description="Workflow: a name, a plugin or path/to/file.py:ClassName.")
    n: int = Field(default=16, ge=1, description="Problems (every assignment of each is collected).")
    data: str | None = Field(default=None, description="Problems JSONL, as given or relative to $HAPS_DATA (None: "
                             "the embedded demo set).")
    problem_seed: int | None = Field(default=0, description="Seeded spread-out subset of the file (None: the first n).")
    pool: str = Field(default="tiny", description="Built-in pool name or pool YAML file.")
    max_new_tokens: int = Field(default=80, ge=1, description="Tokens per call (collect_tiny.yaml: MMLU 80).")
    workflow_options: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"mmlu": {"rounds": 3},
                                 "hotpotqa": {"budget": 1, "summaries": False, "passage_chars": 400}},
        description="Workflow options per task (those of src/haps/configs/collect_tiny.yaml).")
    chunk_size: int = Field(default=8, ge=1, description="Problems per lockstep runner call.")
    rounds: int = Field(default=1, ge=1, description="Timed runs per mode, alternating; the best is kept.")
    threads: int | None = Field(default=None, ge=1, description="torch threads (None: torch's).")
    out: str = Field(default="benchmarks/results/collect.json", description="JSON result.")


def _records(folder: Path) -> dict[tuple[str, str], dict[str, Any]]:
    from haps.train.collect import read_actions

    out = {}
    for r in read_actions(folder):
        r = dict(r)
        r.pop("episode_log", None)
        out[(r["problem_id"], r["key"])] = r
    return out


def _turns(folder: Path) -> dict[tuple[str, str], str]:
    out = {}
    for f in sorted((folder / "episodes").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            e = json.loads(line)
            key = ",".join(f"{k}={v}" for k, v in e["assignment"].items())
            out[(str(e["id"]), key)] = json.dumps(e["turns"], sort_keys=True)
    return out


def compare(a: Path, b: Path) -> dict[str, int]:
    """How many (problem, assignment) pairs two collections hold, and how many have identical records and
    identical episode turns."""
    ra, rb = _records(a), _records(b)
    ta, tb = _turns(a), _turns(b)
    keys = sorted(set(ra) | set(rb))
    return {"pairs": len(keys), "identical_records": sum(ra.get(k) == rb.get(k) for k in keys),
            "identical_turns": sum(k in ta and ta.get(k) == tb.get(k) for k in keys)}


def run_bench(cfg: CollectBenchConfig, *, pool=None, workflow=None, problems=None, progress: bool = True,
              say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Both modes (see the module docstring); the result dict written as the benchmark's JSON. ``pool``,
    ``workflow`` and ``problems`` default to the ones the config names (tests pass small ones)."""
    import torch

    from haps.cli.common import data_path
    from haps.train.collect import CollectConfig, collect
    from haps.workflows import RunStats, run_episodes

    say = say or (lambda _s: None)
    options = dict(cfg.workflow_options.get(cfg.task, {}))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if workflow is None:
        from haps.workflows import get_workflow

        workflow = get_workflow(cfg.task, **options)
    if pool is None:
        from haps.config import load_pool
        from haps.models.pool import ModelPool

        pool = ModelPool(load_pool(cfg.pool))
    data = data_path(cfg.data)
    if problems is None:
        from haps.data import load_problems

        problems = load_problems(cfg.task, data, cfg.n, sample_seed=cfg.problem_seed if data else None)
    from haps.workflows import EpisodeJob

    names = pool.names
    say("loading the models (one untimed episode on each)")
    run_episodes(pool, workflow, [EpisodeJob(problems[0], {r: m for r in workflow.roles}) for m in names],
                 sampling={"max_new_tokens": 2}, progress=False)
    best: dict[str, dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="haps-bench-collect-") as tmp:
        folders = {}
        for rnd in range(cfg.rounds):
            order = MODES if rnd % 2 == 0 else MODES[::-1]
            for mode in order:
                folder = Path(tmp) / f"{mode}-{rnd}"
                stats = RunStats()

                def runner(*a, _stats=stats, **kw):
                    s = RunStats()
                    res = run_episodes(*a, stats=s, **kw)
                    for k in ("episodes", "calls", "rows", "shared_rows", "tokens_in", "tokens_out"):
                        setattr(_stats, k, getattr(_stats, k) + getattr(s, k))
                    return res

                ccfg = CollectConfig(task=cfg.task, data=data, limit=cfg.n, pool=cfg.pool, workflow_options=options,
                                     max_new_tokens=cfg.max_new_tokens, chunk_size=cfg.chunk_size,
                                     share_tree=mode == "share", split_fractions=(1.0, 0.0, 0.0))
                workflow.warm_up(problems)  # the same start for both modes (untimed)
                say(f"round {rnd + 1}/{cfg.rounds}: {mode}")
                t0 = time.perf_counter()
                s = collect(ccfg, folder, problems=problems, pool=pool, workflow=workflow, runner=runner,
                            progress=progress)
                wall = time.perf_counter() - t0
                rec = {"mode": mode, "round": rnd, "wall_s": round(wall, 2), "episodes": s.written,
                       "episodes_per_s": round(s.written / wall, 4) if wall > 0 else 0.0, "model_calls": stats.calls,
                       "rows": stats.rows, "shared_rows": stats.shared_rows, "tokens_in": stats.tokens_in,
                       "tokens_out": stats.tokens_out}
                runs.append(rec)
                if mode not in best or rec["wall_s"] < best[mode]["wall_s"]:
                    best[mode] = rec
                    folders[mode] = folder
        same = compare(folders["no_share"], folders["share"])
    ratio = best["no_share"]["wall_s"] / best["share"]["wall_s"] if best["share"]["wall_s"] > 0 else 0.0
    return {
        "bench": "collect", "task": workflow.name, "problems": len(problems), "pool": cfg.pool,
        "assignments_per_problem": len(names) ** len(workflow.roles),
        "settings": {"max_new_tokens": cfg.max_new_tokens, "temperature": 0.0, "workflow_options": options,
                     "data": data or "demo", "chunk_size": cfg.chunk_size, "rounds": cfg.rounds},
        "modes": best, "runs": runs, "speedup": round(ratio, 3), "target_speedup": 1.3, **same,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "device": "cpu"},
        "cpu": cpu_info(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
