"""`haps demo`: the main job end to end on the embedded pool and demo set.

For each task: collect the action-level data (every assignment of the pool's models to the roles, run
through the lockstep runner) -> warm-up set -> SFT of the high-level router -> evaluation by lookup on
the held-out split against the oracle, random and every fixed assignment. Resumable: a killed demo
started again reuses what it had collected.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console

from haps.cli import app


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output folder (one sub-folder per task)."),
    tasks: str = typer.Option("mmlu,hotpotqa", help="Comma-separated tasks."),
    pool: str = typer.Option("tiny", help="Built-in pool name or pool YAML."),
    data: str = typer.Option(None, help="JSONL file/folder instead of the embedded demo set (one task then)."),
    limit: int = typer.Option(8, help="Use the first N problems per task (the demo sets hold 20)."),
    max_new_tokens: int = typer.Option(32, help="Cap on tokens per model call."),
    epochs: int = typer.Option(4, help="SFT epochs of the high-level router."),
    seed: int = typer.Option(0),
) -> None:
    """Collect -> warm-up -> SFT the high-level router -> evaluate by lookup, on the demo set."""
    from haps.evaluate import ActionTable, lookup_report, report_table, router_policies, standard_policies
    from haps.routing.high_level import load_router
    from haps.routing.prompt import build_routing_prompt
    from haps.train.collect import CollectConfig, collect, open_collection
    from haps.train.sft import SFTConfig, run_sft

    console = Console()
    summary = {}
    for task in [t.strip() for t in tasks.split(",") if t.strip()]:
        t0 = time.perf_counter()
        folder = out / task
        opts = {"summaries": False, "budget": 2} if task == "hotpotqa" else {}
        cfg = CollectConfig(task=task, data=data, limit=limit, pool=pool, max_new_tokens=max_new_tokens,
                            workflow_options=opts, seed=seed)
        console.rule(f"[bold]{task}: collect every assignment")
        collect(cfg, folder / "actions")
        console.rule(f"[bold]{task}: SFT of the high-level router")
        ckpt = folder / "router"
        run_sft(folder / "actions", ckpt, SFTConfig(epochs=epochs, seed=seed))
        col = open_collection(folder / "actions")
        # the held-out test split; tiny runs (--limit) may leave it empty: then valid, then everything
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
        (folder / "report.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
        summary[task] = rep
    console.print(f"reports written under {out}/<task>/report.json")
