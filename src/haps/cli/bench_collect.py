"""`haps bench collect`: `haps collect` with and without the shared episode tree, side by side
(`haps.bench.collect`)."""

from __future__ import annotations

from pathlib import Path

import typer

from haps.bench.collect import CollectBenchConfig
from haps.cli import bench_app
from haps.cli.common import (
    build_config,
    check_out,
    config_opt,
    field_help,
    options_opt,
    parse_options,
    workflow_opt,
)
from haps.files import write_json_atomic


@bench_app.command("collect")
def bench_collect(
    task: str = workflow_opt(),
    n: int = typer.Option(None, min=1, help=field_help(CollectBenchConfig, "n")),
    data: str = typer.Option(None, help=field_help(CollectBenchConfig, "data")),
    max_new_tokens: int = typer.Option(None, min=1, help=field_help(CollectBenchConfig, "max_new_tokens")),
    chunk_size: int = typer.Option(None, min=1, help=field_help(CollectBenchConfig, "chunk_size")),
    rounds: int = typer.Option(None, min=1, help=field_help(CollectBenchConfig, "rounds")),
    option: list[str] = options_opt(),
    pool: str = typer.Option(None, help=field_help(CollectBenchConfig, "pool")),
    threads: int = typer.Option(None, min=1, help=field_help(CollectBenchConfig, "threads")),
    out: Path = typer.Option(None, help=field_help(CollectBenchConfig, "out")),
    config: Path = config_opt(),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bars."),
) -> None:
    """Collection with the shared episode tree vs without: wall time, ratio (target >= 1.3x on MMLU), rows
    generated, identical records and turns."""
    from rich.console import Console
    from rich.table import Table

    from haps.bench.collect import run_bench

    cfg: CollectBenchConfig = build_config(CollectBenchConfig, config, {
        "task": task, "n": n, "data": data, "max_new_tokens": max_new_tokens, "chunk_size": chunk_size,
        "rounds": rounds, "pool": pool, "threads": threads, "out": str(out) if out else None})
    opts = parse_options(option)
    if opts:
        cfg.workflow_options = {**cfg.workflow_options, cfg.task: {**cfg.workflow_options.get(cfg.task, {}), **opts}}
    check_out(cfg.out)
    con = Console()
    result = run_bench(cfg, progress=progress, say=lambda s: con.print(f"[dim]{s}[/]"))
    write_json_atomic(cfg.out, result)
    t = Table(title=f"collect {result['problems']} {result['task']} problems x {result['assignments_per_problem']} "
              f"assignments, greedy, {cfg.max_new_tokens} tokens/call")
    for col in ("mode", "wall s", "episodes/s", "model calls", "rows", "shared rows"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for mode, m in result["modes"].items():
        t.add_row(mode, f"{m['wall_s']:.1f}", f"{m['episodes_per_s']:.3f}", str(m["model_calls"]), str(m["rows"]),
                  str(m["shared_rows"]))
    con.print(t)
    con.print(f"speed-up shared tree / no sharing: [bold]{result['speedup']:.2f}x[/bold] (target >= 1.3x on MMLU); "
              f"identical records {result['identical_records']}/{result['pairs']}, identical turns "
              f"{result['identical_turns']}/{result['pairs']}. JSON: {cfg.out}")
