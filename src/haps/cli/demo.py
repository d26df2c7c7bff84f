"""`haps demo`: the product end to end on the embedded pool and demo sets (`make demo`).

For each task, a small `haps experiment` (collect every assignment -> warm-up -> SFT -> a few RL updates ->
baselines -> eval; resumable: a demo started again reuses what it finished), then for one test problem the
hierarchical router's decision (P(z|p) over the assignments), the adapters it generates for the chosen
models (||alpha A B||_F) and the episode they play, and the comparison table of every method with its 95%
interval. Stage output goes to ``OUT/demo.log``; the terminal gets the story, 80 columns wide.
"""

from __future__ import annotations

import contextlib
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel, ConfigDict, Field

from haps.cli import app
from haps.cli.common import build_config, check_out, config_opt, field_help, report_failures

WIDTH = 80


class DemoConfig(BaseModel):
    """Sizes of the demo (YAML via --config; options given on the command line win)."""

    model_config = ConfigDict(extra="forbid")
    out: str = Field(default="runs/demo", description="Output folder (a haps experiment folder).")
    tasks: list[str] = Field(default_factory=lambda: ["mmlu", "hotpotqa"], description="Workflows, in order.")
    pool: str = Field(default="tiny", description="Built-in pool name or pool YAML.")
    data: str | None = Field(default=None, description="JSONL file/folder instead of the demo set (one task then).")
    limit: int = Field(default=6, ge=4, description="Problems per task (the demo sets hold 20; split 3 train / 1 "
                       "valid / 2 test for 6).")
    max_new_tokens: int = Field(default=24, ge=1, description="Cap on tokens per model call.")
    epochs: int = Field(default=2, ge=1, description="SFT epochs of the high-level router.")
    rl_steps: int = Field(default=2, ge=1, description="RL updates (one episode each) of the hierarchical router.")
    seed: int = Field(default=0, description="Seed of collection, SFT and RL.")
    workflow_options: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"mmlu": {"rounds": 2}, "hotpotqa": {"summaries": False, "budget": 1,
                                                                      "passage_chars": 300}},
        description="Workflow options per task (small: MMLU 2 rounds; HotpotQA one search, no summary calls).")


def experiment_config(cfg: DemoConfig):
    """The `haps experiment` config the demo runs."""
    from haps.experiment import ExperimentConfig

    return ExperimentConfig.model_validate({
        "tasks": cfg.tasks, "settings": {"demo": {"pool": cfg.pool}},
        "collect": {"data": cfg.data, "limit": cfg.limit, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
                    "split_fractions": [0.5, 0.2, 0.3], "stratify": False, "chunk_size": cfg.limit,
                    "workflow_options": {t: cfg.workflow_options.get(t, {}) for t in cfg.tasks}},
        "sft": {"epochs": cfg.epochs, "seed": cfg.seed, "batch_size": 2},
        "rl": {"batch_size": 1, "max_new_tokens": cfg.max_new_tokens, "valid_limit": 1,
               "validate_every": cfg.rl_steps, "seed": cfg.seed},
        "rl_steps": cfg.rl_steps, "variants": ["full"],
        "eval": {"n_boot": 1000, "sweep_points": 11},
    })


