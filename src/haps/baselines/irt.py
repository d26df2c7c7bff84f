"""IRT-Router, multidimensional IRT variant (Song et al., ACL 2025, "IRT-Router: Effective and
Interpretable Multi-LLM Routing via Item Response Theory", arXiv 2506.01048), over assignments.

Each assignment z is one "LLM" (examinee) with an ability vector computed from the embedding of its
text (``teacher=m0 (desc), student=m1 (desc)``, as IRT-Router embeds an LLM's profile); each query is an
item with a discrimination vector and a difficulty from its embedding::

    theta_z = W_theta e_z          (latent,)     e_z: assignment-text embedding
    a_q     = softplus(W_a e_q)    (latent,)     discrimination (non-negative)
    b_q     = W_b e_q              scalar        difficulty
    P(correct | z, q) = sigmoid(a_q . theta_z - b_q)

Trained by BCE with the reward min-max normalised over the train split as a soft label in [0, 1]
(Adam lr 1e-3, batch 512 (query, assignment) pairs, latent dim 25). The routing score is
``alpha * P - (1 - alpha) * cost_norm(z)`` with cost_norm the min-max-normalised mean train cost of z;
HAPS App. C uses the paper's beta = 0 setting, i.e. alpha = 1 (the default).

Cold start (the paper's warm-up for new queries, lambda = 0.3): at inference a query embedding is
replaced by ``(1 - lambda) e_q + lambda * mean(e of its k = 5 nearest training queries)`` (cosine);
training uses the raw embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from haps.baselines.base import (
    BaselineConfig,
    BaselineRouter,
    FitData,
    batches,
    minmax_normalise,
    nan_minmax,
    observed,
)
from haps.baselines.knn import knn_indices
from haps.routing.base import register_router
from haps.routing.prompt import RoutingPrompt


class IRTConfig(BaselineConfig):
    latent: int = Field(default=25, ge=1, description="Dimension of theta_z and a_q (IRT-Router MIRT: 25).")
    alpha: float = Field(default=1.0, ge=0, le=1, description="Score = alpha * P - (1 - alpha) * cost_norm; 1 is "
                         "the paper's beta = 0 setting.")
    cold_start_lambda: float = Field(default=0.3, ge=0, le=1, description="Weight of the neighbours' mean "
                                     "embedding in a new query's embedding (0: no warm-up).")
    cold_start_k: int = Field(default=5, ge=1, description="Nearest training queries averaged for the warm-up.")
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate.")
    batch_size: int = Field(default=512, ge=1, description="(query, assignment) pairs per optimiser step.")
    epochs: int = Field(default=200, ge=1, description="Passes over the pairs.")


class MIRTModel(nn.Module):
    """P(correct | z, q) = sigmoid(softplus(W_a e_q) . (W_theta e_z) - W_b e_q)."""

    def __init__(self, emb_dim: int, latent: int) -> None:
        super().__init__()
        self.theta = nn.Linear(emb_dim, latent)
        self.a = nn.Linear(emb_dim, latent)
        self.b = nn.Linear(emb_dim, 1)

    def logits(self, query_emb: torch.Tensor, llm_emb: torch.Tensor) -> torch.Tensor:
        """(B, A) a_q . theta_z - b_q for query embeddings (B, d) and assignment embeddings (A, d)."""
        a = nn.functional.softplus(self.a(query_emb))  # (B, latent)
        theta = self.theta(llm_emb)  # (A, latent)
        return a @ theta.T - self.b(query_emb)  # (B, A)

    def pair_logits(self, query_emb: torch.Tensor, llm_emb: torch.Tensor) -> torch.Tensor:
        """(N,) logits of aligned pairs: query embeddings (N, d), assignment embeddings (N, d)."""
        a = nn.functional.softplus(self.a(query_emb))
        return (a * self.theta(llm_emb)).sum(-1) - self.b(query_emb).squeeze(-1)


@register_router("irt")
class IRTRouter(BaselineRouter):
    """IRT-Router (MIRT) over assignments (see the module docstring)."""

    config_cls: ClassVar[type[BaselineConfig]] = IRTConfig
    config: IRTConfig

    def _build(self, emb_dim: int) -> None:
        self.model = MIRTModel(emb_dim, self.config.latent)

    def _fit(self, data: FitData) -> None:
        assert data.emb is not None
        cfg = self.config
        self._build(data.emb.shape[1])
        self.train_emb = data.emb.clone()  # (n, d), for the cold-start warm-up
        self.llm_emb = self.embed(data.descriptions)  # (A, d)
        p, z, r = observed(data.table)
        self.reward_range = nan_minmax(data.table.reward.double())
        y = minmax_normalise(r, *self.reward_range).float()  # (N,) soft labels
        opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.model.train()
        for _ in range(cfg.epochs if len(p) else 0):
            for b in batches(len(p), cfg.batch_size, gen):
                logits = self.model.pair_logits(self.train_emb[p[b]], self.llm_emb[z[b]])
                loss = nn.functional.binary_cross_entropy_with_logits(logits, y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.model.eval()

    def warm_start(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, d) (1 - lambda) e_q + lambda * mean of the k nearest training query embeddings."""
        lam = self.config.cold_start_lambda
        if lam == 0.0:
            return emb
        idx = knn_indices(emb, self.train_emb, self.config.cold_start_k, "cosine")  # (B, k)
        return (1 - lam) * emb + lam * self.train_emb[idx].mean(dim=1)

    def correct_probs(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        """(B, A) P(correct | z, q) after the cold-start warm-up."""
        self._check_fitted()
        with torch.no_grad():
            e = self.warm_start(self.embed(self.prompt_texts(prompts)))
            return torch.sigmoid(self.model.logits(e, self.llm_emb))

    def _utility(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        a = self.config.alpha
        cost = minmax_normalise(self.assignment_cost, *nan_minmax(self.assignment_cost))  # (A,)
        return a * self.correct_probs(prompts) - (1 - a) * cost[None, :]

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        st = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        st.update(train_emb=self.train_emb, llm_emb=self.llm_emb)
        return st, {"reward_range": list(self.reward_range)}

    def _restore(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self._build(tensors["train_emb"].shape[1])
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.model.eval()
        self.train_emb, self.llm_emb = tensors["train_emb"], tensors["llm_emb"]
        self.reward_range = tuple(extra["reward_range"])
