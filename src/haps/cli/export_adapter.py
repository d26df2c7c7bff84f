"""`haps export-adapter`: the adapter generated for one problem and role, as a PEFT LoRA folder.

Pinned interface: ``haps export-adapter --router DIR --task T [--data F] --index I --role R --out PEFT_DIR``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from haps.cli import app
from haps.cli.common import check_out, data_path, workflow_opt


@app.command("export-adapter")
def export_adapter_cmd(
    router: Path = typer.Option(..., help="Hierarchical router folder (`haps rl` OUT/best)."),
    task: str = workflow_opt(),
    index: int = typer.Option(..., min=0, help="Problem index in the data file."),
    role: str = typer.Option(..., help="The role whose adapter to export (e.g. student)."),
    out: Path = typer.Option(..., help="PEFT adapter folder to write."),
    data: Path = typer.Option(None, help="Problems JSONL (default: the embedded demo set)."),
    pool: str = typer.Option(None, help="Pool (default: the one the router was trained on)."),
) -> None:
    """Route problem INDEX, generate its adapters and write ROLE's as a PEFT LoRA folder."""
    import torch
    from rich.console import Console

    from haps.config import load_pool
    from haps.data import load_problems
    from haps.errors import ConfigError
    from haps.export import write_peft_adapter
    from haps.models.sources import resolve
    from haps.routing.checkpoints import load_hierarchical, read_manifest
    from haps.routing.prompt import build_routing_prompt
    from haps.workflows import get_workflow

    workflow = get_workflow(task)
    if role not in workflow.roles:
        raise ConfigError(f"--role {role!r} is not a role of {workflow.name!r}; roles: {list(workflow.roles)}.")
    pool_cfg = load_pool(pool or read_manifest(router).get("meta", {}).get("pool", "tiny"))
    hier = load_hierarchical(router, pool_cfg, workflow.name)
    problems = load_problems(task, data_path(str(data)) if data else None)
    if index >= len(problems):
        raise ConfigError(f"--index {index} is out of range: the file has {len(problems)} problems (0-{len(problems) - 1}).")
    check_out(out, folder=True)
    with torch.no_grad():
        d = hier.decide([build_routing_prompt(workflow, pool_cfg, problems[index])], "argmax")[0]
    model = hier.space.to_names(d.assignment)[role]
    adapter = d.adapters[role]
    if adapter is None:
        raise ConfigError(f"problem {index}: role {role!r} is routed to {model!r}, a closed model: it has no "
                          "adapter to export; pick another role or problem.")
    spec = pool_cfg.get(model)
    write_peft_adapter(adapter, hier.sites[model], hier.target, resolve(spec).path, out)
    Console().print(f"{out}: the {role}'s adapter on {model} for problem {problems[index].id} "
                    f"(||alpha A B||_F = {d.norms[role]:.4g}); load it with PeftModel.from_pretrained")
