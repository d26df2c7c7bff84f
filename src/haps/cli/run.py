"""`haps run`: run Teacher/Student episodes for one fixed assignment and print a summary."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from haps.cli import app
from haps.errors import ConfigError


def parse_assignment(text: str | None, roles: tuple[str, ...], names: list[str]) -> dict[str, str]:
    """``"teacher=A,student=B"`` -> {"teacher": "A", "student": "B"}; missing roles get the pool's first model."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ConfigError(f"--assign: expected ROLE=MODEL pairs separated by commas, got {part!r} "
                              f"(e.g. teacher={names[0]},student={names[-1]}).")
        role, model = (s.strip() for s in part.split("=", 1))
        if role not in roles:
            raise ConfigError(f"--assign: unknown role {role!r}; roles are {list(roles)}.")
        if model not in names:
            raise ConfigError(f"--assign: unknown model {model!r}; the pool has {names}.")
        out[role] = model
    for role in roles:
        out.setdefault(role, names[0])
    return out


@app.command("run")
def run(
    task: str = typer.Option("hotpotqa", help="Workflow: hotpotqa | mmlu."),
    assign: str = typer.Option(None, help="ROLE=MODEL pairs, e.g. teacher=smollm2-135m,student=gemma3-270m "
                               "(default: the pool's first model for every role)."),
    data: Path = typer.Option(None, help="JSONL file or folder of problems (default: the embedded demo set)."),
    limit: int = typer.Option(None, help="Use the first N problems."),
    max_new_tokens: int = typer.Option(128, help="Tokens per model call."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0),
    out: Path = typer.Option(None, help="Episode log (JSONL, one line per episode, appended)."),
    pool: str = typer.Option("tiny", help="Built-in pool name or pool YAML file."),
    seed: int = typer.Option(None, help="Seed for sampled decoding."),
    summaries: bool = typer.Option(True, help="hotpotqa: update running summaries every round (paper: on)."),
    budget: int = typer.Option(3, help="hotpotqa: search budget B."),
    top_k: int = typer.Option(1, help="hotpotqa: passages per search."),
    rounds: int = typer.Option(3, help="mmlu: at most K rounds."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Run episodes of TASK for one assignment of models to roles; print score, parse failures, tokens, cost."""
    from haps.config import load_pool
    from haps.data import load_problems
    from haps.models.pool import ModelPool
    from haps.workflows import EpisodeJob, Sampling, get_workflow, run_episodes, summarize

    options = {"budget": budget, "top_k": top_k, "summaries": summaries} if task == "hotpotqa" else {"rounds": rounds}
    workflow = get_workflow(task, **options)
    mp = ModelPool(load_pool(pool))
    assignment = parse_assignment(assign, workflow.roles, mp.names)
    problems = load_problems(task, data, limit)
    jobs = [EpisodeJob(p, assignment) for p in problems]
    sampling = Sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    results = run_episodes(mp, workflow, jobs, sampling=sampling, log_path=out, seed=seed, progress=progress)
    s = summarize(results, time.perf_counter() - t0)

    con = Console()
    t = Table(title=f"haps run {task}: " + ", ".join(f"{r}={m}" for r, m in assignment.items()))
    t.add_column("metric")
    t.add_column("value", justify="right")
    metric = "F1" if task == "hotpotqa" else "accuracy"
    rows = [
        ("episodes", f"{s['episodes']}"),
        (f"mean score ({metric})", f"{s['score']:.4f}"),
        ("exact match", f"{s['em']:.4f}"),
        ("parse failures / turns", f"{s['parse_failure_rate']:.1%} of {s['turns']}"),
        ("null predictions", f"{s['null_predictions']}"),
        ("tokens in / out", f"{s['tokens_in']} / {s['tokens_out']}"),
        ("cost (USD)", f"{s['cost']:.6f}"),
        ("wall time (s)", f"{s['wall_s']:.1f}"),
        ("episodes/s", f"{s['episodes_per_s']:.3f}"),
        ("tokens/s (generated)", f"{s['tokens_per_s']:.1f}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    con.print(t)
    if out is not None:
        con.print(f"episode log: {out}")
