"""RouteLLM-style classifier router: an MLP head on the query embedding (Ong et al. 2024, arXiv 2406.18665).

RouteLLM's classifier routers (BERT, causal-LLM) read the query and predict the probability that the
strong model wins. Here the encoder is the frozen sentence embedding (MiniLM by default; fine-tuning an
encoder is left out) and the head predicts, for every assignment z, its normalised reward::

    p(z | q) = sigmoid(MLP(e_q))_z                       (B, A); MLP: d -> hidden -> ... -> A
    target y(q, z) = (r(q, z) - r_min) / (r_max - r_min)   min-max over the train split (soft BCE label)

Adapted to assignments by reading p as each assignment's success probability: the probability that z_i
beats z_j on a decisive (non-tied) outcome, both succeeding independently, is::

    W[i, j] = p_i (1 - p_j) / (p_i (1 - p_j) + p_j (1 - p_i))     (0.5 when p_i = p_j)

and the decision is RouteLLM's threshold rule as a cost-ordered cascade (`haps.baselines.threshold`),
tau = 0.5 by default. ``utility(prompts)`` is p (B, A).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from haps.baselines.base import BaselineConfig, FitData, batches, minmax_normalise, nan_minmax
from haps.baselines.threshold import ThresholdRouter
from haps.routing.base import register_router
from haps.routing.prompt import RoutingPrompt

EPS = 1e-6


class ClassifierConfig(BaselineConfig):
    hidden: int = Field(default=128, ge=1, description="Width of the MLP's hidden layers.")
    layers: int = Field(default=1, ge=0, description="Hidden layers (0: a linear head).")
    dropout: float = Field(default=0.1, ge=0, lt=1, description="Dropout after each hidden layer (training only).")
    noise: float = Field(default=0.0, ge=0, description="Std of Gaussian noise on query embeddings in training.")
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(default=1e-5, ge=0, description="Adam weight decay.")
    batch_size: int = Field(default=64, ge=1, description="Queries per optimiser step.")
    epochs: int = Field(default=100, ge=1, description="Passes over the training queries.")
    threshold: float = Field(default=0.5, description="tau: escalate when P(costlier beats current) >= tau.")


def mlp_head(d_in: int, d_out: int, hidden: int, layers: int, dropout: float) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = d_in
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout)]
        d = hidden
    mods.append(nn.Linear(d, d_out))
    return nn.Sequential(*mods)


def independent_win_probs(p: torch.Tensor) -> torch.Tensor:
    """(B, A, A) W[b, i, j] = p_i (1 - p_j) / (p_i (1 - p_j) + p_j (1 - p_i)) from success probabilities
    ``p`` (B, A) (clamped to [EPS, 1 - EPS])."""
    p = p.clamp(EPS, 1 - EPS)
    a = p[:, :, None] * (1 - p[:, None, :])  # (B, A, A): i succeeds, j fails
    return a / (a + a.transpose(1, 2))


@register_router("routellm_clf")
class ClassifierRouter(ThresholdRouter):
    """MLP on the query embedding predicting every assignment's normalised reward (see the module docstring)."""

    config_cls: ClassVar[type[BaselineConfig]] = ClassifierConfig
    config: ClassifierConfig

    def _build(self, text_dim: int) -> None:
        c = self.config
        self.model = mlp_head(text_dim, self.space.size, c.hidden, c.layers, c.dropout)

    def _fit(self, data: FitData) -> None:
        assert data.emb is not None
        cfg = self.config
        self._build(data.emb.shape[1])
        emb = data.emb
        reward = data.table.reward.double()
        self.reward_range = nan_minmax(reward)
        y = minmax_normalise(reward, *self.reward_range)  # (P, A), NaN where not collected
        have = ~torch.isnan(y)
        y = torch.nan_to_num(y, nan=0.0).float()
        opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.model.train()
        for _ in range(cfg.epochs):
            for b in batches(len(emb), cfg.batch_size, gen):
                e = emb[b]
                if cfg.noise:
                    e = e + cfg.noise * torch.randn(e.shape, generator=gen, dtype=e.dtype)
                logits = self.model(e)  # (b, A)
                m = have[b].float()
                loss = nn.functional.binary_cross_entropy_with_logits(logits, y[b], weight=m, reduction="sum")
                loss = loss / m.sum().clamp(min=1)
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.model.eval()

    def _utility(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        return torch.sigmoid(self.model(self.embed(self.prompt_texts(prompts))))  # (B, A)

    def win_probs(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        return independent_win_probs(self.utility(prompts))

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return dict(self.model.state_dict()), {**self._threshold_extra(), "reward_range": list(self.reward_range)}

    def _restore(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self._build(tensors["0.weight"].shape[1])
        self.model.load_state_dict(tensors)
        self.model.eval()
        self.reward_range = tuple(extra["reward_range"])
        self._restore_threshold(extra)
