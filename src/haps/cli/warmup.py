"""`haps warmup`: the SFT warm-up set and its statistics (`haps.train.warmup`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer
from pydantic import BaseModel, ConfigDict, Field

from haps.cli import app
from haps.cli.common import build_config, check_out, config_opt, field_help
from haps.train.warmup import Balance, TiePolicy

Split = Literal["train", "valid", "test", "all"]


class WarmupConfig(BaseModel):
    """The warm-up set `haps warmup` builds (the same choices as SFTConfig's)."""

    model_config = ConfigDict(extra="forbid")
    split: Split = Field(default="train", description="Split the examples come from (all: every record).")
    tie: TiePolicy = Field(default="random", description="Tie policy: all | random | first.")
    drop_all_zero: bool = Field(default=False, description="Drop problems no assignment solved.")
    balance: Balance = Field(default="none", description="Label balance: none | undersample | oversample.")
    seed: int = Field(default=0, description="Seed of the tie and balance choices.")


@app.command("warmup")
def warmup_cmd(
    actions: Path = typer.Option(..., help="Action-level data folder (from `haps collect`)."),
    split: Split = typer.Option(None, help=field_help(WarmupConfig, "split")),
    tie: TiePolicy = typer.Option(None, help=field_help(WarmupConfig, "tie")),
    drop_all_zero: bool = typer.Option(None, "--drop-all-zero/--keep-all-zero",
                                       help=field_help(WarmupConfig, "drop_all_zero")),
    balance: Balance = typer.Option(None, help=field_help(WarmupConfig, "balance")),
    seed: int = typer.Option(None, help=field_help(WarmupConfig, "seed")),
    config: Path = config_opt(),
    json_out: Path = typer.Option(None, "--json", help="Write the statistics here (JSON)."),
) -> None:
    """Statistics of the warm-up set (best assignment per training problem)."""
    from rich.console import Console

    from haps.files import write_json_atomic
    from haps.train.collect import read_actions
    from haps.train.warmup import build_warmup

    cfg: WarmupConfig = build_config(WarmupConfig, config, {
        "split": split, "tie": tie, "drop_all_zero": drop_all_zero, "balance": balance, "seed": seed})
    check_out(json_out, what="--json")
    _, stats = build_warmup(read_actions(actions), split=None if cfg.split == "all" else cfg.split, tie=cfg.tie,
                            drop_all_zero=cfg.drop_all_zero, balance=cfg.balance, seed=cfg.seed)
    Console().print(stats.table())
    if json_out:
        write_json_atomic(json_out, stats.to_dict())
