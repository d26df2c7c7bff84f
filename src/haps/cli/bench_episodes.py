"""`haps bench episodes`: episodes in lockstep (one batch per model per step) versus one at a time, same
workflow, models, problems and greedy settings (HotpotQA by default). Reports the speed-up, tokens/s,
and whether both modes gave the same predictions."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from haps.bench.machine import cpu_info
from haps.cli import bench_app
from haps.cli.common import (
    build_config,
    check_out,
    config_opt,
    data_path,
    field_help,
    options_opt,
    parse_options,
    report_failures,
    workflow_opt,
)
from haps.files import write_json_atomic


def _mean_score(results) -> float | None:
    """Mean score over the episodes that did not fail (None: all failed)."""
    ok = [r.score for r in results if not r.failed]
    return round(sum(ok) / len(ok), 4) if ok else None


def _totals_delta(before: dict, after: dict) -> dict:
    """Where a model's time went during one mode: prefill vs decode seconds, prompt tokens vs the tokens
    the prefill actually computed (padding and shared prefixes), batches."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    if not d:
        return {}
    out = {k: round(v, 2) if isinstance(v, float) else v for k, v in d.items()}
    if d.get("prompt_tokens"):
        out["prefill_tokens_per_prompt_token"] = round(d["prefill_tokens"] / d["prompt_tokens"], 3)
        out["mean_rows_per_batch"] = round(d["rows"] / max(d["batches"], 1), 2)
    return out


