"""Quality curves of a router on the test problems: the inputs of APGR / CPT (RouteLLM) and AIQ (RouterBench).

Costs order the assignments: ``cost_order`` sorts them by mean train cost, cheapest first; the cheapest is
"weak" (o_0), the costliest "strong" (o_{A-1}), as All-Weak / All-Strong in the paper's Table 5. The
share of costlier calls of a decision is the share of problems routed to anything but o_0.

Two sweeps give a router several operating points (each a (P,) decision over the test problems):

- threshold routers (RouteLLM MF and classifier, `haps.baselines.threshold.ThresholdRouter`): the
  router's own `sweep` with thresholds calibrated on the test prompts to shares 0, 1/(n-1), ..., 1, so
  the curve spans shares 0..1 as APGR needs;
- routers with a utility u(p, z) (kNN, GraphRouter, IRT-Router, best static, the SFT router's log P(z|p)):
  RouterBench's willingness-to-pay sweep, z*(p) = argmax_z u(p, z) - lambda * c(z) with c the mean train
  cost, lambda from 0 (the router's own choice) to lambda_max (every problem on the cheapest z)::

      lambda_max = 1.01 * max_{p, z: c(z) > c(o_0)} (u(p, z) - u(p, o_0))^+ / (c(z) - c(o_0))
      lambdas    = [0] + lambda_max * geomspace(1e-3, 1, n - 1)

  Such a curve does not reach share 1, so it gives AIQ but not APGR or CPT.

Each decision is scored by lookup/episodes like any policy (`Outcomes.evaluate`); a `CurvePoint` holds
its share, mean cost, score and reward over the scored problems.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class CurvePoint:
    """One operating point: the sweep parameter, the share of costlier calls and the means over scored problems."""

    param: float
    share: float
    cost: float
    score: float
    reward: float
    scored: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def cost_order(train_cost: torch.Tensor) -> torch.Tensor:
    """(A,) assignment indices by mean train cost ``train_cost`` (A,), cheapest first (ties -> lower index;
    never-collected assignments, NaN, last)."""
    c = torch.nan_to_num(train_cost.double(), nan=math.inf)
    return torch.argsort(c, stable=True)


def threshold_decisions(router, prompts: Sequence, points: int) -> tuple[list[float], torch.Tensor]:
    """(target shares, (S, P) decisions) of a ThresholdRouter calibrated on ``prompts`` themselves."""
    shares = [i / (points - 1) for i in range(points)]
    _, dec = router.sweep(prompts, shares)
    return shares, dec.long()


def penalty_decisions(utility: torch.Tensor, cost: torch.Tensor, points: int) -> tuple[list[float], torch.Tensor]:
    """(lambdas, (S, P) decisions) of argmax_z utility (P, A) - lambda * cost (A,) (see the module docstring)."""
    u = utility.double()
    c = torch.nan_to_num(cost.double(), nan=float(torch.nan_to_num(cost, nan=0.0).max()))
    o0 = int(cost_order(cost)[0])
    dc = c - c[o0]  # (A,)
    finite = torch.isfinite(u) & torch.isfinite(u[:, o0:o0 + 1])
    gain = torch.where(finite, (u - u[:, o0:o0 + 1]).clamp(min=0.0), torch.zeros_like(u))  # (P, A)
    costlier = dc > 0
    lam_max = 0.0
    if costlier.any():
        ratios = gain[:, costlier] / dc[costlier]
        lam_max = float(ratios.max()) * 1.01 if ratios.numel() else 0.0
    lam_max = lam_max if lam_max > 0 else 1.0
    lams = [0.0] + [lam_max * 10 ** (-3 + 3 * k / max(points - 2, 1)) for k in range(points - 1)]
    dec = torch.stack([(u - lam * c[None, :]).argmax(1) for lam in lams])  # (S, P)
    return lams, dec


def curve(outcomes, decisions: torch.Tensor, params: Sequence[float], weak: int) -> list[CurvePoint]:
    """Score each decision row (S, P) on ``outcomes`` (as `Outcomes.evaluate` scores a one-hot policy:
    means over the problems whose picked cell is scored); points with no scored problem are dropped."""
    from haps.evaluation.outcomes import OK

    rows = torch.arange(decisions.shape[1])
    pts = []
    for lam, d in zip(params, decisions, strict=True):
        ok = outcomes.status[rows, d] == OK  # (P,)
        if not ok.any():
            continue
        share = float((d != weak).double().mean())
        mean = {k: float(getattr(outcomes, k)[rows, d][ok].mean()) for k in ("cost", "score", "reward")}
        pts.append(CurvePoint(float(lam), share, mean["cost"], mean["score"], mean["reward"], int(ok.sum())))
    return pts
