"""RouteLLM's matrix-factorisation router (Ong et al. 2024, arXiv 2406.18665;
``routellm/routers/matrix_factorization/model.py``), over assignments.

The model is RouteLLM's with every assignment z playing the part of one arena model::

    s(z, q) = w^T ( normalize(P_z) * (W e_q) )      P: (A, dim) embedding, W: d_emb -> dim, w: dim -> 1
    P(z_i beats z_j | q) = sigmoid(s(z_i, q) - s(z_j, q))

Training follows RouteLLM's code: "battles" are the pairs of assignments of one training problem with
different rewards (ties dropped), the loss is the BCE of sigmoid(s(winner) - s(loser)) against 1,
Gaussian noise (std ``noise``, 0.1) is added to the query embeddings while training, Adam (lr 3e-4,
weight decay 1e-5), batch 64, 100 epochs. The decision is RouteLLM's threshold rule generalised to a
cost-ordered cascade of assignments (`haps.baselines.threshold`), tau = 0.5 by default.

``utility(prompts)`` is s(z, q) (B, A): a Bradley-Terry strength, comparable within a row only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from haps.baselines.base import BaselineConfig, FitData, batches
from haps.baselines.threshold import ThresholdRouter
from haps.routing.base import register_router
from haps.routing.prompt import RoutingPrompt


class MFConfig(BaselineConfig):
    dim: int = Field(default=128, ge=1, description="Latent dimension of P_z and W e_q (RouteLLM: 128).")
    noise: float = Field(default=0.1, ge=0, description="Std of Gaussian noise on query embeddings in training.")
    lr: float = Field(default=3e-4, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(default=1e-5, ge=0, description="Adam weight decay.")
    batch_size: int = Field(default=64, ge=1, description="Battles per optimiser step.")
    epochs: int = Field(default=100, ge=1, description="Passes over the battles.")
    threshold: float = Field(default=0.5, description="tau: escalate when P(costlier beats current) >= tau.")


class MFModel(nn.Module):
    """s(z, q) = w^T (normalize(P_z) * (W e_q)); only the model, training is in `MFRouter._fit`."""

    def __init__(self, num_assignments: int, text_dim: int, dim: int) -> None:
        super().__init__()
        self.P = nn.Embedding(num_assignments, dim)
        self.text_proj = nn.Linear(text_dim, dim, bias=False)
        self.classifier = nn.Linear(dim, 1, bias=False)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, A) scores of every assignment for query embeddings ``emb`` (B, d)."""
        p = nn.functional.normalize(self.P.weight, p=2, dim=1)  # (A, dim)
        q = self.text_proj(emb)  # (B, dim)
        return self.classifier(q[:, None, :] * p[None, :, :]).squeeze(-1)  # (B, A)

    def pair_logits(self, emb: torch.Tensor, win: torch.Tensor, lose: torch.Tensor) -> torch.Tensor:
        """(N,) s(win, q) - s(lose, q) for battles with query embeddings ``emb`` (N, d)."""
        p = nn.functional.normalize(self.P(torch.stack([win, lose])), p=2, dim=-1)  # (2, N, dim)
        q = self.text_proj(emb)  # (N, dim)
        return self.classifier((p[0] - p[1]) * q).squeeze(-1)


def battles(reward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(problem, winner, loser) index tensors of every pair of collected assignments of one problem
    with different rewards (``reward`` (P, A), NaN = not collected); ties are dropped."""
    A = reward.shape[1]
    i, j = torch.triu_indices(A, A, offset=1)  # (n_pairs,)
    ri, rj = reward[:, i], reward[:, j]  # (P, n_pairs)
    keep = ~(torch.isnan(ri) | torch.isnan(rj)) & (ri != rj)
    p, k = keep.nonzero(as_tuple=True)
    first_wins = ri[p, k] > rj[p, k]
    win = torch.where(first_wins, i[k], j[k])
    lose = torch.where(first_wins, j[k], i[k])
    return p, win, lose


@register_router("routellm_mf")
class MFRouter(ThresholdRouter):
    """RouteLLM matrix factorisation over assignments (see the module docstring)."""

    config_cls: ClassVar[type[BaselineConfig]] = MFConfig
    config: MFConfig

    def _build(self, text_dim: int) -> None:
        self.model = MFModel(self.space.size, text_dim, self.config.dim)

    def _fit(self, data: FitData) -> None:
        assert data.emb is not None
        cfg = self.config
        self._build(data.emb.shape[1])
        emb = data.emb
        prob, win, lose = battles(data.table.reward.double())
        opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        loss_fn = nn.BCEWithLogitsLoss()
        gen = torch.Generator().manual_seed(cfg.seed)
        self.model.train()
        for _ in range(cfg.epochs if len(prob) else 0):
            for b in batches(len(prob), cfg.batch_size, gen):
                e = emb[prob[b]]
                e = e + cfg.noise * torch.randn(e.shape, generator=gen, dtype=e.dtype)
                logits = self.model.pair_logits(e, win[b], lose[b])
                loss = loss_fn(logits, torch.ones_like(logits))
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.model.eval()

    def _utility(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        return self.model(self.embed(self.prompt_texts(prompts)))  # (B, A)

    def win_probs(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        s = self.utility(prompts)  # (B, A)
        return torch.sigmoid(s[:, :, None] - s[:, None, :])  # (B, A, A)

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return dict(self.model.state_dict()), self._threshold_extra()

    def _restore(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self._build(tensors["text_proj.weight"].shape[1])
        self.model.load_state_dict(tensors)
        self.model.eval()
        self._restore_threshold(extra)
