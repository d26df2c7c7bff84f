"""Router metrics: bootstrap intervals, paired differences, RouteLLM's PGR / APGR / CPT, RouterBench's
AIQ and the gap to the oracle. Pure functions on tensors or lists; the bootstrap ones are seeded.

Formulas (q = mean quality, e.g. score or reward over the test problems):

- bootstrap (percentile method): draw ``n_boot`` resamples of the n problems with replacement
  (`bootstrap_indices`, seeded); the interval at ``level`` is the ((1 - level)/2, (1 + level)/2)
  quantiles (linear interpolation) of the resampled means.
- paired bootstrap of methods a, b on the same problems: the same resamples for both;
  diff = mean(a - b), its interval, and ``p_greater`` = share of resamples with mean(a - b) > 0.
- PGR (RouteLLM, Ong et al. 2024): (q_router - q_weak) / (q_strong - q_weak).
- APGR: the area under the quality-vs-share-of-costlier-calls curve x in [0, 1] (trapezoids), as PGR:
  (integral_0^1 q(x) dx - q_weak) / (q_strong - q_weak); the straight weak-strong line scores 0.5.
- CPT(x): the smallest share of costlier calls at which the curve reaches q_weak + x (q_strong - q_weak).
- AIQ (RouterBench, Hu et al. 2024): the non-decreasing upper convex hull of a router's (cost, quality)
  points, extended flat from its highest point to the largest cost; AIQ = its area / (c_max - c_min).
- gap to the oracle: q_oracle - q; ``gap_closed`` = (q - q_base) / (q_oracle - q_base).

Undefined ratios (a zero denominator) are NaN, not errors: a pool where weak and strong tie has no PGR.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from haps.errors import ConfigError, ShapeError

Values = Sequence[float] | torch.Tensor


def _vec(x: Values, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).flatten() if not isinstance(x, torch.Tensor) else x.double().flatten()
    if t.numel() == 0:
        raise ConfigError(f"{name} is empty; pass at least one value.")
    if torch.isnan(t).any():
        raise ConfigError(f"{name} holds NaN; drop the problems without a value first.")
    return t


def _level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ConfigError(f"confidence level must be in (0, 1), got {level}.")


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap interval."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class PairedDifference:
    """mean(a - b) over paired problems, its bootstrap interval, and the share of resamples where it is > 0."""

    diff: float
    low: float
    high: float
    p_greater: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def bootstrap_indices(n: int, n_boot: int = 2000, seed: int = 0) -> torch.Tensor:
    """(n_boot, n) int64 indices in [0, n): each row one resample with replacement (seeded)."""
    if n < 1 or n_boot < 1:
        raise ConfigError(f"bootstrap needs n >= 1 values and n_boot >= 1 resamples, got n={n}, n_boot={n_boot}.")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (n_boot, n), generator=g)


def _percentiles(means: torch.Tensor, level: float) -> tuple[float, float]:
    lo, hi = (1 - level) / 2, (1 + level) / 2
    q = torch.quantile(means, torch.tensor([lo, hi], dtype=torch.float64))
    return float(q[0]), float(q[1])


def mean_ci(values: Values, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of ``values`` (n,) and its percentile-bootstrap interval.

    Semantics::

        idx = bootstrap_indices(n, n_boot, seed)          # (n_boot, n)
        means = values[idx].mean(1)                       # (n_boot,)
        low, high = quantile(means, (1 - level)/2), quantile(means, (1 + level)/2)
    """
    _level(level)
    v = _vec(values, "values")
    means = v[bootstrap_indices(v.numel(), n_boot, seed)].mean(1)
    low, high = _percentiles(means, level)
    return Interval(float(v.mean()), low, high, v.numel())


