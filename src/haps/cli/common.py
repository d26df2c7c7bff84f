"""What every command shares: its config built from YAML plus the options given, workflow options, paths.

The pattern of a command::

    cfg = build_config(RunConfig, config, {"task": task, "limit": limit, ...})

Options default to None and only the ones given override the YAML file's values, which override the
config model's defaults: every default lives in one place, the pydantic model. Bounds are checked
where an option is parsed (typer ``min=``), so a bad value is reported with the option's name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

from haps.errors import ConfigError

WORKFLOW_HELP = ("Workflow: a registered name (hotpotqa, mmlu), an installed plugin, or "
                 "path/to/file.py:ClassName (see examples/custom_workflow.py).")
OPTION_HELP = "Workflow option KEY=VALUE, VALUE read as YAML (repeatable; e.g. -o budget=2 -o summaries=false)."
CONFIG_HELP = "YAML file of the command's config fields; options given on the command line win."

#: exit status of a command that ran but some of whose episodes failed (a model call errored; see
#: `report_failures`); user errors exit with `haps.cli.USER_ERROR` (2)
EPISODES_FAILED = 1


def field_help(model: type, name: str, text: str | None = None) -> str:
    """Help text of an option that sets ``model``'s field ``name``: the field's description (or ``text``)
    and the default it keeps when the option is left out, read from the model (stated once, there)."""
    f = model.model_fields[name]
    desc = text or f.description or ""
    default = f.get_default(call_default_factory=True)
    if default is None and ("None" in desc or "default" in desc):  # the description says what unset means
        return desc
    shown = "none" if default is None else ",".join(map(str, default)) if isinstance(default, list | tuple) else default
    return f"{desc} (default: {shown})".strip()


def workflow_opt(help: str = WORKFLOW_HELP) -> Any:
    """The ``--task/--workflow/-t`` option (same meaning under both names)."""
    return typer.Option(None, "--task", "--workflow", "-t", help=help)


def options_opt() -> Any:
    return typer.Option([], "--option", "-o", help=OPTION_HELP)


def config_opt() -> Any:
    return typer.Option(None, "--config", help=CONFIG_HELP)


def parse_options(items: list[str] | None, what: str = "--option") -> dict[str, Any]:
    """``["budget=2", "summaries=false"]`` -> ``{"budget": 2, "summaries": False}`` (values as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for it in items or []:
        key, sep, value = it.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} {it!r} must be KEY=VALUE (e.g. {what} budget=2).")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{what} {it!r}: the value is not valid YAML ({e}); quote it.") from None
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _given(d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` without None values (options not given), recursively; empty mappings dropped."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            v = _given(v)
            if not v:
                continue
        if v is not None:
            out[k] = v
    return out


def load_config_file(config: Path | None) -> dict[str, Any]:
    from haps.config import load_yaml

    return dict(load_yaml(config)) if config is not None else {}


def build_config(model: type, config: Path | dict[str, Any] | None, given: Mapping[str, Any]):
    """``model`` validated from the YAML file ``config`` (or a dict already read) with the options in
    ``given`` that are not None merged over it (nested mappings merged key by key)."""
    base = config if isinstance(config, dict) else load_config_file(config)
    return model.model_validate(_merge(base, _given(given)))


def per_task(cfg: dict[str, Any], task: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A config file may key some values by task (``limit: {hotpotqa: 36, mmlu: 24}``): pick ``task``'s."""
    out = dict(cfg)
    for k in keys:
        v = out.get(k)
        keyed = isinstance(v, dict) and (k != "workflow_options" or (v and all(isinstance(x, dict) for x in v.values())))
        if keyed:
            if task in v:
                out[k] = v[task]
            else:  # no value for this task: the config model's default
                del out[k]
    return out


def data_path(path: str | os.PathLike | None) -> str | None:
    """A data path as given, or relative to ``$HAPS_DATA`` when it does not exist as given."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        root = os.environ.get("HAPS_DATA")
        if root and (Path(root) / p).exists():
            return str(Path(root) / p)
    return str(p)


def check_out(path: str | os.PathLike | None, *, folder: bool = False, what: str = "--out") -> None:
    """Report an output path that cannot be written before anything is loaded."""
    if path is not None:
        from haps.files import check_writable

        check_writable(path, folder=folder, what=what)


def failed_episodes_line(summary: Mapping[str, Any]) -> str:
    """What `summarize` says about failed episodes, as one line (empty when none failed)."""
    if not summary.get("failed"):
        return ""
    models = ", ".join(f"{m}: {n}" for m, n in sorted(summary["failed_by_model"].items()))
    return (f"{summary['failed']} of {summary['episodes']} episodes failed ({models}) and have no score; first "
            f"error: {summary['first_error']}. The mean score is over the others; fix the cause and rerun.")


def report_failures(lines: list[str]) -> None:
    """Print ``lines`` (what failed and what to do) in red on stderr and exit with `EPISODES_FAILED`;
    nothing to report: return."""
    lines = [ln for ln in lines if ln]
    if not lines:
        return
    from rich.console import Console
    from rich.text import Text

    err = Console(stderr=True, soft_wrap=True, highlight=False)
    for ln in lines:
        err.print(Text(f"failed: {' '.join(ln.split())}", style="bold red"))
    raise typer.Exit(EPISODES_FAILED)
