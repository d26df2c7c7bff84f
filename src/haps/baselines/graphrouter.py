"""GraphRouter (Feng et al., ICLR 2025, "GraphRouter: A Graph-based Router for LLM Selections",
arXiv 2410.03834; ``ulab-uiuc/GraphRouter`` ``model/graph_nn.py``), over assignments.

A heterogeneous graph with one node per training query and one per assignment (each assignment z is
one "LLM" node, described by its text ``teacher=m0 (desc), student=m1 (desc)``); an edge (q, z) for
every collected r(q, z), directed query -> assignment, with edge attributes
[normalised effect, normalised cost]. As in the authors' code::

    x_q  = [Linear(task emb) || Linear(query emb)]                    (2h,)   query nodes
    x_z  = Linear(description emb)                                    (2h,)   assignment nodes
    a    = relu(Linear(edge attr))                                    (E, 2)  visible edges only
    x'   = bn2(conv2(relu(bn1(conv1(x, visible, a))), visible, a))  conv = torch_geometric GeneralConv
    P(edge (q, z) is the best) = sigmoid(mean(x_q * x'_z))

Training (full graph, AdamW lr 1e-3, weight decay 1e-4, a fixed number of steps): each step draws
``masks_per_step`` random masks that hide a share ``mask_rate`` of the training edges; the hidden
edges are predicted from the visible ones (the authors' code draws it the other way round, keeping a
share ``train_mask_rate`` visible) and scored by BCE against the label "z is a best assignment of q"
under the utility
``alpha * effect_norm - beta * cost_norm`` (min-max normalised over the train split; "performance_first"
(1, 0) by default, "balance" (0.5, 0.5), "cost_first" (0.2, 0.8)). Ties: every assignment with the
best utility is labelled 1 (the authors' arg max keeps the first; with 0/1 task scores most queries
tie). ``effect`` is the table's reward by default (the objective every haps router maximises; with a
``score`` reward it is the task metric the paper calls effect) or its score.

Departures from the authors' code: the convolutions aggregate by ``mean`` by default (``aggr``; theirs
sum): at inference every training edge is visible, so a sum is larger than any sum seen in training
and BatchNorm's running statistics do not undo it (on the planted table of the tests, with the
defaults, the summing variant closes 41% of the gap from the best static choice to the oracle, the
mean variant all of it). The task feature is the embedded task text (the workflow name) where theirs
embeds a task description; there is no early stopping on a validation split.

At inference the graph is the whole training graph (every training edge visible, BatchNorm in eval
mode), so the assignment representations x'_z do not depend on the new queries: they are computed once
after fitting and stored. utility(q, z) = sigmoid(mean(x_q * x'_z)) (B, A).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from haps.baselines.base import BaselineConfig, BaselineRouter, FitData, minmax_normalise, nan_minmax
from haps.errors import ConfigError
from haps.routing.base import register_router
from haps.routing.prompt import RoutingPrompt

REGIMES: dict[str, tuple[float, float]] = {
    "performance_first": (1.0, 0.0), "balance": (0.5, 0.5), "cost_first": (0.2, 0.8),
}


class GraphRouterConfig(BaselineConfig):
    regime: Literal["performance_first", "balance", "cost_first"] = Field(
        default="performance_first", description="Utility weights (alpha, beta) of the labels: (1, 0), (0.5, 0.5) "
        "or (0.2, 0.8) on min-max-normalised effect and cost (GraphRouter's three scenarios).")
    effect: Literal["reward", "score"] = Field(default="reward", description="What the effect is: the table's "
                                               "reward (default) or its task score.")
    hidden: int = Field(default=64, ge=1, description="h: each half of a node feature; nodes are 2h wide.")
    mask_rate: float = Field(default=0.3, gt=0, lt=1, description="Share of training edges hidden (and "
                             "predicted) by each random mask (the authors use 0.3-0.5).")
    masks_per_step: int = Field(default=1, ge=1, description="Random masks averaged per optimiser step (the "
                                "authors' `batch_size`).")
    aggr: Literal["mean", "add"] = Field(default="mean", description="GeneralConv neighbourhood aggregation. The "
                                         "authors' code sums ('add'); a sum over visible edges grows when inference "
                                         "shows every training edge, so 'mean' keeps train and inference on one scale.")
    epochs: int = Field(default=1000, ge=1, description="Optimiser steps (full graph each; no early stopping).")
    lr: float = Field(default=1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(default=1e-4, ge=0, description="AdamW weight decay.")


def general_conv() -> type[nn.Module]:
    """``torch_geometric.nn.GeneralConv``, imported on first use (torch_geometric's import scripts a class
    with the deprecated ``torch.jit.script``; that one import-time warning is silenced, nothing else)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
            from torch_geometric.nn import GeneralConv
    except ImportError as e:
        raise ConfigError(f"GraphRouter needs torch_geometric ({e}); pip install torch_geometric.") from e
    return GeneralConv


