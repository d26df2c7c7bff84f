"""`haps episode-stats`: what episode logs show, side by side, and paired differences against the first.

``haps episode-stats NAME=LOG.jsonl [NAME=LOG.jsonl ...] [--json F]``: per log (`haps run` / `haps infer` /
`haps rl`'s test episodes) the mean score with its 95% bootstrap interval, failed episodes, parse failures,
null predictions, the predicted answers, the selection and the spread of adapter norms across problems
(`haps.evaluation.episode_stats`); each later log also against the first: mean(score - first) on the
problems both ran, its interval and P(> 0).
"""

from __future__ import annotations

from pathlib import Path

import typer

from haps.cli import app


def _named(spec: str) -> tuple[str, Path]:
    from haps.errors import ConfigError

    name, sep, path = spec.rpartition("=")  # names may hold "=" (T=gemma3 S=gemma3=LOG)
    if not sep:
        name, path = Path(spec).stem, spec
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"episode log {p} does not exist; pass NAME=PATH of a `haps run`/`haps infer` JSONL log.")
    return name, p


@app.command("episode-stats")
def episode_stats_cmd(
    logs: list[str] = typer.Argument(..., help="NAME=EPISODES.jsonl (or a path: named by its stem); the first is "
                                     "the reference of the paired differences."),
    json_out: Path = typer.Option(None, "--json", help="Write every statistic as JSON here."),
    n_boot: int = typer.Option(2000, min=100, help="Bootstrap resamples."),
) -> None:
    """Score with intervals, failures, parse failures, answers, selection and adapter norms of episode logs."""
    from collections import Counter

    from rich.console import Console
    from rich.table import Table

    from haps.evaluation.episode_stats import compare, episode_stats, read_episodes
    from haps.files import write_json_atomic
    from haps.labels import key_labels

    named = [_named(s) for s in logs]
    eps = {name: read_episodes(p) for name, p in named}
    ref = named[0][0]
    out = {}
    t = Table(title=f"episodes (differences paired by problem, against {ref})")
    for c in ("log", "n", "score [95% CI]", f"- {ref} [95% CI]", "P(>0)", "failed", "parse fail", "answers",
              "selection", "adapter norm (sd)"):
        t.add_column(c, justify="left" if c in ("log", "answers", "selection", "adapter norm (sd)") else "right")
    for name, rows in eps.items():
        s = episode_stats(rows, n_boot=n_boot)
        d = compare(rows, eps[ref], n_boot=n_boot) if name != ref else None
        s["selection"] = dict(Counter(",".join(f"{r}={m}" for r, m in e["assignment"].items()) for e in rows))
        out[name] = {"stats": s, f"minus_{ref}": d}
        sc, paired = s.get("score"), d if d and d.get("problems") else None
        labels = key_labels(list(s["selection"]))
        answers = " ".join(f"{'-' if k in ('None', '') else k}{v}" for k, v in s["predictions"].items())
        norms = " ".join(f"{m.split('-')[0]} {v['mean']:.3g} ({v['std']:.2g})"
                         for m, v in s["adapter_norms_per_problem"].items()) or "-"
        sel = " ".join(f"{labels[k]}:{v}" for k, v in sorted(s["selection"].items(), key=lambda kv: -kv[1]))
        t.add_row(name, str(s["episodes"]), f"{sc['mean']:.3f} [{sc['low']:.3f}, {sc['high']:.3f}]" if sc else "-",
                  f"{paired['diff']:+.3f} [{paired['low']:+.3f}, {paired['high']:+.3f}]" if paired else "-",
                  f"{paired['p_greater']:.2f}" if paired else "-", str(s["failed"]),
                  f"{s['parse_failure_rate']:.1%}", answers, sel, norms)
    Console().print(t)
    if json_out is not None:
        write_json_atomic(json_out, out)
