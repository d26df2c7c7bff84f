"""The `haps` command line. Each command group lives in its own module and registers on `app`."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="HAPS: hierarchical LLM routing.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (write JSON, print side-by-side ratios).")
app.add_typer(bench_app, name="bench")


def _register() -> None:
    # importing these modules registers their commands on `app` / `bench_app`
    from haps.cli import models as _models  # noqa: F401

    for mod in ("bench_lora", "run", "bench_episodes", "route", "serve", "demo"):
        try:
            __import__(f"haps.cli.{mod}")
        except ModuleNotFoundError as e:  # a command group not built yet
            if e.name != f"haps.cli.{mod}":
                raise


def main() -> None:
    _register()
    app()