class GraphRouterNet(nn.Module):
    """The authors' encoder-decoder: feature alignment, two GeneralConv layers with edge attributes."""

    def __init__(self, emb_dim: int, hidden: int, edge_dim: int = 2, aggr: str = "mean") -> None:
        GeneralConv = general_conv()
        super().__init__()
        self.task_transform = nn.Linear(emb_dim, hidden)
        self.query_transform = nn.Linear(emb_dim, hidden)
        self.llm_transform = nn.Linear(emb_dim, 2 * hidden)
        self.edge_mlp = nn.Linear(edge_dim, edge_dim)
        self.conv1 = GeneralConv(2 * hidden, 2 * hidden, in_edge_channels=edge_dim, aggr=aggr)
        self.conv2 = GeneralConv(2 * hidden, 2 * hidden, in_edge_channels=edge_dim, aggr=aggr)
        self.bn1 = nn.BatchNorm1d(2 * hidden)
        self.bn2 = nn.BatchNorm1d(2 * hidden)

    def query_features(self, task_emb: torch.Tensor, query_emb: torch.Tensor) -> torch.Tensor:
        """(n, 2h) [Linear(task emb) || Linear(query emb)]."""
        return torch.cat([self.task_transform(task_emb), self.query_transform(query_emb)], dim=1)

    def encode(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        """(N, 2h) node representations after the two convolutions over the edges given (2, E), (E, 2)."""
        a = torch.relu(self.edge_mlp(edge_attr))  # (E, 2)
        x = torch.relu(self.bn1(self.conv1(x, edge_index, edge_attr=a)))
        return self.bn2(self.conv2(x, edge_index, edge_attr=a))

    @staticmethod
    def edge_score(x_query: torch.Tensor, x_llm: torch.Tensor) -> torch.Tensor:
        """sigmoid(mean(x_q * x_z)) for aligned rows (E, 2h), (E, 2h) -> (E,)."""
        return torch.sigmoid((x_query * x_llm).mean(dim=-1))


def best_labels(effect: torch.Tensor, cost: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """(P, A) 1.0 where z maximises alpha * effect - beta * cost for the problem (ties: all of them),
    over collected entries (NaN effect = not collected, label 0)."""
    u = alpha * effect - beta * cost
    u = torch.nan_to_num(u, nan=-torch.inf)
    best = u.max(dim=1, keepdim=True).values
    return ((u == best) & torch.isfinite(u)).double()


@register_router("graphrouter")
class GraphRouter(BaselineRouter):
    """GraphRouter over assignments (see the module docstring)."""

    config_cls: ClassVar[type[BaselineConfig]] = GraphRouterConfig
    config: GraphRouterConfig

    def _build(self, emb_dim: int) -> None:
        self.net = GraphRouterNet(emb_dim, self.config.hidden, aggr=self.config.aggr)

    def _fit(self, data: FitData) -> None:
        assert data.emb is not None
        cfg = self.config
        table = data.table
        n, A = table.reward.shape
        self._build(data.emb.shape[1])
        effect_raw = (table.reward if cfg.effect == "reward" else table.score).double()
        self.effect_range = nan_minmax(effect_raw)
        self.cost_range = nan_minmax(table.cost.double())
        effect = minmax_normalise(effect_raw, *self.effect_range)  # (n, A)
        cost = minmax_normalise(table.cost.double(), *self.cost_range)
        alpha, beta = REGIMES[cfg.regime]
        labels = best_labels(effect, cost, alpha, beta)  # (n, A)
        have = ~torch.isnan(effect_raw)
        q, z = have.nonzero(as_tuple=True)  # E collected edges
        edge_index = torch.stack([q, n + z])  # (2, E): query node -> assignment node
        edge_attr = torch.stack([effect[q, z], torch.nan_to_num(cost[q, z], nan=0.0)], dim=1).float()  # (E, 2)
        y = labels[q, z].float()  # (E,)
        query_emb = data.emb  # (n, d) float32, as every model tensor
        task_emb = self._task_embeddings(data.tasks)
        llm_emb = self.embed(data.descriptions)  # (A, d)
        gen = torch.Generator().manual_seed(cfg.seed)
        opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.net.train()
        E = edge_index.shape[1]
        for _ in range(cfg.epochs if E else 0):
            opt.zero_grad()
            loss = torch.zeros(())
            for _ in range(cfg.masks_per_step):
                hide = torch.rand(E, generator=gen) < cfg.mask_rate  # (E,) predicted from the rest
                if not hide.any() or hide.all():
                    continue
                x0 = torch.cat([self.net.query_features(task_emb, query_emb), self.net.llm_transform(llm_emb)])
                x = self.net.encode(x0, edge_index[:, ~hide], edge_attr[~hide])
                src, dst = edge_index[:, hide]
                pred = self.net.edge_score(x0[src], x[dst])
                loss = loss + nn.functional.binary_cross_entropy(pred, y[hide])
            if not loss.requires_grad:  # every mask hid all or none of the edges (a tiny graph)
                continue
            (loss / cfg.masks_per_step).backward()
            opt.step()
        self.net.eval()
        self.tasks = sorted(set(data.tasks))
        with torch.no_grad():  # the assignment nodes over the whole training graph
            x0 = torch.cat([self.net.query_features(task_emb, query_emb), self.net.llm_transform(llm_emb)])
            self.llm_repr = self.net.encode(x0, edge_index, edge_attr)[n:].clone()  # (A, 2h)

    def _task_embeddings(self, tasks: Sequence[str]) -> torch.Tensor:
        """(n, d) embeddings of the task texts (each distinct text embedded once)."""
        uniq = list(dict.fromkeys(tasks))
        e = self.embed(uniq)
        pos = {t: i for i, t in enumerate(uniq)}
        return e[torch.tensor([pos[t] for t in tasks], dtype=torch.long)]

    def _utility(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        q = self.embed(self.prompt_texts(prompts))
        tasks = self.prompt_texts(prompts, "task")
        unseen = sorted(set(tasks) - set(self.tasks))
        if unseen:
            warnings.warn(f"graphrouter: tasks {unseen} were not in its training data {self.tasks}; fit it with "
                          "tasks=<the workflow name> (what routing prompts carry as meta['task']).",
                          UserWarning, stacklevel=3)
        t = self._task_embeddings(tasks)
        xq = self.net.query_features(t, q)  # (B, 2h)
        return self.net.edge_score(xq[:, None, :], self.llm_repr[None, :, :])  # (B, A)

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        st = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        st["llm_repr"] = self.llm_repr
        return st, {"effect_range": list(self.effect_range), "cost_range": list(self.cost_range),
                    "tasks": self.tasks}

    def _restore(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self._build(tensors["net.query_transform.weight"].shape[1])
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.net.eval()
        self.llm_repr = tensors["llm_repr"]
        self.effect_range = tuple(extra["effect_range"])
        self.cost_range = tuple(extra["cost_range"])
        self.tasks = list(extra["tasks"])
