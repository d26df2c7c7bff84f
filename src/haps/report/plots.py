"""The report's PNG plots (matplotlib's object API on the Agg canvas: no pyplot, no global backend state).

Values are fractions in the summaries and percentages on the plots (as in the paper's figures).
Interval bars are the runs' 95% bootstrap intervals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

Interval = Mapping[str, float] | None
COLORS = ["#08519c", "#6baed6", "#e6550d", "#31a354", "#756bb1", "#636363", "#fd8d3c", "#74c476", "#9e9ac8"]


def _figure(width: float = 7.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    from haps.files import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _pct(iv: Interval) -> tuple[float, float, float] | None:
    if not iv:
        return None
    return 100 * iv["mean"], 100 * (iv["mean"] - iv["low"]), 100 * (iv["high"] - iv["mean"])


def grouped_bars(path: Path, groups: Sequence[str], series: Mapping[str, Sequence[Interval]], *, ylabel: str,
                 title: str) -> Path:
    """One group of bars per ``groups`` entry, one bar per series (its mean, with the interval as error bar)."""
    fig = _figure(max(5.0, 1.4 + 1.1 * len(groups) * max(1, len(series)) / 2), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    n = max(1, len(series))
    width = 0.8 / n
    for k, (name, vals) in enumerate(series.items()):
        xs, ys, err = [], [], [[], []]
        for g, iv in enumerate(vals):
            p = _pct(iv)
            if p is None:
                continue
            xs.append(g - 0.4 + width * (k + 0.5))
            ys.append(p[0])
            err[0].append(p[1])
            err[1].append(p[2])
        ax.bar(xs, ys, width * 0.92, yerr=err, capsize=3, label=name, color=COLORS[k % len(COLORS)])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def depth_lines(path: Path, lines: Mapping[str, Sequence[tuple[int, Interval]]], baselines: Mapping[str, float],
                *, title: str) -> Path:
    """Fig. 4: HAPS score against the LoRA depth k per setting; dashed: that setting's best baseline."""
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    ks: set[int] = set()
    for i, (name, pts) in enumerate(lines.items()):
        c = COLORS[i % len(COLORS)]
        pts = sorted((k, _pct(iv)) for k, iv in pts if iv)
        if not pts:
            continue
        x = [k for k, _ in pts]
        ks.update(x)
        ax.errorbar(x, [p[0] for _, p in pts], yerr=[[p[1] for _, p in pts], [p[2] for _, p in pts]], marker="o",
                    capsize=3, color=c, label=name)
        if name in baselines:
            ax.axhline(100 * baselines[name], color=c, linestyle="--", linewidth=1, label=f"{name}: best baseline")
    ax.set_xticks(sorted(ks))
    ax.set_xticklabels([f"l{k}" for k in sorted(ks)])
    ax.set_xlabel("LoRA on o_proj of the last k layers")
    ax.set_ylabel("score (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def pareto(path: Path, points: Sequence[tuple[str, float, float, str]], curves: Mapping[str, Sequence[tuple[float, float]]],
           frontier: Sequence[tuple[float, float]], *, xlabel: str, title: str) -> Path:
    """Cost (x) vs score (y, %) of every method: ``points`` (label, cost, score, kind), each router's sweep
    ``curves`` as thin lines, and the Pareto ``frontier`` (lower cost, higher score) as a dashed step."""
    fig = _figure(7.2, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, pts) in enumerate(curves.items()):
        if len(pts) > 1:
            pts = sorted(pts)
            ax.plot([c for c, _ in pts], [100 * s for _, s in pts], linewidth=0.8, alpha=0.6,
                    color=COLORS[(i + 2) % len(COLORS)], label=f"{name} (sweep)")
    if len(frontier) > 1:
        ax.step([c for c, _ in frontier], [100 * s for _, s in frontier], where="post", linestyle="--",
                color="#444444", linewidth=1, label="Pareto frontier")
    style = {"static": ("s", "#969696"), "haps": ("*", "#08519c"), "oracle": ("D", "#000000")}
    names: dict[tuple[float, float], list[str]] = {}  # methods at the same point share one annotation
    for label, cost, score, kind in points:
        marker, color = style.get(kind, ("o", "#e6550d"))
        ax.scatter([cost], [100 * score], marker=marker, color=color, s=60 if kind == "haps" else 28, zorder=3)
        names.setdefault((float(f"{cost:.4g}"), float(f"{score:.4g}")), []).append(label)
    xs = [c for c, _ in names] or [0.0]
    ys = [100 * s for _, s in names] or [0.0]
    xr, yr = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float]] = []
    for (cost, score), labels in sorted(names.items()):
        x, y = (cost - min(xs)) / xr, (100 * score - min(ys)) / yr
        near = sum(1 for px, py in placed if abs(px - x) < 0.3 and abs(py - y) < 0.05)  # labels would overlap
        placed.append((x, y))
        ax.annotate(", ".join(labels), (cost, 100 * score), textcoords="offset points", xytext=(4, 3 - 9 * near),
                    fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("score (%)")
    ax.set_title(title, fontsize=10)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    if curves or len(frontier) > 1:
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated (cost, score) points, ascending cost: no other point is as cheap and better, or
    cheaper and as good."""
    front: list[tuple[float, float]] = []
    for c, s in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or s > front[-1][1]:
            front.append((c, s))
    return front
