"""`haps demo`: the main job end to end on the embedded pool and demo set.

For each task: collect the action-level data (every assignment of the pool's models to the roles, run
through the lockstep runner) -> warm-up set -> SFT of the high-level router -> evaluation by lookup on
the held-out split against the oracle, random and every fixed assignment. Resumable: a killed demo
started again reuses what it had collected.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel, ConfigDict, Field

from haps.cli import app
from haps.cli.common import build_config, check_out, config_opt, field_help, report_failures


class DemoConfig(BaseModel):
    """Sizes of the demo (YAML via --config; options given on the command line win)."""

    model_config = ConfigDict(extra="forbid")
    out: str = Field(default="runs/demo", description="Output folder (one sub-folder per task).")
    tasks: list[str] = Field(default_factory=lambda: ["mmlu", "hotpotqa"], description="Workflows, in order.")
    pool: str = Field(default="tiny", description="Built-in pool name or pool YAML.")
    data: str | None = Field(default=None, description="JSONL file/folder instead of the demo set (one task then).")
    limit: int = Field(default=8, ge=1, description="Problems per task (the demo sets hold 20).")
    max_new_tokens: int = Field(default=32, ge=1, description="Cap on tokens per model call.")
    epochs: int = Field(default=4, ge=1, description="SFT epochs of the high-level router.")
    seed: int = Field(default=0, description="Seed of collection and SFT.")
    workflow_options: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"hotpotqa": {"summaries": False, "budget": 2}},
        description="Workflow options per task (HotpotQA: budget 2 without summary calls, to stay small).")


@app.command("demo")
def demo(
    out: Path = typer.Option(None, help=field_help(DemoConfig, "out")),
    tasks: str = typer.Option(None, help=field_help(DemoConfig, "tasks")),
    pool: str = typer.Option(None, help=field_help(DemoConfig, "pool")),
    data: str = typer.Option(None, help=field_help(DemoConfig, "data")),
    limit: int = typer.Option(None, min=1, help=field_help(DemoConfig, "limit")),
    max_new_tokens: int = typer.Option(None, min=1, help=field_help(DemoConfig, "max_new_tokens")),
    epochs: int = typer.Option(None, min=1, help=field_help(DemoConfig, "epochs")),
    seed: int = typer.Option(None, help=field_help(DemoConfig, "seed")),
    config: Path = config_opt(),
) -> None:
    """Collect -> warm-up -> SFT the high-level router -> evaluate by lookup, on the demo set."""
    from rich.console import Console

    from haps.evaluate import ActionTable, lookup_report, report_table, router_policies, standard_policies
    from haps.files import write_json_atomic
    from haps.routing.high_level import load_router
    from haps.routing.prompt import build_routing_prompt
    from haps.train.collect import CollectConfig, collect, open_collection
    from haps.train.sft import SFTConfig, run_sft

    cfg: DemoConfig = build_config(DemoConfig, config, {
        "out": str(out) if out else None, "tasks": [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
        "pool": pool, "data": data, "limit": limit, "max_new_tokens": max_new_tokens, "epochs": epochs, "seed": seed})
    root = Path(cfg.out)
    check_out(root, folder=True)
    console = Console()
    for task in cfg.tasks:
        t0 = time.perf_counter()
        folder = root / task
        ccfg = CollectConfig(task=task, data=cfg.data, limit=cfg.limit, pool=cfg.pool,
                             max_new_tokens=cfg.max_new_tokens, workflow_options=cfg.workflow_options.get(task, {}),
                             seed=cfg.seed)
        console.rule(f"[bold]{task}: collect every assignment")
        got = collect(ccfg, folder / "actions")
        report_failures([got.failure_summary() or "", *got.capped_lines()])  # stop: no router on a partial table
        console.rule(f"[bold]{task}: SFT of the high-level router")
        ckpt = folder / "router"
        run_sft(folder / "actions", ckpt, SFTConfig(epochs=cfg.epochs, seed=cfg.seed))
        col = open_collection(folder / "actions")
        # the held-out test split; small runs may leave it empty (MMLU is split by subject): then valid, then all
        present = {r.get("split") for r in col.records}
        split = next((s for s in ("test", "valid") if s in present), None)
        console.rule(f"[bold]{task}: evaluation by lookup ({split or 'all'} split)")
        table = ActionTable.from_records(col.records, col.space, split)
        pols = standard_policies(table)
        wf, pc = col.workflow(), col.pool_config()
        probs = {p.id: p for p in col.problems()}
        prompts = [build_routing_prompt(wf, pc, probs[pid]) for pid in table.problem_ids]
        pols.update(router_policies(load_router(ckpt), table, prompts, name="haps-router"))
        rep = lookup_report(table, pols)
        rep["split"] = split or "all"
        rep["wall_s"] = time.perf_counter() - t0
        console.print(report_table(rep, f"{task}: evaluation by lookup, {split or 'all'} split"))
        write_json_atomic(folder / "report.json", rep)
    console.print(f"reports written under {root}/<task>/report.json")
