"""Best static assignment on the validation split: one z for every query.

The strongest query-blind baseline (LLMRouterBench: "best single model per dataset", chosen on held-out
data so that it is not tuned to the test split). Adapted to assignments by ranking every assignment z by
its mean validation reward; the mean is over the problems where z was collected.

Semantics::

    m[z] = mean_{p in valid, r(p, z) collected} r(p, z)        (never-collected z: -inf)
    z* = argmax_z m[z]   (ties -> the lower index, as the base Router's arg max)
    utility[b, z] = m[z] for every prompt b; the decision is z* for every prompt
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from haps.baselines.base import BaselineConfig, BaselineRouter, FitData
from haps.errors import ConfigError
from haps.routing.base import register_router
from haps.routing.prompt import RoutingPrompt


@register_router("best_static")
class BestStaticRouter(BaselineRouter):
    """The assignment with the best mean reward on the validation split (``fit(..., valid=...)``)."""

    config_cls: ClassVar[type[BaselineConfig]] = BaselineConfig
    needs_embeddings: ClassVar[bool] = False

    def _fit(self, data: FitData) -> None:
        if data.valid is None:
            raise ConfigError("best_static picks the best assignment on the validation split: pass "
                              "fit(..., valid=<the valid split's ActionTable>).")
        if data.valid.space != self.space:
            raise ConfigError(f"the validation table is over {data.valid.space}, not {self.space}.")
        m = torch.nanmean(data.valid.reward.double(), dim=0)  # (A,)
        m = torch.nan_to_num(m, nan=-math.inf)
        self.means = m
        self.best = int(m.argmax())  # first maximum

    def _utility(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        return self.means[None, :].expand(len(prompts), -1)  # (B, A)

    @property
    def assignment(self) -> tuple[int, ...]:
        """The chosen assignment z*."""
        return self.space.at(self.best)

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"means": self.means}, {"best": self.best}

    def _restore(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.means, self.best = tensors["means"], int(extra["best"])
