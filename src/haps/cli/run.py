"""`haps run`: run the episodes of one workflow for one fixed assignment and print a summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import typer
from pydantic import BaseModel, ConfigDict, Field

from haps.cli import app
from haps.cli.common import (
    WORKFLOW_HELP,
    build_config,
    check_out,
    config_opt,
    data_path,
    failed_episodes_line,
    field_help,
    options_opt,
    parse_options,
    report_failures,
    workflow_opt,
)


class RunConfig(BaseModel):
    """Everything `haps run` does (YAML via --config; options given on the command line win)."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(default="hotpotqa", description="Workflow: a name, a plugin or path/to/file.py:ClassName.")
    assign: str | dict[str, str] | None = Field(default=None, description="ROLE=MODEL pairs (text or a mapping); "
                                                "None: the pool's first model for every role.")
    data: str | None = Field(default=None, description="JSONL file or folder of problems (None: the demo set).")
    limit: int | None = Field(default=None, ge=1, description="Use the first N problems (with problem_seed: a "
                              "seeded spread-out subset of N).")
    problem_seed: int | None = Field(default=None, description="Seeded spread-out subset of `limit` problems (as "
                                     "`haps collect`, `haps rl` and `haps infer` take them).")
    split: Literal["train", "valid", "test"] | None = Field(default=None, description="Only this split of those "
                                                             "problems, cut as `haps collect` and `haps rl` cut it.")
    max_new_tokens: int = Field(default=128, ge=1, description="Tokens per model call.")
    temperature: float = Field(default=0.0, ge=0, description="0 = greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Seed for sampled decoding.")
    pool: str = Field(default="tiny", description="Built-in pool name or pool YAML file.")
    workflow_options: dict[str, Any] = Field(default_factory=dict, description="Options of the workflow.")
    out: str | None = Field(default=None, description="Episode log (JSONL, one line per episode, appended).")
    progress: bool = Field(default=True, description="Show a progress bar.")


def resolve_assignment(assign: str | dict[str, str] | None, roles, names: list[str]) -> dict[str, str]:
    """The assignment to run: parsed by the one assignment parser (a partial one is an error naming the
    missing roles); none given: the pool's first model for every role."""
    from haps.routing.space import parse_assignment

    if assign is None:
        return {r: names[0] for r in roles}
    text = ",".join(f"{r}={m}" for r, m in assign.items()) if isinstance(assign, dict) else assign
    return parse_assignment(text, roles, names, what="--assign")


@app.command("run")
def run(
    task: str = workflow_opt(field_help(RunConfig, "task", WORKFLOW_HELP)),
    assign: str = typer.Option(None, help="ROLE=MODEL pairs for every role, e.g. teacher=smollm2-135m,"
                               "student=gemma3-270m (none: the pool's first model for every role)."),
    data: Path = typer.Option(None, help="JSONL file or folder of problems (default: the embedded demo set)."),
    limit: int = typer.Option(None, min=1, help=field_help(RunConfig, "limit")),
    problem_seed: int = typer.Option(None, help=field_help(RunConfig, "problem_seed")),
    split: str = typer.Option(None, help=field_help(RunConfig, "split")),
    max_new_tokens: int = typer.Option(None, min=1, help=field_help(RunConfig, "max_new_tokens")),
    temperature: float = typer.Option(None, min=0.0, help=field_help(RunConfig, "temperature")),
    top_p: float = typer.Option(None, min=0.0, max=1.0, help=field_help(RunConfig, "top_p")),
    out: Path = typer.Option(None, help="Episode log (JSONL, one line per episode, appended)."),
    pool: str = typer.Option(None, help=field_help(RunConfig, "pool")),
    seed: int = typer.Option(None, help=field_help(RunConfig, "seed")),
    option: list[str] = options_opt(),
    config: Path = config_opt(),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Run episodes of a workflow for one assignment of models to roles; print score, parse failures, tokens, cost.

    Exits 1 when any episode failed (a model call errored): it has no score and is logged as failed."""
    from rich.console import Console
    from rich.table import Table

    from haps.config import load_pool
    from haps.data import load_problems
    from haps.models.pool import ModelPool
    from haps.workflows import EpisodeJob, Sampling, get_workflow, run_episodes, summarize

    cfg: RunConfig = build_config(RunConfig, config, {
        "task": task, "assign": assign, "data": str(data) if data else None, "limit": limit,
        "problem_seed": problem_seed, "split": split,
        "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed, "pool": pool,
        "workflow_options": parse_options(option), "out": str(out) if out else None, "progress": progress})
    workflow = get_workflow(cfg.task, **cfg.workflow_options)
    pool_cfg = load_pool(cfg.pool)
    assignment = resolve_assignment(cfg.assign, workflow.roles, pool_cfg.names)
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    problems = load_problems(cfg.task, data_path(cfg.data), cfg.limit, sample_seed=cfg.problem_seed)
    if cfg.split is not None:
        from haps.errors import ConfigError
        from haps.infer import split_of

        problems = split_of(problems, cfg.split, workflow)
        if not problems:
            raise ConfigError(f"the {cfg.split} split of these problems is empty; use more problems (--limit).")
    check_out(cfg.out)
    jobs = [EpisodeJob(p, assignment) for p in problems]
    t0 = time.perf_counter()
    results = run_episodes(ModelPool(pool_cfg), workflow, jobs, sampling=sampling, log_path=cfg.out, seed=cfg.seed,
                           progress=cfg.progress)
    s = summarize(results, time.perf_counter() - t0)

    con = Console()
    t = Table(title=f"haps run {workflow.name}: " + ", ".join(f"{r}={m}" for r, m in assignment.items()))
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("episodes", f"{s['episodes']}"),
        ("failed episodes (no score)", f"{s['failed']}"),
        (f"mean score ({workflow.metric})", "-" if s["score"] is None else f"{s['score']:.4f}"),
        ("exact match", "-" if s["em"] is None else f"{s['em']:.4f}"),
        ("parse failures / turns", f"{s['parse_failure_rate']:.1%} of {s['turns']}"),
        ("null predictions", f"{s['null_predictions']}"),
        ("tokens in / out", f"{s['tokens_in']} / {s['tokens_out']}"),
        ("cost (USD)", f"{s['cost']:.6f}"),
        ("wall time (s)", f"{s['wall_s']:.1f}"),
        ("episodes/s", f"{s['episodes_per_s']:.3f}"),
        ("tokens/s (generated)", f"{s['tokens_per_s']:.1f}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    con.print(t)
    if cfg.out is not None:
        con.print(f"episode log: {cfg.out}")
    report_failures([failed_episodes_line(s)])
