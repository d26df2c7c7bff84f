"""`haps models`: list the pool."""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from haps.cli import app
from haps.cli.common import build_config, config_opt, field_help


class ModelsConfig(BaseModel):
    """Which pool `haps models` lists."""

    model_config = ConfigDict(extra="forbid")
    pool: str = Field(default="tiny", description="Built-in pool name or pool YAML file.")
    load: bool = Field(default=True, description="Load local models to report layers, hidden size and o_proj shape.")


@app.command("models")
def models(
    pool: str = typer.Option(None, help=field_help(ModelsConfig, "pool")),
    load: bool = typer.Option(None, "--load/--no-load", help=field_help(ModelsConfig, "load")),
    config: Path = config_opt(),
) -> None:
    """List the pool: name, backend, open/closed, layers, hidden size, o_proj shape, prices."""
    from haps.config import load_pool
    from haps.models.pool import ModelPool

    opts: ModelsConfig = build_config(ModelsConfig, config, {"pool": pool, "load": load})
    cfg = load_pool(opts.pool)
    load = opts.load
    mp = ModelPool(cfg)
    t = Table(title=f"pool {cfg.name}")
    for col in ("name", "backend", "weights", "layers", "hidden", "o_proj (in->out)", "$/1M in", "$/1M out"):
        t.add_column(col)
    for spec in cfg.models:
        layers = hidden = oproj = "-"
        if load and spec.backend == "local":
            info = mp.backend(spec.name).info()
            layers, hidden, oproj = str(info.layers), str(info.hidden_size), f"{info.o_proj_in}->{info.o_proj_out}"
        t.add_row(spec.name, spec.backend, "open" if spec.open_weights else "closed", layers, hidden, oproj,
                  f"{spec.price_in:g}", f"{spec.price_out:g}")
    Console().print(t)