@app.command("demo")
def demo(
    out: Path = typer.Option(None, help=field_help(DemoConfig, "out")),
    tasks: str = typer.Option(None, help=field_help(DemoConfig, "tasks")),
    pool: str = typer.Option(None, help=field_help(DemoConfig, "pool")),
    data: str = typer.Option(None, help=field_help(DemoConfig, "data")),
    limit: int = typer.Option(None, min=4, help=field_help(DemoConfig, "limit")),
    max_new_tokens: int = typer.Option(None, min=1, help=field_help(DemoConfig, "max_new_tokens")),
    epochs: int = typer.Option(None, min=1, help=field_help(DemoConfig, "epochs")),
    rl_steps: int = typer.Option(None, min=1, help=field_help(DemoConfig, "rl_steps")),
    seed: int = typer.Option(None, help=field_help(DemoConfig, "seed")),
    config: Path = config_opt(),
) -> None:
    """Collect -> SFT -> RL -> baselines -> eval on the demo set; then one problem's routing, adapters and
    episode, and the comparison of every method."""
    from rich.console import Console

    from haps.errors import ConfigError
    from haps.experiment import run_experiment
    from haps.quiet import quiet_libraries

    quiet_libraries()
    cfg: DemoConfig = build_config(DemoConfig, config, {
        "out": str(out) if out else None, "tasks": [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
        "pool": pool, "data": data, "limit": limit, "max_new_tokens": max_new_tokens, "epochs": epochs,
        "rl_steps": rl_steps, "seed": seed})
    if cfg.data and len(cfg.tasks) != 1:
        raise ConfigError(f"--data holds one task's problems; pass --tasks with one of {cfg.tasks}.")
    root = Path(cfg.out)
    check_out(root, folder=True)
    term = Console(file=sys.stdout, width=min(WIDTH, Console().width), highlight=False)
    exp = experiment_config(cfg)
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "demo.log"
    term.print(f"[bold]haps demo[/]: {', '.join(cfg.tasks)} on the {cfg.pool!r} pool, {cfg.limit} problems per task "
               f"(stage output: {log_path})")
    status: dict[str, Any] = {}

    def on_stage(stage, event, seconds):
        if event == "start":
            status["live"] = term.status(f"{stage.id} ...")
            status["live"].start()
        else:
            status.pop("live").stop()
            term.print(f"  {stage.id:<34} done in {seconds:5.0f} s")

    failures: list[str] = []
    for task in cfg.tasks:
        term.rule(f"[bold]{task}[/]")
        with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            log_console = Console(file=log, width=100)
            try:
                result = run_experiment(exp, root, tasks=[task], progress=False, console=log_console,
                                        on_stage=on_stage)
            finally:
                if "live" in status:
                    status.pop("live").stop()
        done = [sid for sid, _ in result.ran]
        if not done:
            term.print("  every stage was done already (delete the folder to start over)")
        if result.failures:
            failures += result.failures
            break
        show_task(term, root, task, "demo")
    if not failures:
        term.rule()
        term.print(f"report: {root / 'report' / 'report.html'}; every stage's output: {log_path}")
        term.print("At this size (a handful of problems, tiny models) the intervals are wide and the "
                   "differences between methods mean little: the demo shows the pipeline, not routing skill.")
    report_failures(failures)


# ---------------------------------------------------------------------------------------------- the showcase
def _clip(text: str, width: int = WIDTH - 6, lines: int = 2) -> str:
    flat = " ".join(str(text).split())
    wrapped = textwrap.wrap(flat, width) or [""]
    return "\n".join(wrapped[:lines]) + (" ..." if len(wrapped) > lines else "")


def show_task(term, root: Path, task: str, setting: str) -> None:
    """One test problem: P(z|p), the generated adapters, the episode; then the comparison table."""
    from rich import box
    from rich.table import Table

    from haps.evaluation.summary import tables
    from haps.labels import Labeler
    from haps.routing.checkpoints import load_hierarchical
    from haps.routing.prompt import build_routing_prompt
    from haps.train.collect import open_collection

    results = root / "results" / task / setting
    summary = json.loads((results / "summary.json").read_text())
    col = open_collection(root / "runs" / task / setting / "actions")
    space, labeler = col.space, Labeler(col.space)
    episodes = [json.loads(x) for x in (results / "episodes" / "haps.jsonl").read_text().splitlines() if x.strip()]
    problems = {p.id: p for p in col.problems()}
    ep = episodes[0]
    problem = problems[str(ep["id"])]
    wf, pool_cfg = col.workflow(), col.pool_config()
    router = load_hierarchical(root / "runs" / task / setting / "rl" / "full" / "best", pool_cfg, wf.name)
    router.train_mode(False)
    import torch

    with torch.no_grad():
        dec = router.decide([build_routing_prompt(wf, pool_cfg, problem)], "argmax", adapters=True)[0]

    term.print(f"[bold]one test problem[/] ({problem.id}):")
    term.print(textwrap.indent(_clip(wf.problem_text(problem), lines=6), "  "), markup=False)
    t = Table(title="routing decision P(z|p) (hierarchical router after SFT + RL)", box=box.SIMPLE_HEAD,
              title_justify="left", pad_edge=False)
    t.add_column("assignment")
    t.add_column("P(z|p)", justify="right")
    t.add_column("")
    for j, z in enumerate(space.assignments()):
        t.add_row(labeler.assignment(space.key(z)), f"{float(dec.probs[j]):.3f}",
                  "<- chosen" if tuple(z) == tuple(dec.assignment) else "")
    term.print(t)
    a = Table(title=f"generated adapters (LoRA r={router.target.rank} on {router.target.module_name}, last "
              f"{router.target.last_k_layers} layer(s), alpha={router.target.alpha})", box=box.SIMPLE_HEAD,
              title_justify="left", pad_edge=False)
    for c, j in (("role", "left"), ("model", "left"), ("||alpha A B||_F", "right")):
        a.add_column(c, justify=j)
    names = space.to_names(dec.assignment)
    for role in space.roles:
        n = dec.norms.get(role)
        a.add_row(role, names[role], "closed model: none" if n is None else f"{n:.3e}")
    term.print(a)
    term.print(f"[bold]episode[/] ({labeler.assignment(space.key(dec.assignment))}, greedy, adapters injected):")
    for turn in ep["turns"]:
        norm = turn.get("adapter_norm")
        head = (f"  {turn['role']} r{turn['round']} {turn['kind']} on {labeler.models.get(turn['model'], turn['model'])}"
                + (f" (adapter {norm:.2e})" if norm is not None else ""))
        term.print(head + (f": {turn['action']}" if turn.get("action") else ""), markup=False)
        term.print(textwrap.indent(_clip(turn["output"]), "      "), markup=False, style="dim")
    score = ep.get("score")
    term.print(f"  prediction {ep.get('prediction')!r}, gold {ep.get('gold')!r}, {wf.metric} "
               f"{'-' if score is None else f'{score:.2f}'}", markup=False)
    term.print(tables(summary)[0])
