"""`haps eval`: every routing method on the same test problems, with intervals and router metrics
(`haps.evaluation`)."""

from __future__ import annotations

from pathlib import Path

import typer

from haps.cli import app
from haps.cli.common import build_config, check_out, config_opt, data_path, workflow_opt
from haps.evaluation.config import RewardKind, Scoring


@app.command("eval")
def eval_cmd(
    task: str = workflow_opt(),
    methods: list[str] = typer.Option(None, help="Comma-separated methods (repeatable): oracle, random, "
                                      "static:<role>=<model>,..., all-static, best_static, knn, routellm_mf, "
                                      "routellm_clf, graphrouter, irt (<name>:<CKPT> loads a saved one), sft:<CKPT>, "
                                      "haps[:<DIR>], haps-no-lora[:<DIR>]. Default: oracle, random, all-static and "
                                      "every baseline, plus haps with --router."),
    actions: Path = typer.Option(None, help="Action-level data folder (`haps collect --out`)."),
    router: str = typer.Option(None, help="HAPS checkpoint folder (adds the haps method when --methods is not "
                               "given)."),
    data: str = typer.Option(None, help="Problems file of the test problems, as given or relative to $HAPS_DATA "
                             "(default: the collection's test split); problems not in the action table are played."),
    out: Path = typer.Option(None, help="Output folder: summary.json, per_problem.jsonl, routers/, episodes/."),
    limit: int = typer.Option(None, min=1, help="Evaluate the first N test problems."),
    scoring: Scoring = typer.Option(None, help="auto (lookup where collected, real episodes otherwise), lookup "
                                    "(never play) or episodes (play every pick)."),
    reward: RewardKind = typer.Option(None, help="Reward (default: the kind the collection recorded); tradeoff = "
                                      "alpha * score - beta * normalised cost (normaliser fitted on train)."),
    alpha: float = typer.Option(None, help="tradeoff: weight of the performance term (paper: 0.8, 0.5, 0.2)."),
    beta: float = typer.Option(None, min=0.0, help="tradeoff: weight of the normalised cost (paper: 0.2, 0.5, 0.8)."),
    setting: str = typer.Option(None, help="Setting name recorded for `haps report` (default: the pool's name)."),
    n_boot: int = typer.Option(None, min=100, help="Bootstrap resamples (default 2000)."),
    seed: int = typer.Option(None, help="Seed of the bootstrap (default 0)."),
    config: Path = config_opt(),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Compare routing methods on the test problems: score and reward with 95% bootstrap intervals, paired
    differences against HAPS and the best static assignment, cost, selection, APGR / CPT(50%), AIQ and the
    gap to the oracle."""
    from rich.console import Console

    from haps.evaluation.config import DEFAULT_METHODS, EvalConfig
    from haps.evaluation.run import PER_PROBLEM, SUMMARY, run_eval
    from haps.evaluation.summary import tables

    given = {"task": task, "actions": str(actions) if actions else None, "router": router,
             "data": data_path(data), "out": str(out) if out else None, "limit": limit, "scoring": scoring,
             "reward": reward, "alpha": alpha, "beta": beta, "setting": setting, "n_boot": n_boot, "seed": seed,
             "methods": list(methods) if methods else None}
    cfg = build_config(EvalConfig, config, given)
    if not methods and "methods" not in cfg.model_fields_set and cfg.router:
        cfg.methods = [*DEFAULT_METHODS, "haps"]
    check_out(cfg.out, folder=True)
    console = Console()
    summary = run_eval(cfg, progress=progress, log=lambda s: console.print(f"[dim]{s}[/]"))
    for t in tables(summary):
        console.print(t)
    scored = {s for m in summary["methods"].values() for s in m["sources"]}
    how = " and ".join(f"{'lookup in the action table' if s == 'lookup' else 'real episodes'}"
                     for s in ("lookup", "episodes") if s in scored)
    console.print(f"scored by {how or 'nothing'}; {summary['episodes_played']} episodes played. Wrote "
                  f"{Path(cfg.out) / SUMMARY} and {Path(cfg.out) / PER_PROBLEM}.")
    failed = {m["label"]: m["failed"] for m in summary["methods"].values() if m["failed"]}
    missing = {m["label"]: m["missing"] for m in summary["methods"].values() if m["missing"]}
    if failed:
        console.print("[yellow]failed episodes (never scored, counted in 'fail'): "
                      + ", ".join(f"{k} {v}" for k, v in failed.items()) + "[/]")
    if missing:
        console.print("[yellow]picks the action table lacks (scoring lookup; counted in 'fail'): "
                      + ", ".join(f"{k} {v}" for k, v in missing.items()) + "; rerun with --scoring auto to play "
                      "them[/]")
