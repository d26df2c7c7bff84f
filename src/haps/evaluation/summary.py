"""Per-method metrics of `haps eval` and the terminal tables.

For each method (its `MethodRows`; every mean over its scored problems, failed ones counted apart):

- ``score`` / ``reward``: mean with a percentile-bootstrap interval (`haps.router_metrics.mean_ci`);
- ``vs_haps`` / ``vs_best_static``: paired bootstrap of mean(method - reference) for score and reward on
  the problems both scored (`paired_difference`); the best static assignment is the one best on the
  **valid** split (the test split never picks it);
- ``cost`` (USD per episode) and ``cost_norm`` (the train-fitted min-max normalisation);
- ``selection``: share of each assignment among the method's picks; ``share_costlier``: of picks other
  than the cheapest assignment (by train cost);
- ``pgr``: RouteLLM's (q - q_weak) / (q_strong - q_weak) on score, weak / strong = the cheapest / the
  costliest assignment by train cost; ``apgr`` and ``cpt50`` from the threshold routers' sweeps;
  ``aiq`` (RouterBench) over the (cost, score) points of any sweep (`haps.evaluation.curves`);
- ``oracle_gap``: mean(oracle - method) for score and reward on the problems both scored;
  ``gap_closed``: (q - q_best_static) / (q_oracle - q_best_static) on reward;
- ``best_rate``: share of scored problems whose pick is reward-optimal in the table (policies only).

Undefined values (no scored problem, a zero denominator, no sweep) are ``null`` in the JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from haps.evaluation.outcomes import MethodRows
from haps.router_metrics import aiq, apgr, cpt, gap_closed, mean_ci, paired_difference, pgr


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def interval(rows: MethodRows, key: str, *, n_boot: int, level: float, seed: int) -> dict[str, float] | None:
    ok = rows.ok
    if not ok.any():
        return None
    return mean_ci(getattr(rows, key)[ok], n_boot=n_boot, level=level, seed=seed).to_dict()


def paired(a: MethodRows, b: MethodRows | None, *, n_boot: int, level: float, seed: int) -> dict[str, Any] | None:
    """mean(a - b) for score and reward on the problems both scored (None if b is None, a itself, or none)."""
    if b is None or b is a or b.name == a.name:
        return None
    both = a.ok & b.ok
    if not both.any():
        return None
    return {k: paired_difference(getattr(a, k)[both], getattr(b, k)[both], n_boot=n_boot, level=level,
                                 seed=seed).to_dict() for k in ("score", "reward")}


def _mean(rows: MethodRows | None, key: str) -> float | None:
    if rows is None or not rows.ok.any():
        return None
    return float(getattr(rows, key)[rows.ok].mean())


def method_summary(rows: MethodRows, *, label: str, kind: str, labels: Mapping[str, str], keys: Sequence[str],
                   weak: int, refs: Mapping[str, MethodRows | None], q_weak: float | None,
                   q_strong: float | None, curve: list | None, sweep_kind: str | None,
                   n_boot: int, level: float, seed: int, info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The summary entry of one method (see the module docstring). ``refs``: ``haps``, ``best_static`` and
    ``oracle`` rows (any may be None); ``keys`` / ``labels``: assignment keys in product order and their labels."""
    bs = dict(n_boot=n_boot, level=level, seed=seed)
    ok = rows.ok
    sel = rows.selection(len(keys))
    q = _mean(rows, "score")
    out: dict[str, Any] = {
        "label": label, "kind": kind, "problems": len(rows.problem_ids), "scored": int(ok.sum()),
        "failed": rows.count("failed"), "missing": rows.count("missing"), "sources": rows.sources(),
        "score": interval(rows, "score", **bs), "reward": interval(rows, "reward", **bs),
        "cost": _mean(rows, "cost"), "cost_norm": _mean(rows, "cost_norm"),
        "selection": {k: float(sel[j]) for j, k in enumerate(keys) if float(sel[j]) > 0},
        "selection_labels": {labels[k]: float(sel[j]) for j, k in enumerate(keys) if float(sel[j]) > 0},
        "share_costlier": _num(1.0 - float(sel[weak])) if sel.sum() > 0 else None,
        "vs_haps": paired(rows, refs.get("haps"), **bs),
        "vs_best_static": paired(rows, refs.get("best_static"), **bs),
        "pgr": _num(pgr(q, q_weak, q_strong)) if None not in (q, q_weak, q_strong) else None,
        "apgr": None, "cpt50": None, "aiq": None, "curve": None, "sweep": sweep_kind,
    }
    orc = refs.get("oracle")
    if orc is not None and orc is not rows:
        both = ok & orc.ok
        if both.any():
            out["oracle_gap"] = {k: float((getattr(orc, k)[both] - getattr(rows, k)[both]).mean())
                                 for k in ("score", "reward")}
            best = refs.get("best_static")
            if best is not None:
                all3 = both & best.ok
                if all3.any():
                    out["gap_closed"] = _num(gap_closed(float(rows.reward[all3].mean()), float(best.reward[all3].mean()),
                                                        float(orc.reward[all3].mean())))
    out.setdefault("oracle_gap", None)
    out.setdefault("gap_closed", None)
    if rows.pi is not None and rows.best is not None and ok.any():
        out["best_rate"] = float((rows.pi * rows.best.double()).sum(1)[ok].mean())
    else:
        out["best_rate"] = None
    if curve:
        out["curve"] = [p.to_dict() for p in curve]
        costs = [p.cost for p in curve]
        scores = [p.score for p in curve]
        out["aiq"] = _num(aiq(costs, scores))
        shares = [p.share for p in curve]
        if sweep_kind == "threshold" and None not in (q_weak, q_strong) and min(shares) == 0.0 and max(shares) == 1.0:
            out["apgr"] = _num(apgr(shares, scores, q_weak, q_strong))
            out["cpt50"] = _num(cpt(shares, scores, q_weak, q_strong, 0.5))
    if info:
        out["info"] = dict(info)
    return out


