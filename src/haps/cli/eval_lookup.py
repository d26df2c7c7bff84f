"""`haps eval-lookup`: routers vs oracle, random and fixed assignments, read from action-level data
(`haps.evaluate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer
from pydantic import BaseModel, ConfigDict, Field

from haps.cli import app
from haps.cli.common import build_config, check_out, config_opt, field_help

Split = Literal["train", "valid", "test", "all"]
RewardKind = Literal["score", "shaped", "tradeoff"]


class EvalConfig(BaseModel):
    """What `haps eval-lookup` evaluates and how rewards are read."""

    model_config = ConfigDict(extra="forbid")
    routers: list[str] = Field(default_factory=lambda: ["all"], description="CKPT | fixed:<role>=<model>,... | "
                               "random | oracle | all (oracle, random and every fixed assignment).")
    split: Split = Field(default="test", description="Split to evaluate on.")
    reward_kind: RewardKind | None = Field(default=None, description="Recompute rewards (None: as recorded).")
    alpha: float | None = Field(default=None, description="tradeoff: weight of the performance term.")
    beta: float | None = Field(default=None, ge=0, description="tradeoff: weight of the normalised cost term.")
    workflow: str | None = Field(default=None, description="Workflow spec overriding the recorded one.")


@app.command("eval-lookup")
def eval_lookup_cmd(
    actions: Path = typer.Option(..., help="Action-level data folder."),
    router: list[str] = typer.Option(None, help=field_help(EvalConfig, "routers")),
    split: Split = typer.Option(None, help=field_help(EvalConfig, "split")),
    reward_kind: RewardKind = typer.Option(None, help=field_help(EvalConfig, "reward_kind")),
    alpha: float = typer.Option(None, help=field_help(EvalConfig, "alpha")),
    beta: float = typer.Option(None, min=0.0, help=field_help(EvalConfig, "beta")),
    workflow: str = typer.Option(None, "--workflow", help="Workflow spec overriding the collection's recorded "
                                 "one (a name or path/to/file.py:ClassName)."),
    config: Path = config_opt(),
    json_out: Path = typer.Option(None, "--json", help="Write the report here (JSON)."),
) -> None:
    """Evaluation by lookup: each policy's mean reward, score and cost read from r(p, z)."""
    from rich.console import Console

    from haps.evaluate import (
        ActionTable,
        lookup_report,
        parse_policy_spec,
        recompute_rewards,
        report_table,
        router_policies,
        standard_policies,
        write_report,
    )
    from haps.train.collect import open_collection

    cfg: EvalConfig = build_config(EvalConfig, config, {
        "routers": router or None, "split": split, "reward_kind": reward_kind, "alpha": alpha, "beta": beta,
        "workflow": workflow})
    check_out(json_out, what="--json")
    col = open_collection(actions, workflow=cfg.workflow)
    recs = col.records
    if cfg.reward_kind:
        from haps.metrics import RewardConfig

        kw = {k: getattr(cfg, k) for k in ("alpha", "beta") if getattr(cfg, k) is not None}
        recs = recompute_rewards(recs, RewardConfig(kind=cfg.reward_kind, **kw))
    table = ActionTable.from_records(recs, col.space, None if cfg.split == "all" else cfg.split)
    std = standard_policies(table)
    pols = {}
    for spec in cfg.routers:
        kind, arg = parse_policy_spec(spec)
        if kind == "all":
            pols.update(std)
        elif kind in ("oracle", "random"):
            pols[kind] = std[kind]
        elif kind == "fixed":
            from haps.routers import get_router

            z = get_router(f"fixed:{arg}", space=col.space).assignment
            pols[f"fixed:{col.space.key(z)}"] = table.fixed(z)
        else:
            from haps.routing.high_level import load_router
            from haps.routing.prompt import build_routing_prompt

            r = load_router(arg)
            wf, pc = col.workflow(), col.pool_config()
            probs = {p.id: p for p in col.problems()}
            prompts = [build_routing_prompt(wf, pc, probs[pid]) for pid in table.problem_ids]
            pols.update(router_policies(r, table, prompts, name=f"router:{Path(arg).name}"))
    rep = lookup_report(table, pols)
    rep["split"] = cfg.split
    Console().print(report_table(rep, f"evaluation by lookup, split {cfg.split}"))
    if json_out:
        write_report(rep, json_out)
