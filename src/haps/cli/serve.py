"""`haps serve`: an OpenAI-compatible server over the pool's local models (`haps.serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer
from pydantic import BaseModel, ConfigDict, Field

from haps.cli import app
from haps.cli.common import build_config, config_opt, field_help

LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


class ServeConfig(BaseModel):
    """Where `haps serve` listens and over which pool; batching fields left None keep `create_app`'s defaults."""

    model_config = ConfigDict(extra="forbid")
    pool: str = Field(default="tiny", description="Built-in pool name or pool YAML file; its local models are served.")
    host: str = Field(default="127.0.0.1", description="Interface to bind (127.0.0.1: loopback only).")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on.")
    max_batch_size: int | None = Field(default=None, ge=1, description="Most requests per generate call.")
    batch_window_ms: float | None = Field(default=None, ge=0, description="How long a batch's first request "
                                          "waits for companions.")
    default_max_tokens: int | None = Field(default=None, ge=1, description="max_tokens of requests that give none.")
    max_tokens_limit: int | None = Field(default=None, ge=1, description="The most tokens a request may ask for.")
    preload: bool = Field(default=True, description="Load every local model before listening.")
    log_level: LogLevel = Field(default="info", description="uvicorn log level.")


@app.command("serve")
def serve(
    pool: str = typer.Option(None, help=field_help(ServeConfig, "pool")),
    host: str = typer.Option(None, help=field_help(ServeConfig, "host")),
    port: int = typer.Option(None, min=0, max=65535, help=field_help(ServeConfig, "port")),
    max_batch_size: int = typer.Option(None, min=1, help="Most requests batched into one generate call per model (default: haps.serve.create_app's)."),
    batch_window_ms: float = typer.Option(None, min=0.0, help="How long a batch's first request waits for companions, ms (default: haps.serve.create_app's)."),
    default_max_tokens: int = typer.Option(None, min=1, help="max_tokens of requests that give none (default: haps.serve.create_app's)."),
    max_tokens_limit: int = typer.Option(None, min=1, help="The most tokens a request may ask for (default: haps.serve.create_app's)."),
    preload: bool = typer.Option(None, "--preload/--no-preload", help=field_help(ServeConfig, "preload")),
    log_level: LogLevel = typer.Option(None, help=field_help(ServeConfig, "log_level")),
    config: Path = config_opt(),
) -> None:
    """Serve POST /v1/chat/completions and GET /v1/models (OpenAI-compatible, batched per model).

    Example: `haps serve --pool tiny --host 127.0.0.1 --port 8000`; then an `api` model with base_url
    http://127.0.0.1:8000/v1 and source set to a served model name talks to it.
    """
    import uvicorn
    from rich.console import Console

    from haps.config import load_pool
    from haps.models.pool import ModelPool
    from haps.serve import create_app

    cfg: ServeConfig = build_config(ServeConfig, config, {
        "pool": pool, "host": host, "port": port, "max_batch_size": max_batch_size, "batch_window_ms": batch_window_ms,
        "default_max_tokens": default_max_tokens, "max_tokens_limit": max_tokens_limit, "preload": preload,
        "log_level": log_level})
    console = Console(stderr=True)
    mp = ModelPool(load_pool(cfg.pool))
    batching = {k: getattr(cfg, k) for k in ("max_batch_size", "batch_window_ms", "default_max_tokens",
                                            "max_tokens_limit") if getattr(cfg, k) is not None}
    application = create_app(mp, **batching)
    names = application.state.served.names
    if cfg.preload:
        for name in names:
            with console.status(f"loading {name}"):
                mp.backend(name)
    console.print(f"serving {names} at http://{cfg.host}:{cfg.port}/v1")
    uvicorn.run(application, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
