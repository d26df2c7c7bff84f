"""What a set of episodes shows, and what generated adapters change between two sets on the same problems.

From episode logs (`EpisodeResult` dicts, one JSON line each, as `haps run` / `haps infer` / `haps rl` write):

- `episode_stats`: mean score with a 95% bootstrap interval, failed episodes, parse failures per turn, null
  predictions, the distribution of predicted answers (MMLU letters) beside the gold one, the score by the
  model of each role, and the spread of adapter update norms per model across problems (distinct values,
  mean, standard deviation, min, max): one constant adapter would show a single value.
- `compare`: the paired bootstrap difference of scores on the problems both sets ran (failed ones dropped).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from haps.router_metrics import mean_ci, paired_difference


def read_episodes(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _spread(values: Sequence[float]) -> dict[str, float | int]:
    n = len(values)
    mean = sum(values) / n
    return {"n": n, "distinct": len({round(v, 9) for v in values}), "mean": mean,
            "std": math.sqrt(sum((v - mean) ** 2 for v in values) / n), "min": min(values), "max": max(values)}


def episode_stats(episodes: Iterable[dict[str, Any]], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    eps = list(episodes)
    ok = [e for e in eps if not e.get("failed")]
    turns = [t for e in eps for t in e["turns"]]
    out: dict[str, Any] = {"episodes": len(eps), "failed": len(eps) - len(ok),
                           "turns": len(turns), "parse_failure_rate": sum(bool(t.get("parse_error")) for t in turns)
                           / max(len(turns), 1),
                           "null_predictions": sum(1 for e in ok if not e.get("prediction"))}
    if ok:
        out["score"] = mean_ci([float(e["score"]) for e in ok], n_boot=n_boot, seed=seed).to_dict()
    out["predictions"] = dict(Counter(str(e.get("prediction")) for e in ok).most_common())
    out["gold"] = dict(Counter(str(e.get("gold")) for e in ok).most_common())
    by_role: dict[str, dict[str, list[float]]] = {}
    for e in ok:
        for role, model in e["assignment"].items():
            by_role.setdefault(role, {}).setdefault(model, []).append(float(e["score"]))
    out["score_by_role_model"] = {r: {m: {"n": len(v), "mean": sum(v) / len(v)} for m, v in ms.items()}
                                  for r, ms in by_role.items()}
    parse_by_model: dict[str, list[bool]] = {}
    norms: dict[str, list[float]] = {}
    for t in turns:
        parse_by_model.setdefault(t["model"], []).append(bool(t.get("parse_error")))
        if t.get("adapter_norm") is not None:
            norms.setdefault(t["model"], []).append(float(t["adapter_norm"]))
    out["parse_failure_rate_by_model"] = {m: sum(v) / len(v) for m, v in parse_by_model.items()}
    out["adapter_norms"] = {m: _spread(v) for m, v in norms.items()}
    per_problem: dict[str, dict[str, float]] = {}
    for e in eps:
        for t in e["turns"]:
            if t.get("adapter_norm") is not None:
                per_problem.setdefault(t["model"], {})[e["id"]] = float(t["adapter_norm"])
    out["adapter_norms_per_problem"] = {m: _spread(list(v.values())) for m, v in per_problem.items()}
    return out


def compare(a: Iterable[dict[str, Any]], b: Iterable[dict[str, Any]], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """mean(score_a - score_b) over the problems both ran without failing, with its interval and P(> 0)."""
    sa = {e["id"]: float(e["score"]) for e in a if not e.get("failed")}
    sb = {e["id"]: float(e["score"]) for e in b if not e.get("failed")}
    ids = sorted(set(sa) & set(sb))
    if not ids:
        return {"problems": 0}
    d = paired_difference([sa[i] for i in ids], [sb[i] for i in ids], n_boot=n_boot, seed=seed)
    return {"problems": len(ids), **d.to_dict()}
