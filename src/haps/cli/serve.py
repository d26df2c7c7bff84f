"""`haps serve`: an OpenAI-compatible server over the pool's local models."""

from __future__ import annotations

import typer
from rich.console import Console

from haps.cli import app


@app.command("serve")
def serve(
    pool: str = typer.Option("tiny", help="Built-in pool name or pool YAML file; its local models are served."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (default: loopback only)."),
    port: int = typer.Option(8000, help="TCP port to listen on."),
    max_batch_size: int = typer.Option(16, help="Most requests batched into one generate call per model."),
    batch_window_ms: float = typer.Option(5.0, help="How long a batch's first request waits for companions."),
    default_max_tokens: int = typer.Option(256, help="max_tokens of requests that give none."),
    max_tokens_limit: int = typer.Option(4096, help="The most tokens a request may ask for."),
    preload: bool = typer.Option(True, help="Load every local model before listening (else on first request)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Serve POST /v1/chat/completions and GET /v1/models (OpenAI-compatible, batched per model).

    Example: `haps serve --pool tiny --host 127.0.0.1 --port 8000`; then an `api` model with base_url
    http://127.0.0.1:8000/v1 and source set to a served model name talks to it.
    """
    import uvicorn

    from haps.config import load_pool
    from haps.models.pool import ModelPool
    from haps.serve import create_app

    console = Console(stderr=True)
    mp = ModelPool(load_pool(pool))
    application = create_app(mp, max_batch_size=max_batch_size, batch_window_ms=batch_window_ms,
                             default_max_tokens=default_max_tokens, max_tokens_limit=max_tokens_limit)
    names = application.state.served.names
    if preload:
        for name in names:
            with console.status(f"loading {name}"):
                mp.backend(name)
    console.print(f"serving {names} at http://{host}:{port}/v1")
    uvicorn.run(application, host=host, port=port, log_level=log_level)