def paired_difference(a: Values, b: Values, *, n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> PairedDifference:
    """Paired bootstrap of mean(a - b) for two methods scored on the same n problems (same order).

    Semantics::

        d = a - b                                          # (n,)
        means = d[bootstrap_indices(n, n_boot, seed)].mean(1)
        diff = mean(d); low, high = percentiles of means; p_greater = mean(means > 0)
    """
    _level(level)
    av, bv = _vec(a, "a"), _vec(b, "b")
    if av.shape != bv.shape:
        raise ShapeError(f"paired values need the same problems: a has {av.numel()}, b has {bv.numel()}.")
    d = av - bv
    means = d[bootstrap_indices(d.numel(), n_boot, seed)].mean(1)
    low, high = _percentiles(means, level)
    return PairedDifference(float(d.mean()), low, high, float((means > 0).double().mean()), d.numel())


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else math.nan


def pgr(q_router: float, q_weak: float, q_strong: float) -> float:
    """Performance gap recovered: (q_router - q_weak) / (q_strong - q_weak) (NaN when strong == weak)."""
    return _ratio(q_router - q_weak, q_strong - q_weak)


def _curve(shares: Values, qualities: Values) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) sorted by share (stable), checked to span [0, 1]."""
    x, y = _vec(shares, "shares"), _vec(qualities, "qualities")
    if x.shape != y.shape:
        raise ShapeError(f"a curve needs one quality per share: {x.numel()} shares, {y.numel()} qualities.")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ConfigError("shares of calls to costlier assignments must lie in [0, 1].")
    order = torch.argsort(x, stable=True)
    return x[order], y[order]


def apgr(shares: Values, qualities: Values, q_weak: float, q_strong: float) -> float:
    """Average PGR over the quality curve: (trapz(q, x) - q_weak) / (q_strong - q_weak).

    ``shares`` (m,) in [0, 1] must include 0 and 1 (calibrate thresholds at both ends); ``qualities`` (m,)
    the mean quality at each share. Semantics::

        x, q sorted by x;  area = sum_i (x[i+1] - x[i]) * (q[i] + q[i+1]) / 2
        APGR = (area - q_weak) / (q_strong - q_weak)
    """
    x, y = _curve(shares, qualities)
    if float(x[0]) != 0.0 or float(x[-1]) != 1.0:
        raise ConfigError(f"APGR integrates over shares 0..1 but the curve spans {float(x[0])}..{float(x[-1])}; "
                          "add the points at share 0 and 1.")
    area = float(torch.trapezoid(y, x))
    return _ratio(area - q_weak, q_strong - q_weak)


def cpt(shares: Values, qualities: Values, q_weak: float, q_strong: float, x: float = 0.5) -> float:
    """Call-performance threshold CPT(x): the smallest share whose quality reaches
    q_weak + x (q_strong - q_weak) (a tolerance of 1e-12), NaN when no point does.

    ``x`` in [0, 1] is the fraction of the weak-strong gap (CPT(50%): x = 0.5)."""
    if not 0.0 <= x <= 1.0:
        raise ConfigError(f"CPT's gap fraction must be in [0, 1] (0.5 for CPT(50%)), got {x}.")
    s, y = _curve(shares, qualities)
    target = q_weak + x * (q_strong - q_weak)
    ok = y >= target - 1e-12
    return float(s[ok].min()) if ok.any() else math.nan


def upper_hull(costs: Values, qualities: Values) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-decreasing upper convex hull of (cost, quality) points: vertices (c, q), ascending cost.

    Semantics::

        points sorted by cost (equal costs: the best quality only)
        upper hull by the monotone chain: drop b while (o, b, p) does not turn clockwise
        keep the vertices up to the first highest quality (the curve is then flat to the largest cost)
    """
    c, q = _vec(costs, "costs"), _vec(qualities, "qualities")
    if c.shape != q.shape:
        raise ShapeError(f"AIQ needs one quality per cost: {c.numel()} costs, {q.numel()} qualities.")
    pts: dict[float, float] = {}
    for ci, qi in zip(c.tolist(), q.tolist(), strict=True):
        pts[ci] = max(qi, pts.get(ci, -math.inf))
    hull: list[tuple[float, float]] = []
    for p in sorted(pts.items()):
        while len(hull) >= 2:
            (ox, oy), (bx, by) = hull[-2], hull[-1]
            if (bx - ox) * (p[1] - oy) - (by - oy) * (p[0] - ox) >= 0:  # b on or below segment o-p
                hull.pop()
            else:
                break
        hull.append(p)
    peak = max(range(len(hull)), key=lambda i: (hull[i][1], -i))
    hull = hull[:peak + 1]
    return (torch.tensor([h[0] for h in hull], dtype=torch.float64),
            torch.tensor([h[1] for h in hull], dtype=torch.float64))


def aiq(costs: Values, qualities: Values) -> float:
    """RouterBench's average improvement in quality: area under the non-decreasing upper convex hull of
    the (cost, quality) points, flat from its peak to the largest cost, divided by the cost range.

    Semantics::

        hc, hq = upper_hull(costs, qualities)                  # ascending cost, ends at the peak
        area = trapz(hq, hc) + hq[-1] * (max(costs) - hc[-1])
        AIQ = area / (max(costs) - min(costs))                 # one distinct cost: AIQ = max quality
    """
    c = _vec(costs, "costs")
    hc, hq = upper_hull(costs, qualities)
    c_min, c_max = float(c.min()), float(c.max())
    if c_max == c_min:
        return float(hq.max())
    area = float(torch.trapezoid(hq, hc)) + float(hq[-1]) * (c_max - float(hc[-1]))
    return area / (c_max - c_min)


def oracle_gap(q: float, q_oracle: float) -> float:
    """q_oracle - q: how much quality the router leaves on the table."""
    return q_oracle - q


def gap_closed(q: float, q_base: float, q_oracle: float) -> float:
    """(q - q_base) / (q_oracle - q_base): the share of the base-to-oracle gap the router closes
    (base: e.g. random or the best static assignment; NaN when the oracle equals the base)."""
    return _ratio(q - q_base, q_oracle - q_base)