def static_hull(methods: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """RouterBench's zero router: AIQ of the (cost, score) points of the static assignments."""
    pts = [(m["cost"], m["score"]["mean"]) for n, m in methods.items()
           if n.startswith("static:") and m.get("score") and m.get("cost") is not None]
    if not pts:
        return None
    return {"aiq": _num(aiq([c for c, _ in pts], [s for _, s in pts])),
            "points": [{"cost": c, "score": s} for c, s in pts]}


# ---------------------------------------------------------------------------------------- tables
def _ci(iv: Mapping[str, float] | None) -> str:
    if not iv:
        return "-"
    return f"{iv['mean']:.3f} [{iv['low']:.2f},{iv['high']:.2f}]"


def _diff(d: Mapping[str, Any] | None, key: str = "reward") -> str:
    if not d:
        return "-"
    x = d[key]
    star = "*" if x["low"] > 0 or x["high"] < 0 else ""
    return f"{x['diff']:+.3f}{star}"


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _src(sources: Mapping[str, int]) -> str:
    return "+".join(s[0].upper() for s in sorted(sources)) or "-"


def tables(summary: Mapping[str, Any]) -> list:
    """The rich tables of a summary (each fits 80 columns; labels are never truncated)."""
    from rich import box
    from rich.table import Table

    methods = summary["methods"]
    reward_kind = summary["reward"]["kind"]
    width = max([len(m["label"]) for m in methods.values()] + [6])
    t1 = Table(title=f"{summary['task']} / {summary['setting']}: {summary['test_problems']} test problems",
               box=box.SIMPLE_HEAD, pad_edge=False, caption=_caption(summary))
    t1.add_column("method", no_wrap=True, min_width=width)
    t1.add_column("score [95% CI]", justify="right", no_wrap=True)
    if reward_kind != "score":
        t1.add_column(f"reward ({reward_kind})", justify="right", no_wrap=True)
    t1.add_column("cost $" if reward_kind != "tradeoff" else "cost norm", justify="right", no_wrap=True)
    t1.add_column("n", justify="right", no_wrap=True)
    t1.add_column("fail", justify="right", no_wrap=True)
    for m in methods.values():
        row = [m["label"], _ci(m["score"])]
        if reward_kind != "score":
            row.append(_ci(m["reward"]))
        row.append(_f(m["cost"], ".2e") if reward_kind != "tradeoff" else _f(m["cost_norm"], ".3f"))
        row += [str(m["scored"]), str(m["failed"] + m["missing"]) if m["missing"] else str(m["failed"])]
        t1.add_row(*row)
    has_haps = "haps" in methods
    t2 = Table(title="against references", box=box.SIMPLE_HEAD, pad_edge=False,
               caption="Δ: paired mean difference of reward (* = 95% interval excludes 0); gap: oracle - method "
               "(reward); src: L = lookup in the action table (exact under greedy decoding), E = real episodes")
    t2.add_column("method", no_wrap=True, min_width=width)
    t2.add_column("Δ best", justify="right", no_wrap=True)
    if has_haps:
        t2.add_column("Δ HAPS", justify="right", no_wrap=True)
    for c in ("gap", "APGR", "CPT50", "AIQ", "src"):
        t2.add_column(c, justify="right", no_wrap=True)
    for m in methods.values():
        row = [m["label"], _diff(m["vs_best_static"])]
        if has_haps:
            row.append(_diff(m["vs_haps"]))
        gap = m.get("oracle_gap")
        row += [_f(gap["reward"], ".3f") if gap else "-", _f(m["apgr"]), _f(m["cpt50"]), _f(m["aiq"], ".3f"),
                _src(m["sources"])]
        t2.add_row(*row)
    t3 = Table(title="selection (share of picks)", box=box.SIMPLE_HEAD, pad_edge=False, show_header=False)
    t3.add_column("method", no_wrap=True, min_width=width)
    t3.add_column("selection", overflow="fold")
    for m in methods.values():
        parts = sorted(m["selection_labels"].items(), key=lambda kv: -kv[1])
        t3.add_row(m["label"], "; ".join(f"{k} {v:.0%}" for k, v in parts) or "-")
    return [t1, t2, t3]


def _caption(summary: Mapping[str, Any]) -> str:
    r = summary["reward"]
    bits = [f"best static (valid): {summary['best_static']['label']}"]
    if r["kind"] == "tradeoff":
        bits.append(f"reward = {r['alpha']} score - {r['beta']} cost_norm")
    legend = summary.get("legend")
    if legend:
        bits.append(legend)
    return "; ".join(bits)

