"""`haps route`: the routing prompt of one problem, P(z|p) over assignments and the router's choice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel, ConfigDict, Field

from haps.cli import app
from haps.cli.common import (
    build_config,
    config_opt,
    data_path,
    field_help,
    options_opt,
    parse_options,
    workflow_opt,
)


class RouteConfig(BaseModel):
    """Which problem `haps route` shows and which router decides."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(description="Workflow: a name, a plugin or path/to/file.py:ClassName.")
    problem_id: str | None = Field(default=None, description="Problem id (give this or index).")
    index: int | None = Field(default=None, ge=0, description="Problem index in the file (give this or problem_id).")
    data: str | None = Field(default=None, description="Problems file (None: the embedded demo set).")
    router: str = Field(default="random", description="CKPT | fixed:... | random.")
    pool: str = Field(default="tiny", description="Pool (its names and descriptions make the candidate list).")
    workflow_options: dict[str, Any] = Field(default_factory=dict, description="Options of the workflow.")


@app.command("route")
def route_cmd(
    task: str = workflow_opt(),
    problem_id: str = typer.Option(None, help=field_help(RouteConfig, "problem_id")),
    index: int = typer.Option(None, min=0, help=field_help(RouteConfig, "index")),
    data: str = typer.Option(None, help=field_help(RouteConfig, "data")),
    router: str = typer.Option(None, help=field_help(RouteConfig, "router")),
    pool: str = typer.Option(None, help=field_help(RouteConfig, "pool")),
    option: list[str] = options_opt(),
    config: Path = config_opt(),
) -> None:
    """Print the routing prompt, P(z|p) over assignments and the choice."""
    from rich.console import Console
    from rich.table import Table

    from haps.config import load_pool
    from haps.data import load_problems
    from haps.errors import ConfigError
    from haps.routers import get_router
    from haps.routing.prompt import build_routing_prompt, space_for
    from haps.workflows.loader import get_workflow

    cfg: RouteConfig = build_config(RouteConfig, config, {
        "task": task, "problem_id": problem_id, "index": index, "data": data, "router": router, "pool": pool,
        "workflow_options": parse_options(option)})
    if (cfg.problem_id is None) == (cfg.index is None):
        raise ConfigError("give exactly one of --problem-id or --index.")
    wf = get_workflow(cfg.task, **cfg.workflow_options)
    problems = load_problems(cfg.task, data_path(cfg.data))
    if cfg.index is not None:
        if cfg.index >= len(problems):
            raise ConfigError(f"--index {cfg.index} out of range: the file has {len(problems)} problems "
                              f"(0..{len(problems) - 1}).")
        prob = problems[cfg.index]
    else:
        found = [p for p in problems if p.id == cfg.problem_id]
        if not found:
            raise ConfigError(f"no problem with id {cfg.problem_id!r} in {cfg.data or 'the demo set'}; check the id "
                              "or pass --index.")
        prob = found[0]
    pc = load_pool(cfg.pool)
    space = space_for(wf, pc)
    r = get_router(f"high_level:{cfg.router}" if Path(cfg.router).is_dir() else cfg.router, space=space)
    prompt = build_routing_prompt(wf, pc, prob)
    c = Console()
    c.rule("system")
    c.print(prompt.system, markup=False)
    c.rule("user")
    c.print(prompt.user, markup=False)
    z = r.route([prompt])[0]
    t = Table(title=f"P(z|p) under {cfg.router}")
    t.add_column("z")
    t.add_column("assignment")
    t.add_column("P", justify="right")
    if r.enumerable:
        p = r.probs([prompt])[0]
        for j, zz in enumerate(space.assignments()):
            t.add_row(str(list(zz)), space.key(zz) + ("  <- choice" if zz == z else ""), f"{float(p[j]):.4f}")
        c.print(t)
    c.print(f"choice: {list(z)} = {space.to_names(z)}")
