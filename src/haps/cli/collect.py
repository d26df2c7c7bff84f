"""`haps collect`: action-level data, every assignment for every problem (`haps.train.collect`)."""

from __future__ import annotations

from pathlib import Path

import typer

from haps.cli import app
from haps.cli.common import (
    WORKFLOW_HELP,
    build_config,
    check_out,
    config_opt,
    data_path,
    field_help,
    load_config_file,
    options_opt,
    parse_options,
    per_task,
    report_failures,
    workflow_opt,
)
from haps.train.collect import CollectConfig

#: config values a YAML file may key by task (see src/haps/configs/collect_tiny.yaml)
PER_TASK = ("data", "limit", "max_new_tokens", "chunk_size", "workflow_options")


@app.command("collect")
def collect_cmd(
    task: str = workflow_opt(WORKFLOW_HELP + " Required here (or task in --config)."),
    out: Path = typer.Option(..., help="Output folder (actions.jsonl, manifest.json, episodes/)."),
    data: str = typer.Option(None, help="Problems JSONL file or folder, as given or relative to $HAPS_DATA "
                             "(default: the embedded demo set)."),
    limit: int = typer.Option(None, min=1, help=field_help(CollectConfig, "limit")),
    pool: str = typer.Option(None, help=field_help(CollectConfig, "pool")),
    config: Path = config_opt(),
    max_new_tokens: int = typer.Option(None, min=1, help=field_help(CollectConfig, "max_new_tokens")),
    sample: int = typer.Option(None, min=1, help=field_help(CollectConfig, "sample")),
    max_enumerate: int = typer.Option(None, min=1, help=field_help(CollectConfig, "max_enumerate")),
    seed: int = typer.Option(None, help=field_help(CollectConfig, "seed")),
    chunk_size: int = typer.Option(None, min=1, help=field_help(CollectConfig, "chunk_size", "Problems per lockstep "
                                   "runner call (may change on resume).")),
    max_attempts: int = typer.Option(None, min=1, help=field_help(CollectConfig, "max_attempts", "Runs that may try "
                                     "a (problem, assignment) whose episode fails (may change on resume: raise it to "
                                     "retry ones out of attempts).")),
    share_tree: bool = typer.Option(None, "--share-tree/--no-share-tree", help=field_help(
        CollectConfig, "share_tree", "Run the shared prefixes of each problem's episode tree once (greedy decoding: "
        "the same records; may change on resume); --no-share-tree runs every episode on its own.")),
    option: list[str] = options_opt(),
    profile: str = typer.Option(None, help="default | paper: the paper's protocol (strict parsing, HotpotQA's null "
                                "answer, 256 tokens, 3,000/1,000/100 problems, Table 4 prices per composition) under "
                                "the --config file and the options given (haps.profiles; also `profile:` in the "
                                "file)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Run every assignment for every problem and record r(p, z) (resumable: rerun the same command).

    An episode whose model call failed (e.g. an API endpoint down) records nothing: it is logged in
    DIR/failures.jsonl and retried by the next run, up to --max-attempts; the command then exits 1."""
    from rich.console import Console

    from haps.errors import ConfigError
    from haps.profiles import check, collect_overrides, composition_prices, merge
    from haps.train.collect import collect

    base = load_config_file(config)
    base.pop("notes", None)
    profile = check(profile or base.pop("profile", "default"))
    base.pop("profile", None)
    task = task or base.get("task")
    if not task:
        raise ConfigError("no workflow given: pass --task NAME (or --workflow path/to/file.py:ClassName), or set "
                          "task in the --config file.")
    cfg = build_config(CollectConfig, merge(collect_overrides(profile, task), per_task(base, task, PER_TASK)), {
        "task": task, "data": data, "limit": limit, "pool": pool, "max_new_tokens": max_new_tokens,
        "sample": sample, "max_enumerate": max_enumerate, "seed": seed, "chunk_size": chunk_size,
        "max_attempts": max_attempts, "share_tree": share_tree, "workflow_options": parse_options(option)})
    if cfg.data:
        cfg.data = data_path(cfg.data)
    check_out(out, folder=True)
    pool_obj = None
    if profile != "default":  # the profile's prices per composition on the named pool
        from haps.config import load_pool
        from haps.models.pool import ModelPool

        pc = load_pool(cfg.pool)
        if not pc.composition_prices:
            pc = pc.model_copy(update={"composition_prices": composition_prices(profile, pc.names)})
        pool_obj = ModelPool(pc)
    s = collect(cfg, out, pool=pool_obj, progress=progress, require_splits=True)
    Console().print(f"[bold]{s.out}[/]: {s.total} (problem, assignment) pairs, {s.done_before} already done, "
                    f"{s.written} written, {s.failed} failed in {s.seconds:.1f}s ({s.episodes_per_s:.3f} episodes/s)"
                    + (f"; repaired a torn last line ({s.repaired_bytes} bytes)" if s.repaired_bytes else ""))
    report_failures([s.failure_summary() or "", *s.capped_lines()])
