"""`haps sft`: supervised warm-up of the high-level router (`haps.train.sft`, paper Phase 1)."""

from __future__ import annotations

from pathlib import Path

import typer

from haps.cli import app
from haps.cli.common import build_config, check_out, config_opt, load_config_file
from haps.train.warmup import Balance, TiePolicy


@app.command("sft")
def sft_cmd(
    actions: Path = typer.Option(..., help="Action-level data folder (from `haps collect`)."),
    out: Path = typer.Option(..., help="Checkpoint folder (best epoch by validation reward)."),
    config: Path = config_opt(),
    epochs: int = typer.Option(None, min=1, help="Passes over the warm-up set."),
    lr: float = typer.Option(None, min=0.0, help="Peak learning rate."),
    batch_size: int = typer.Option(None, min=1, help="Examples per forward pass."),
    grad_accum: int = typer.Option(None, min=1, help="Forward passes per optimiser step."),
    warmup_ratio: float = typer.Option(None, min=0.0, max=1.0, help="Share of steps with linear warm-up."),
    lora: bool = typer.Option(None, "--lora/--no-lora", help="Train a PEFT LoRA on the backbone instead of all weights."),
    lora_r: int = typer.Option(None, min=1, help="LoRA rank (with --lora)."),
    backbone: str = typer.Option(None, help="Router backbone: a model of --backbone-pool, or an HF hub id / folder."),
    backbone_pool: str = typer.Option(None, help="Pool that --backbone names."),
    tie: TiePolicy = typer.Option(None, help="Warm-up tie policy."),
    drop_all_zero: bool = typer.Option(None, "--drop-all-zero/--keep-all-zero",
                                       help="Drop problems no assignment solved."),
    balance: Balance = typer.Option(None, help="Warm-up label balance."),
    valid_limit: int = typer.Option(None, min=1, help="Validate on the first N validation problems."),
    seed: int = typer.Option(None, help="Seed of shuffling, ties and the router."),
    workflow: str = typer.Option(None, "--workflow", help="Workflow spec overriding the collection's recorded "
                                 "one (a name or path/to/file.py:ClassName)."),
    profile: str = typer.Option(None, help="default | paper: the authors' SFT recipe (10 epochs, lr 1e-5, warm-up "
                                "0.03, batch 8 x 8, tie policy all) under the --config file and the options given "
                                "(haps.profiles; also `profile:` in the file)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Supervised warm-up of the high-level router on the best assignments of the training split."""
    from rich.console import Console

    from haps.errors import ConfigError
    from haps.profiles import check, merge, sft_overrides
    from haps.train.sft import SFTConfig, run_sft

    base = load_config_file(config)
    base = merge(sft_overrides(check(profile or base.pop("profile", "default"))), base)
    base.pop("profile", None)
    router = dict(base.get("router") or {})
    if lora is False:
        router["lora"] = None
    elif lora or lora_r is not None:
        if not lora and not router.get("lora"):
            raise ConfigError("--lora-r sets the rank of the router's LoRA: pass --lora too (or set router.lora "
                              "in the --config file).")
        router["lora"] = {**(router.get("lora") or {}), **({"r": lora_r} if lora_r is not None else {})}
    base["router"] = router
    cfg: SFTConfig = build_config(SFTConfig, base, {
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "grad_accum": grad_accum, "warmup_ratio": warmup_ratio,
        "tie": tie, "drop_all_zero": drop_all_zero, "balance": balance, "valid_limit": valid_limit, "seed": seed,
        "workflow": workflow,
        "router": {"backbone": backbone, "backbone_pool": backbone_pool, "seed": seed}})
    check_out(out, folder=True)
    rec = run_sft(actions, out, cfg, progress=progress)
    Console().print(f"best epoch {rec.best['epoch'] if rec.best else '-'}: {rec.best}; checkpoint at {out}")
