"""kNN router over query embeddings: the mean reward of the k nearest training queries, per assignment.

LLMRouterBench (Li et al. 2025, "LLMRouterBench: a massive benchmark and unified framework for LLM
routing") and RouterEval report that such a kNN router often ties published routers; it is reported
beside them. Adapted to assignments by treating every assignment z as one arm: the k neighbours' rewards
r(q_i, z) are averaged per z (neighbours where z was not collected are skipped for that z).

Semantics::

    sim[b, i] = cos(e_b, e_i)   (metric "cosine")   or   -||e_b - e_i||   (metric "euclidean")
    N(b) = the k training queries with the largest sim[b, :] (ties -> lower training index)
    utility[b, z] = mean_{i in N(b), r(i, z) collected} r(i, z)     (NaN-free: no neighbour -> -inf)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from haps.baselines.base import BaselineConfig, BaselineRouter, FitData
from haps.routing.base import register_router
from haps.routing.prompt import RoutingPrompt


class KNNConfig(BaselineConfig):
    k: int = Field(default=10, ge=1, description="Neighbours averaged (fewer when the train split is smaller).")
    metric: Literal["cosine", "euclidean"] = Field(default="cosine", description="Similarity of query embeddings.")


def knn_indices(query: torch.Tensor, keys: torch.Tensor, k: int, metric: str) -> torch.Tensor:
    """(B, k') indices of the k' = min(k, n) rows of ``keys`` (n, d) nearest to each row of ``query`` (B, d),
    nearest first; ties -> lower index (a stable sort)."""
    if metric == "cosine":
        sim = torch.nn.functional.normalize(query, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).T
    else:
        sim = -torch.cdist(query, keys)
    k = min(k, keys.shape[0])
    return torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)


@register_router("knn")
class KNNRouter(BaselineRouter):
    """Mean reward of the k nearest training queries per assignment (see the module docstring)."""

    config_cls: ClassVar[type[BaselineConfig]] = KNNConfig
    config: KNNConfig

    def _fit(self, data: FitData) -> None:
        assert data.emb is not None
        self.keys = data.emb.clone()  # (n, d)
        self.rewards = data.table.reward.double().clone()  # (n, A), NaN where not collected

    def _utility(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        q = self.embed(self.prompt_texts(prompts))  # (B, d)
        idx = knn_indices(q, self.keys, self.config.k, self.config.metric)  # (B, k)
        r = self.rewards[idx]  # (B, k, A)
        have = ~torch.isnan(r)
        total = torch.nan_to_num(r, nan=0.0).sum(1)  # (B, A)
        count = have.sum(1)  # (B, A)
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, -math.inf))

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"keys": self.keys, "rewards": self.rewards}, {}

    def _restore(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.keys, self.rewards = tensors["keys"], tensors["rewards"]
