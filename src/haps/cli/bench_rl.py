"""`haps bench rl`: RL updates per hour, haps against the authors' loop, side by side (`haps.bench.rl`)."""

from __future__ import annotations

from pathlib import Path

import typer

from haps.cli import bench_app
from haps.cli.common import build_config, check_out, config_opt


@bench_app.command("rl")
def bench_rl(
    config: Path = config_opt(),
    ours_steps: int = typer.Option(None, min=1, help="haps updates timed."),
    authors_problems: int = typer.Option(None, min=1, help="Authors' updates timed (one problem each)."),
    max_new_tokens: int = typer.Option(None, min=1, help="Tokens per call (both approaches)."),
    out: Path = typer.Option(Path("benchmarks/results/rl.json"), help="JSON result."),
) -> None:
    """Joint RL: haps (batched lockstep episodes, adapted-layer re-scoring) vs one problem at a time, token by
    token with grad through the merged adapter, models reloaded per problem; memory; routing share."""
    from rich.console import Console
    from rich.table import Table

    from haps.bench.rl import RLBenchConfig, run_bench
    from haps.files import write_json_atomic
    from haps.quiet import quiet_libraries

    quiet_libraries()  # the authors' loop reloads the pool per problem: no "Loading weights" bar each time

    cfg: RLBenchConfig = build_config(RLBenchConfig, config, {
        "ours_steps": ours_steps, "authors_problems": authors_problems, "max_new_tokens": max_new_tokens})
    check_out(out)
    con = Console()
    res = run_bench(cfg, progress=lambda m: con.print(f"[dim]{m}[/]"))
    write_json_atomic(out, res)
    t = Table(title=f"haps bench rl ({res['cpu']['model_name']}, {res['cpu']['torch_threads']} threads)")
    for c in ("approach", "updates", "problems", "seconds", "updates/h", "problems/h"):
        t.add_column(c, justify="left" if c == "approach" else "right")
    for name in ("haps", "authors"):
        r = res[name]
        t.add_row(name, str(r["updates"]), str(r["problems"]), f"{r['seconds']:.0f}", f"{r['updates_per_hour']:.1f}",
                  f"{r['problems_per_hour']:.1f}")
    con.print(t)
    for name in ("haps", "authors"):
        con.print(f"{name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in res[name]["phase_seconds"].items()))
    con.print(f"haps / authors: {res['ratio_updates_per_hour']:.1f}x updates per hour, "
              f"{res['ratio_problems_per_hour']:.1f}x problems per hour")
    m, r = res["memory"], res["routing"]
    con.print(f"peak memory of one step ({m['batch']} problems, {m['assignment']}): "
              f"{m['peak_rss_above_gib']:.2f} GiB above {m['rss_before_gib']:.2f} GiB")
    con.print(f"routing + adapters for {r['prompts']} prompts: {r['route_and_adapters_s']:.2f} s = "
              f"{100 * r['share']:.1f}% of the batch (episodes {r['episode_batch_s']:.1f} s)")
    if "served" in r:
        f = r["served"]
        con.print(f"  with the backbone in {f['dtype']} (as served): {f['route_and_adapters_s']:.2f} s = "
                  f"{100 * f['share']:.1f}%")
    con.print(f"written to {out}")
