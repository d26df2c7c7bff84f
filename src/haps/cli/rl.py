"""`haps rl`: joint RL of the high-level router and the adapter generators (`haps.train.rl`, paper Phase 2).

Pinned interface: ``haps rl --task T [--config F] [--router SFT_CKPT] [--data F] [--limit N] [--steps N]
--out DIR``; rerunning the same command resumes, ``--steps`` caps the number of updates.
"""

from __future__ import annotations

from pathlib import Path

import typer

from haps.cli import app
from haps.cli.common import (
    build_config,
    check_out,
    config_opt,
    data_path,
    load_config_file,
    options_opt,
    parse_options,
    workflow_opt,
)


@app.command("rl")
def rl_cmd(
    task: str = workflow_opt(),
    out: Path = typer.Option(..., help="Run folder (config, per-step log, resumable state, best/ checkpoint, test/)."),
    config: Path = config_opt(),
    router: Path = typer.Option(None, help="Start from this checkpoint (`haps sft` or `haps rl` best/); none: the "
                                "untrained backbone (a warning says so)."),
    data: Path = typer.Option(None, help="Problems JSONL (default: the embedded demo set)."),
    limit: int = typer.Option(None, min=1, help="Problems read from the file."),
    steps: int = typer.Option(None, min=1, help="Cap on the number of updates (reruns continue up to it)."),
    pool: str = typer.Option(None, help="Built-in pool name or pool YAML."),
    batch_size: int = typer.Option(None, min=1, help="Problems per update."),
    seed: int = typer.Option(None, help="Seed of routing, sampling and data order."),
    option: list[str] = options_opt(),
    profile: str = typer.Option(None, help="default | paper: the authors' RL settings (greedy routing, batch 1, 3 "
                                "epochs, lr 1e-6 / 1e-5, T 1.0, no baseline or clipping, xavier init shared across "
                                "layers) under the --config file and the options given (haps.profiles; also "
                                "`profile:` in the file)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Joint RL: sample z, generate adapters, run episodes, re-score them, update both routers (resumable)."""
    from rich.console import Console

    from haps.profiles import check, merge, rl_overrides
    from haps.train.rl import RLConfig, run_rl

    base = load_config_file(config)
    base = merge(rl_overrides(check(profile or base.pop("profile", "default"))), base)
    base.pop("profile", None)
    cfg: RLConfig = build_config(RLConfig, base, {
        "task": task, "data": data_path(str(data)) if data else None, "limit": limit, "pool": pool,
        "batch_size": batch_size, "seed": seed, "workflow_options": parse_options(option) or None})
    if cfg.data is not None:
        cfg = cfg.model_copy(update={"data": data_path(cfg.data)})
    check_out(out, folder=True)
    summary = run_rl(cfg, out, router=router, steps=steps, progress=progress)
    con = Console()
    test = summary.get("test") or {}
    con.print(f"[bold]{out}[/]: {summary['steps']} updates; best validation reward "
              f"{summary['best_valid'] if summary['best_valid'] is not None else '-'} at step "
              f"{summary['best_step'] if summary['best_step'] is not None else '-'}; checkpoint {out / 'best'}")
    if test:
        con.print(f"test at the best checkpoint: {test['problems']} problems, reward {test['reward']:.4f}, score "
                  f"{test['score']:.4f}, failed {test['failed']}")
