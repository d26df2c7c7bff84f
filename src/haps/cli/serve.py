"""`haps serve`: the OpenAI-compatible routing server (`haps.serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer
from pydantic import Field

from haps.cli import app
from haps.cli.common import build_config, config_opt, field_help
from haps.serve.settings import ServeSettings

LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


class ServeConfig(ServeSettings):
    """Where `haps serve` listens, over which pool and router; the rest are `ServeSettings` (batching, limits)."""

    pool: str | None = Field(default=None, description="Built-in pool name or pool YAML file (None: the pool the "
                             "router checkpoint names, else tiny).")
    router: str | None = Field(default=None, description="Router checkpoint folder (`haps rl` or `haps sft`); None: "
                               "the untrained backbone with fresh adapter heads (a warning says so).")
    host: str = Field(default="127.0.0.1", description="Interface to bind (127.0.0.1: loopback only).")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on.")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the bearer token "
                                    "clients must send (None: no authentication).")
    shutdown_timeout_s: float = Field(default=120.0, gt=0, description="On SIGTERM/SIGINT, how long requests in "
                                      "flight may take to finish.")
    log_level: LogLevel = Field(default="info", description="Log level (uvicorn's and haps').")


def _check(cfg: ServeConfig):
    """Everything that can be wrong before a model loads: the pool, the router's manifest against it, the
    keys' environment variables, the workflows. Returns (pool, api_key)."""
    import os

    from haps.api import as_pool, checkpoint_pool
    from haps.errors import ConfigError
    from haps.routing.checkpoints import check_pool, read_manifest
    from haps.workflows import load_workflow_class

    pool = as_pool(cfg.pool or checkpoint_pool(cfg.router) or "tiny")
    if cfg.router is not None:
        check_pool(read_manifest(cfg.router), pool, cfg.router)
    for spec in pool.config.models:
        if spec.api_key_env and not os.environ.get(spec.api_key_env):
            raise ConfigError(f"model {spec.name!r} reads its API key from the environment variable "
                              f"{spec.api_key_env!r}, which is not set; export it before `haps serve`.")
    if cfg.routing:
        for w in cfg.workflows:
            load_workflow_class(w)
    api_key = None
    if cfg.api_key_env is not None:
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env {cfg.api_key_env}: that environment variable is not set or empty; "
                              f"export {cfg.api_key_env}=<token> (clients send it as 'Authorization: Bearer <token>').")
    return pool, api_key


@app.command("serve")
def serve(
    router: str = typer.Option(None, help=field_help(ServeConfig, "router")),
    pool: str = typer.Option(None, help=field_help(ServeConfig, "pool")),
    host: str = typer.Option(None, help=field_help(ServeConfig, "host")),
    port: int = typer.Option(None, min=0, max=65535, help=field_help(ServeConfig, "port")),
    api_key_env: str = typer.Option(None, help=field_help(ServeConfig, "api_key_env")),
    routing: bool = typer.Option(None, "--routing/--no-routing", help=field_help(ServeConfig, "routing")),
    batching: bool = typer.Option(None, "--batching/--no-batching", help=field_help(ServeConfig, "batching")),
    batch_window_ms: float = typer.Option(None, min=0.0, max=10_000.0, help=field_help(ServeConfig, "batch_window_ms")),
    max_batch_size: int = typer.Option(None, min=1, help=field_help(ServeConfig, "max_batch_size")),
    router_batch_size: int = typer.Option(None, min=1, help=field_help(ServeConfig, "router_batch_size")),
    router_dtype: str = typer.Option(None, help=field_help(ServeConfig, "router_dtype")),
    default_max_tokens: int = typer.Option(None, min=1, help=field_help(ServeConfig, "default_max_tokens")),
    max_tokens_limit: int = typer.Option(None, min=1, help=field_help(ServeConfig, "max_tokens_limit")),
    max_prompt_tokens: int = typer.Option(None, min=1, help=field_help(ServeConfig, "max_prompt_tokens")),
    max_messages: int = typer.Option(None, min=1, help=field_help(ServeConfig, "max_messages")),
    max_body_bytes: int = typer.Option(None, min=1024, help=field_help(ServeConfig, "max_body_bytes")),
    workflow: list[str] = typer.Option(None, "--workflow", help="A workflow served as haps/<name> (repeatable; "
                                       "default: mmlu and hotpotqa)."),
    default_workflow: str = typer.Option(None, help=field_help(ServeConfig, "default_workflow")),
    answer_role: str = typer.Option(None, help=field_help(ServeConfig, "answer_role")),
    shutdown_timeout_s: float = typer.Option(None, min=0.001, help=field_help(ServeConfig, "shutdown_timeout_s")),
    log_level: LogLevel = typer.Option(None, help=field_help(ServeConfig, "log_level")),
    config: Path = config_opt(),
) -> int:
    """Serve the OpenAI-compatible API: `haps` (routed, with a generated adapter), `haps/<workflow>` (a whole
    workflow) and the pool's models by name; POST /v1/route, GET /v1/models, /health, /metrics.

    Example: `haps serve --router runs/haps-mmlu --port 8000`, then any OpenAI client with
    base_url http://127.0.0.1:8000/v1 and model "haps".
    """
    import logging

    import uvicorn
    from rich.console import Console

    from haps.api import UNTRAINED
    from haps.serve import create_app

    cfg: ServeConfig = build_config(ServeConfig, config, {
        "router": router, "pool": pool, "host": host, "port": port, "api_key_env": api_key_env, "routing": routing,
        "batching": batching, "batch_window_ms": batch_window_ms, "max_batch_size": max_batch_size,
        "router_batch_size": router_batch_size, "router_dtype": router_dtype, "default_max_tokens": default_max_tokens,
        "max_tokens_limit": max_tokens_limit, "max_prompt_tokens": max_prompt_tokens, "max_messages": max_messages,
        "max_body_bytes": max_body_bytes, "workflows": workflow or None, "default_workflow": default_workflow,
        "answer_role": answer_role, "shutdown_timeout_s": shutdown_timeout_s, "log_level": log_level})
    console = Console(stderr=True)
    mp, api_key = _check(cfg)
    settings = ServeSettings.model_validate(cfg.model_dump(include=set(ServeSettings.model_fields)))
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    haps_log = logging.getLogger("haps")
    haps_log.addHandler(handler)
    haps_log.setLevel(cfg.log_level.upper() if cfg.log_level != "trace" else "DEBUG")
    haps_log.propagate = False
    if cfg.routing and cfg.router is None:
        console.print(f"[yellow]warning: {UNTRAINED}[/yellow]")
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning: listening on {cfg.host}, reachable from other machines"
                      + ("" if api_key else "; no --api-key-env: anyone who can reach it can use it") + "[/yellow]")
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_error(e: BaseException) -> None:
        failed.append(e)
        if server is not None:
            server.should_exit = True

    application = create_app(mp, router=cfg.router if cfg.routing else False, settings=settings, api_key=api_key,
                             on_load_error=on_load_error)
    server = uvicorn.Server(uvicorn.Config(application, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                                           timeout_graceful_shutdown=cfg.shutdown_timeout_s))
    console.print(f"serving {application.state.service.served_models()} at http://{cfg.host}:{cfg.port}/v1 "
                  "(GET /health says when the models are loaded)")
    server.run()
    if failed:
        from haps.cli import error_line

        console.print(f"[bold red]error: loading failed: {error_line(failed[0])}[/bold red]")
        return 1
    return 0
