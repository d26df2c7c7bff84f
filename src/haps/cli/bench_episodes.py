"""`haps bench episodes`: HotpotQA episodes in lockstep (one batch per model per step) versus one at a
time, same models, problems and greedy settings. Reports the speed-up, tokens/s, and whether both
modes gave the same predictions."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from haps.cli import bench_app
from haps.files import write_json_atomic


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


@bench_app.command("episodes")
def bench_episodes(
    n: int = typer.Option(32, help="HotpotQA episodes."),
    teacher: str = typer.Option(None, help="Teacher model (default: the pool's first)."),
    student: str = typer.Option(None, help="Student model (default: the pool's last)."),
    data: Path = typer.Option(None, help="HotpotQA JSONL (default: the embedded demo set, cycled to N)."),
    max_new_tokens: int = typer.Option(64, help="Tokens per call."),
    budget: int = typer.Option(1, help="Search budget B."),
    summaries: bool = typer.Option(False, help="Running-summary calls (doubles the calls)."),
    passage_chars: int = typer.Option(300, help="Cut retrieved passages to this many characters."),
    pool: str = typer.Option("tiny", help="Built-in pool name or pool YAML file."),
    threads: int = typer.Option(None, help="torch threads (default: torch's)."),
    out: Path = typer.Option(Path("benchmarks/results/episodes.json"), help="JSON result."),
    progress: bool = typer.Option(True),
) -> None:
    """Lockstep vs one-at-a-time episodes: wall time, ratio (target >= 5x), tokens/s, same predictions."""
    import dataclasses

    import torch

    from haps.config import load_pool
    from haps.data import load_problems
    from haps.models.pool import ModelPool
    from haps.workflows import EpisodeJob, RunStats, Sampling, get_workflow, run_episodes

    if threads:
        torch.set_num_threads(threads)
    mp = ModelPool(load_pool(pool))
    assignment = {"teacher": teacher or mp.names[0], "student": student or mp.names[-1]}
    problems = load_problems("hotpotqa", data, n)
    if len(problems) < n:  # the demo set is small: cycle it, with distinct ids
        base = list(problems)
        problems = [dataclasses.replace(base[i % len(base)], id=f"{base[i % len(base)].id}#{i}") for i in range(n)]
    workflow = get_workflow("hotpotqa", budget=budget, summaries=summaries, passage_chars=passage_chars)
    jobs = [EpisodeJob(p, assignment) for p in problems]
    sampling = Sampling(temperature=0.0, max_new_tokens=max_new_tokens)
    con = Console()
    # warm-up: load both models and the retriever outside the timings
    run_episodes(mp, workflow, jobs[:1], sampling=Sampling(max_new_tokens=2), progress=False)

    modes = {}
    preds = {}
    for mode, max_live in (("lockstep", None), ("one_at_a_time", 1)):
        # same start for both modes: every paragraph embedded, no query embeddings cached (untimed)
        workflow.retriever.clear_cache()
        workflow.retriever.warm(problems)
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
            "mean_f1": round(sum(r.score for r in res) / len(res), 4),
            "parse_failure_rate": round(stats.parse_failures / max(stats.turns, 1), 4),
            "per_model": {name: _totals_delta(before[name], getattr(mp.backend(name), "totals", {}))
                          for name in sorted(before)},
        }
    same = sum(a == b for a, b in zip(preds["lockstep"], preds["one_at_a_time"], strict=True))
    ratio = modes["one_at_a_time"]["wall_s"] / modes["lockstep"]["wall_s"]
    result = {
        "bench": "episodes", "task": "hotpotqa", "episodes": n, "pool": pool, "assignment": assignment,
        "settings": {"max_new_tokens": max_new_tokens, "temperature": 0.0, "budget": budget, "summaries": summaries,
                     "passage_chars": passage_chars, "data": str(data) if data else "demo"},
        "modes": modes, "speedup": round(ratio, 2), "target_speedup": 5.0,
        "identical_predictions": same, "prediction_mismatches": n - same,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "device": "cpu"},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json_atomic(out, result)

    t = Table(title=f"{n} HotpotQA episodes, teacher={assignment['teacher']}, student={assignment['student']}, "
                    f"greedy, {max_new_tokens} tokens/call")
    for col in ("mode", "wall s", "episodes/s", "tokens/s", "model calls", "mean F1", "parse fail"):
        t.add_column(col, justify="right" if col != "mode" else "left")
    for mode, m in modes.items():
        t.add_row(mode, f"{m['wall_s']:.1f}", f"{m['episodes_per_s']:.3f}", f"{m['tokens_per_s']:.1f}",
                  str(m["model_calls"]), f"{m['mean_f1']:.3f}", f"{m['parse_failure_rate']:.1%}")
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
    con.print(f"speed-up lockstep / one-at-a-time: [bold]{ratio:.2f}x[/bold] (target >= 5x); identical predictions: "
              f"{same}/{n}. JSON: {out}")