class EpisodesBenchConfig(BaseModel):
    """The lockstep benchmark's settings (YAML via --config; options given on the command line win)."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(default="hotpotqa", description="Workflow: a name, a plugin or path/to/file.py:ClassName.")
    n: int = Field(default=32, ge=1, description="Episodes.")
    assign: str | None = Field(default=None, description="ROLE=MODEL pairs (default: the first role on the pool's "
                               "first model, the others on its last).")
    data: str | None = Field(default=None, description="Problems JSONL (None: the embedded demo set, cycled to n).")
    max_new_tokens: int = Field(default=64, ge=1, description="Tokens per call.")
    workflow_options: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"hotpotqa": {"budget": 1, "summaries": False, "passage_chars": 300}},
        description="Workflow options per task (HotpotQA: budget 1, no summary calls, passages cut to 300 chars).")
    pool: str = Field(default="tiny", description="Built-in pool name or pool YAML file.")
    threads: int | None = Field(default=None, ge=1, description="torch threads (None: torch's).")
    out: str = Field(default="benchmarks/results/episodes.json", description="JSON result.")


@bench_app.command("episodes")
def bench_episodes(
    task: str = workflow_opt(),
    n: int = typer.Option(None, min=1, help=field_help(EpisodesBenchConfig, "n")),
    assign: str = typer.Option(None, help=field_help(EpisodesBenchConfig, "assign")),
    data: Path = typer.Option(None, help=field_help(EpisodesBenchConfig, "data")),
    max_new_tokens: int = typer.Option(None, min=1, help=field_help(EpisodesBenchConfig, "max_new_tokens")),
    option: list[str] = options_opt(),
    pool: str = typer.Option(None, help=field_help(EpisodesBenchConfig, "pool")),
    threads: int = typer.Option(None, min=1, help=field_help(EpisodesBenchConfig, "threads")),
    out: Path = typer.Option(None, help=field_help(EpisodesBenchConfig, "out")),
    config: Path = config_opt(),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bars."),
) -> None:
    """Lockstep vs one-at-a-time episodes: wall time, ratio (target >= 5x), tokens/s, same predictions."""
    from haps.models.pool import ModelPool
    from haps.workflows import EpisodeJob, Sampling, run_episodes

    cfg: EpisodesBenchConfig = build_config(EpisodesBenchConfig, config, {
        "task": task, "n": n, "assign": assign, "data": str(data) if data else None, "max_new_tokens": max_new_tokens,
        "pool": pool, "threads": threads, "out": str(out) if out else None})
    options, workflow, pool_cfg, assignment, problems = _setup(cfg, option)
    n = cfg.n
    mp = ModelPool(pool_cfg)
    jobs = [EpisodeJob(p, assignment) for p in problems]
    sampling = Sampling(temperature=0.0, max_new_tokens=cfg.max_new_tokens)
    con = Console()
    # warm-up: load the models (and e.g. the retriever) outside the timings
    run_episodes(mp, workflow, jobs[:1], sampling=Sampling(max_new_tokens=2), progress=False)

    modes, preds = _time_modes(mp, workflow, jobs, problems, assignment, sampling, progress)
    same = sum(a == b for a, b in zip(preds["lockstep"], preds["one_at_a_time"], strict=True))
    ratio = modes["one_at_a_time"]["wall_s"] / modes["lockstep"]["wall_s"]
    write_json_atomic(cfg.out, _result(cfg, workflow, assignment, options, modes, ratio, same))

    _print_tables(con, cfg, workflow, assignment, modes)
    con.print(f"speed-up lockstep / one-at-a-time: [bold]{ratio:.2f}x[/bold] (target >= 5x); identical predictions: "
              f"{same}/{n}. JSON: {cfg.out}")
    failed = sum(m["failed"] for m in modes.values())
    report_failures([f"{failed} episode(s) failed (a model call errored); the timings do not compare like with "
                     "like. See the episodes' errors with `haps run` on the same settings."] if failed else [])


def _setup(cfg: EpisodesBenchConfig, option: list[str]) -> tuple[dict[str, Any], Any, Any, dict[str, str], list]:
    """(workflow options, workflow, pool config, assignment, ``cfg.n`` problems) of the benchmark; checks the
    output path and sets the torch threads."""
    import torch

    from haps.cli.run import resolve_assignment
    from haps.config import load_pool
    from haps.data import load_problems
    from haps.workflows import get_workflow

    options = {**cfg.workflow_options.get(cfg.task, {}), **parse_options(option)}
    workflow = get_workflow(cfg.task, **options)
    pool_cfg = load_pool(cfg.pool)
    names = pool_cfg.names
    assignment = (resolve_assignment(cfg.assign, workflow.roles, names) if cfg.assign else
                  {r: names[0] if i == 0 else names[-1] for i, r in enumerate(workflow.roles)})
    problems = load_problems(cfg.task, data_path(cfg.data), cfg.n)
    check_out(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return options, workflow, pool_cfg, assignment, _cycled(problems, cfg.n)


def _cycled(problems: list, n: int) -> list:
    """``problems``, or, when there are fewer than ``n`` (the demo set is small), ``n`` of them cycled with
    distinct ids."""
    import dataclasses

    if len(problems) < n:  # the demo set is small: cycle it, with distinct ids
        base = list(problems)
        problems = [dataclasses.replace(base[i % len(base)], id=f"{base[i % len(base)].id}#{i}") for i in range(n)]
    return problems


def _time_modes(mp, workflow, jobs: list, problems: list, assignment: dict[str, str], sampling,
                progress: bool) -> tuple[dict[str, dict[str, Any]], dict[str, list]]:
    """Run ``jobs`` in lockstep, then one at a time; returns (mode -> its timings, tokens, calls, score and
    per-model totals; mode -> the predictions in job order)."""
    from haps.workflows import RunStats, run_episodes

    modes = {}
    preds = {}
    for mode, max_live in (("lockstep", None), ("one_at_a_time", 1)):
        workflow.warm_up(problems)  # the same start for both modes (untimed)
        stats = RunStats()
        before = {name: dict(getattr(mp.backend(name), "totals", {})) for name in set(assignment.values())}
        t0 = time.perf_counter()
        res = run_episodes(mp, workflow, jobs, sampling=sampling, progress=progress, max_live=max_live, stats=stats)
        wall = time.perf_counter() - t0
        preds[mode] = [r.prediction for r in res]
        modes[mode] = {
            "wall_s": round(wall, 2), "episodes_per_s": round(len(res) / wall, 4),
            "tokens_out": stats.tokens_out, "tokens_in": stats.tokens_in,
            "tokens_per_s": round(stats.tokens_out / wall, 2), "model_calls": stats.calls, "turns": stats.turns,
            "mean_score": _mean_score(res), "metric": workflow.metric, "failed": stats.failed,
            "parse_failure_rate": round(stats.parse_failures / max(stats.turns, 1), 4),
            "per_model": {name: _totals_delta(before[name], getattr(mp.backend(name), "totals", {}))
                          for name in sorted(before)},
        }
    return modes, preds


def _result(cfg: EpisodesBenchConfig, workflow, assignment: dict[str, str], options: dict[str, Any],
            modes: dict[str, dict[str, Any]], ratio: float, same: int) -> dict[str, Any]:
    """The JSON result: settings, both modes, the speed-up, matching predictions and the machine."""
    import torch

    n = cfg.n
    return {
        "bench": "episodes", "task": workflow.name, "episodes": n, "pool": cfg.pool, "assignment": assignment,
        "settings": {"max_new_tokens": cfg.max_new_tokens, "temperature": 0.0, "workflow_options": options,
                     "data": cfg.data or "demo"},
        "modes": modes, "speedup": round(ratio, 2), "target_speedup": 5.0,
        "identical_predictions": same, "prediction_mismatches": n - same,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "device": "cpu"},
        "cpu": cpu_info(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _print_tables(con: Console, cfg: EpisodesBenchConfig, workflow, assignment: dict[str, str],
                  modes: dict[str, dict[str, Any]]) -> None:
    """Print the table of both modes and the table of where each model's time went."""
    t = Table(title=f"{cfg.n} {workflow.name} episodes, " + ", ".join(f"{r}={m}" for r, m in assignment.items())
              + f", greedy, {cfg.max_new_tokens} tokens/call")
    for col in ("mode", "wall s", "episodes/s", "tokens/s", "model calls", f"mean {workflow.metric}", "parse fail",
                "failed"):
        t.add_column(col, justify="right" if col != "mode" else "left")
    for mode, m in modes.items():
        t.add_row(mode, f"{m['wall_s']:.1f}", f"{m['episodes_per_s']:.3f}", f"{m['tokens_per_s']:.1f}",
                  str(m["model_calls"]), "-" if m["mean_score"] is None else f"{m['mean_score']:.3f}",
                  f"{m['parse_failure_rate']:.1%}", str(m["failed"]))
    con.print(t)
    b = Table(title="where the time went (per model)")
    for col in ("mode", "model", "batches", "rows/batch", "prefill s", "decode s", "computed/prompt tokens"):
        b.add_column(col, justify="right" if col not in ("mode", "model") else "left")
    for mode, m in modes.items():
        for name, d in m["per_model"].items():
            if d:
                b.add_row(mode, name, str(d["batches"]), f"{d.get('mean_rows_per_batch', 0):.1f}",
                          f"{d['prefill_s']:.1f}", f"{d['decode_s']:.1f}",
                          f"{d.get('prefill_tokens_per_prompt_token', 0):.2f}")
    con.print(b)
