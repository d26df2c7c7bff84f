"""`haps infer`: route with a trained hierarchical router, generate adapters, run the episodes greedily.

Pinned interface: ``haps infer --task T --router DIR [--data F] [--limit N] [--no-adapters] --out EPISODES.jsonl``.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from haps.cli import app
from haps.cli.common import (
    check_out,
    data_path,
    failed_episodes_line,
    options_opt,
    parse_options,
    report_failures,
    workflow_opt,
)


@app.command("infer")
def infer_cmd(
    task: str = workflow_opt(),
    router: Path = typer.Option(..., help="Router folder: `haps rl` OUT/best (with its adapters), or `haps sft` "
                                "(assignments only)."),
    out: Path = typer.Option(..., help="Episode log (JSONL; each turn with its model and adapter norm)."),
    data: Path = typer.Option(None, help="Problems JSONL (default: the embedded demo set)."),
    limit: int = typer.Option(None, min=1, help="First N problems (with --problem-seed: a seeded subset)."),
    problem_seed: int = typer.Option(None, help="Seeded spread-out subset of --limit problems (as `haps collect`)."),
    split: str = typer.Option(None, help="Only this split (train | valid | test) of those problems, cut as "
                              "`haps collect` and `haps rl` cut them (fractions 0.6/0.2/0.2, seed 0)."),
    adapters: bool = typer.Option(True, "--adapters/--no-adapters", help="Run with the generated adapters."),
    pool: str = typer.Option(None, help="Pool (default: the one the router was trained on)."),
    max_new_tokens: int = typer.Option(None, min=1, help="Tokens per model call (default: the runner's)."),
    option: list[str] = options_opt(),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Route each problem, generate its adapters, run the episodes greedily; print a summary table."""
    from rich.console import Console
    from rich.table import Table

    from haps.config import load_pool
    from haps.data import load_problems
    from haps.errors import ConfigError
    from haps.infer import run_infer, split_of
    from haps.models.pool import ModelPool
    from haps.routing.checkpoints import load_router, read_manifest
    from haps.workflows import get_workflow, summarize

    workflow = get_workflow(task, **parse_options(option))
    pool_name = pool or read_manifest(router).get("meta", {}).get("pool", "tiny")
    mp = ModelPool(load_pool(pool_name))
    loaded = load_router(router, mp.config, workflow.name)
    problems = load_problems(task, data_path(str(data)) if data else None, limit, sample_seed=problem_seed)
    if split is not None:
        if split not in ("train", "valid", "test"):
            raise ConfigError(f"--split {split!r}: choose train, valid or test.")
        problems = split_of(problems, split, workflow)
        if not problems:
            raise ConfigError(f"the {split} split of these problems is empty; use more problems (--limit).")
    check_out(out)
    t0 = time.perf_counter()
    results = run_infer(router, task, problems, pool=mp, adapters=adapters, workflow=workflow, log_path=out,
                        progress=progress, max_new_tokens=max_new_tokens, router=loaded)
    s = summarize(results, time.perf_counter() - t0)
    with_adapters = adapters and hasattr(loaded, "decide")  # a `haps sft` router generates none
    what = ("with generated adapters" if with_adapters else
            "without adapters: a high-level-only router" if adapters else "generated adapters off")
    t = Table(title=f"haps infer {workflow.name} ({what})")
    for c in ("assignment", "episodes", f"mean {workflow.metric}", "parse fail", "mean adapter norm"):
        t.add_column(c, justify="left" if c == "assignment" else "right")
    by: dict[str, list] = {}
    for r in results:
        by.setdefault(",".join(f"{k}={v}" for k, v in r.assignment.items()), []).append(r)
    from haps.labels import key_labels

    labels = key_labels(list(by))
    for key, rs in sorted(by.items()):
        norms = [tu.adapter_norm for r in rs for tu in r.turns if tu.adapter_norm is not None]
        turns = sum(len(r.turns) for r in rs)
        ok = [r.score for r in rs if not r.failed]
        t.add_row(labels[key], str(len(rs)), f"{sum(ok) / len(ok):.4f}" if ok else "-",
                  f"{sum(r.parse_failures for r in rs) / max(turns, 1):.1%}",
                  f"{sum(norms) / len(norms):.3g}" if norms else "-")
    t.add_row("all", str(s["episodes"]), f"{s['score']:.4f}" if s["score"] is not None else "-",
              f"{s['parse_failure_rate']:.1%}", "")
    con = Console()
    con.print(t)
    con.print(f"episode log: {out} ({s['wall_s']:.1f} s)")
    report_failures([failed_episodes_line(s)])
