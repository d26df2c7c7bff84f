"""RouteLLM's threshold decision generalised from (weak, strong) to assignments: a cost-ordered cascade.

RouteLLM (Ong et al. 2024, "RouteLLM: Learning to Route LLMs with Preference Data", arXiv 2406.18665)
routes a query to the strong model iff the predicted probability that the strong model wins,
P(strong beats weak | q), is at least a threshold tau (0.5 by default; HAPS App. C uses 0.5), and
calibrates tau to a target share p of strong calls as the (1 - p) quantile of the router's scores on
a calibration set of queries.

Generalisation (HAPS App. C is silent). Order the assignments by mean train cost, cheapest first
(ties -> lower index): o_0, o_1, ..., o_{A-1}. With W[i, j] = P(z_i beats z_j | q)::

    cur = o_0                                   # the cheapest assignment ("weak")
    for z in o_1, ..., o_{A-1}:                 # costlier ones, ascending cost
        if W[z, cur] >= tau: cur = z            # escalate when z is predicted to beat the current pick
    decision = cur

    router score s(q) = max_{z != o_0} W[z, o_0]

The query leaves the cheapest assignment iff s(q) >= tau (the first escalation is the first z with
W[z, o_0] >= tau), so the share of calls to costlier assignments is exactly the share of queries with
s(q) >= tau, and calibration is RouteLLM's: tau = quantile(s, 1 - p) over calibration queries (p = 0:
tau just above the largest score, no escalation). With two assignments this is RouteLLM's rule.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from haps.baselines.base import BaselineRouter
from haps.errors import ConfigError
from haps.routing.prompt import RoutingPrompt


class ThresholdRouter(BaselineRouter):
    """A router that predicts pairwise win probabilities and decides by the cost-ordered cascade.

    ``self.threshold`` starts at ``config.threshold`` and is changed by `calibrate`; checkpoints keep it.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.threshold = float(self.config.threshold)

    @abstractmethod
    def win_probs(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        """(B, A, A) float64, W[b, i, j] = P(z_i beats z_j | q_b) (W[b, i, j] + W[b, j, i] = 1)."""

    def cost_order(self) -> torch.Tensor:
        """(A,) assignment indices by mean train cost, cheapest first (ties -> lower index)."""
        return torch.argsort(self.assignment_cost, stable=True)

    def threshold_scores(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        """(B,) s(q) = max over costlier z of P(z beats the cheapest assignment | q)."""
        self._check_fitted()
        if len(self.cost_order()) < 2:
            return torch.zeros(len(prompts), dtype=torch.float64)
        o = self.cost_order()
        w = self.win_probs(prompts)  # (B, A, A)
        return w[:, o[1:], o[0]].max(dim=1).values  # (B,)

    def decide(self, w: torch.Tensor, tau: float) -> torch.Tensor:
        """(B,) assignment indices chosen by the cascade from win probabilities ``w`` (B, A, A)."""
        o = self.cost_order()
        cur = torch.full((w.shape[0],), int(o[0]), dtype=torch.long)
        rows = torch.arange(w.shape[0])
        for z in o[1:].tolist():
            up = w[rows, z, cur] >= tau  # (B,)
            cur = torch.where(up, torch.full_like(cur, z), cur)
        return cur

    def decisions(self, prompts: Sequence[RoutingPrompt], threshold: float | None = None) -> torch.Tensor:
        """(B,) the cascade's choices at ``threshold`` (default: the router's)."""
        self._check_fitted()
        tau = self.threshold if threshold is None else float(threshold)
        return self.decide(self.win_probs(prompts), tau)

    def log_probs(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        """(B, A) log one-hot of the cascade's choice (the router is deterministic)."""
        idx = self.decisions(prompts)
        lp = torch.full((len(prompts), self.space.size), -math.inf, dtype=torch.float64)
        lp[torch.arange(len(prompts)), idx] = 0.0
        return lp

    # ---------------------------------------------------------------- calibration
    @staticmethod
    def threshold_for_share(scores: torch.Tensor, share: float) -> float:
        """RouteLLM's calibration: the (1 - share) quantile of ``scores`` (linear interpolation, as
        ``numpy.quantile``); share 0 -> just above the largest score (no escalation)."""
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"share of calls to costlier assignments must be in [0, 1], got {share}.")
        s = scores.double().flatten()
        if s.numel() == 0:
            raise ConfigError("threshold calibration needs at least one calibration prompt.")
        if share == 0.0:
            return math.nextafter(float(s.max()), math.inf)
        return float(torch.quantile(s, 1.0 - share))

    def calibrate(self, prompts: Sequence[RoutingPrompt], share: float) -> float:
        """Set (and return) the threshold so that a share ``share`` of ``prompts`` escalates."""
        self.threshold = self.threshold_for_share(self.threshold_scores(prompts), share)
        return self.threshold

    def sweep(self, prompts: Sequence[RoutingPrompt], shares: Sequence[float],
              calibration: Sequence[RoutingPrompt] | None = None) -> tuple[list[float], torch.Tensor]:
        """Decisions at thresholds calibrated to each target share (for APGR / CPT curves).

        Thresholds come from ``calibration`` prompts (default: ``prompts`` themselves). Returns
        (thresholds, (S, B) chosen assignment indices); the router's own threshold is unchanged."""
        cal = self.threshold_scores(calibration if calibration is not None else prompts)
        taus = [self.threshold_for_share(cal, p) for p in shares]
        w = self.win_probs(prompts)
        return taus, torch.stack([self.decide(w, t) for t in taus]) if taus else torch.zeros(0, len(prompts))

    def _threshold_extra(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def _restore_threshold(self, extra: dict[str, Any]) -> None:
        self.threshold = float(extra.get("threshold", self.config.threshold))
