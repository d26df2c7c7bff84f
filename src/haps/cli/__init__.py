"""The `haps` command line. Each command lives in a module named after it and registers on `app`.

Every command builds one pydantic config (YAML via ``--config``, options given on the command line
win; see `haps.cli.common`). A user error (a `HapsError`, an invalid config, a bad option) prints one
red line naming the problem and the fix and exits with status 2; ``haps --debug COMMAND ...`` shows
the traceback instead.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="HAPS: hierarchical LLM routing.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (write JSON, print side-by-side ratios).")
app.add_typer(bench_app, name="bench")

#: the command modules; importing one registers its commands on `app` / `bench_app`
COMMANDS = ("models", "run", "collect", "warmup", "sft", "eval_lookup", "eval", "report", "route", "rl", "infer",
            "export_adapter", "serve", "demo", "bench_lora", "bench_episodes", "bench_rl",
            "bench_collect", "experiment", "bench_serve", "episode_stats")

USER_ERROR = 2  # exit status of every user error (as for bad options)


@dataclass
class CliState:
    """What the root options set for the rest of the run (passed as the click context's ``obj``)."""

    debug: bool = False


@app.callback()
def _root(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error instead of one line.")
          ) -> None:
    if isinstance(ctx.obj, CliState):
        ctx.obj.debug = debug


def _register() -> None:
    for name in COMMANDS:
        importlib.import_module(f"haps.cli.{name}")


def error_line(e: BaseException) -> str:
    """One line naming the problem and the fix."""
    from pydantic import ValidationError

    from haps.config import validation_message

    if isinstance(e, ValidationError):
        text = (f"invalid {e.title} settings: {validation_message(e)}. Fix the value in the --config file or "
                "pass the matching option")
    else:
        text = str(e)
    return " ".join(text.split())


def _print_error(text: str) -> None:
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, soft_wrap=True, highlight=False).print(Text(f"error: {text}", style="bold red"))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``haps`` script (and ``python -m haps``)."""
    from pydantic import ValidationError

    from haps.errors import HapsError

    _register()
    state = CliState()
    try:
        rv = app(args=list(argv) if argv is not None else None, prog_name="haps", standalone_mode=False, obj=state)
    except typer.TyperException as e:  # bad or missing options, unknown command (click's usage errors)
        text = " ".join(e.format_message().split())
        if text:  # (empty when the help was shown instead)
            ctx = getattr(e, "ctx", None)
            path = ctx.command_path if ctx is not None else "haps"
            _print_error(f"{text} (see `{path} --help`)")
        sys.exit(getattr(e, "exit_code", USER_ERROR))
    except (HapsError, ValidationError) as e:
        if state.debug:
            raise
        _print_error(error_line(e))
        sys.exit(USER_ERROR)
    sys.exit(rv if isinstance(rv, int) else 0)
