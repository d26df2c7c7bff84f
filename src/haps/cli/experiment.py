"""`haps experiment`: collect -> warm-up -> SFT -> RL -> baselines -> eval -> report for one config
(`haps.experiment`), resumable stage by stage."""

from __future__ import annotations

from pathlib import Path

import typer

from haps.cli import app
from haps.cli.common import check_out, report_failures


@app.command("experiment")
def experiment_cmd(
    config: Path = typer.Option(..., help="Experiment YAML (ExperimentConfig; see src/haps/configs/experiment_*.yaml)."),
    task: str = typer.Option(None, "--task", help="Run only this task of the config (comma-separated for several)."),
    data: str = typer.Option(None, help="Problems file of the task (with --task, or a one-task config), as given or "
                             "relative to $HAPS_DATA; replaces the config's."),
    out: Path = typer.Option(..., help="Experiment folder (runs/, results/, report/, stages.json); rerun the same "
                             "command to resume."),
) -> None:
    """The whole chain for a config: a stage table (done / to do, time estimate), then every stage not done.

    A stage whose output is complete is skipped, a partial one resumed; rerun the same command after an
    interruption. Episodes that failed (a model call errored) stop the experiment with exit status 1 and
    are retried by the next run."""
    from haps.experiment import load_experiment_config, run_experiment
    from haps.quiet import quiet_libraries

    quiet_libraries()
    cfg = load_experiment_config(config)
    check_out(out, folder=True)
    tasks = [t.strip() for t in task.split(",") if t.strip()] if task else None
    result = run_experiment(cfg, out, tasks=tasks, data=data)
    report_failures(result.failures)
