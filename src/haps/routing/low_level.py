"""The low-level router (paper Sec. 3.2, App. A.2): per-request LoRA generated for the chosen models, on the
high-level router's own backbone, and the `HierarchicalRouter` that makes both decisions.

For every *open* pool model k a generator s_k (a registry entry; `mlp` by default) maps the pooled
routing-prompt state to one (A, B) pair per target layer of model k::

    h   = pool(backbone(p))                    # (B, d): masked mean (default) or last token of the last hidden
                                               #         state after the final norm, same pass as P(z | p)
    h   = h + role_embedding[role]             # per_role only (Teacher and Student may get different adapters)
    u   = ReLU(W2 ReLU(W1 h))                  # (B, hidden): the 2-layer MLP (256 units by default)
    A_l = out_A(u).view(d_out, r)              # expand, one per target layer l (or one shared by all)
    B_l = out_B(u).view(r, d_in)               # shrink
    W_l <- W_l + alpha * A_l @ B_l             # paper Eq. 7: a plain multiplier alpha (0.01), not alpha / r

Initialisation ``zero_update`` (default): ``out_A``'s weights and bias are zero and ``out_B`` keeps PyTorch's
default init, so the first generated update A B is exactly zero while the generator still gets gradient:
dL/dA = alpha g (B x)^T with B x != 0. This is LoRA's own init; in PEFT/LoRA-paper naming the zeroed
matrix is ``lora_B`` (the expand), which is haps' A. ``xavier`` reproduces the authors' code: Xavier-uniform
on every weight, zero biases, a non-zero random update from step 0.

Parameter sharing (Remark 2): with ``share_backbone`` (default) the generators read the pooled state of the
backbone that scores P(z | p), so the low-level loss reaches theta; otherwise they read a frozen copy of it
(the paper's Fig. 3 ablation). Closed models get no generator and no adapter (Eq. 6).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from haps.config import LoraTarget
from haps.errors import ConfigError
from haps.models.lora import LoraSites
from haps.models.types import RowAdapter
from haps.registry import class_registrar
from haps.routing.high_level import HighLevelRouter, candidate_scores
from haps.routing.prompt import RoutingPrompt
from haps.routing.space import Assignment

Pooling = Literal["mean", "last"]
Init = Literal["zero_update", "xavier"]


class LowLevelConfig(BaseModel):
    """The adapter generators (one per open pool model)."""

    model_config = ConfigDict(extra="forbid")

    generator: str = Field(default="mlp", description="Generator registry name (`GENERATORS`).")
    hidden: int = Field(default=256, ge=1, description="Width of the generator MLP (paper: 256).")
    mlp_layers: int = Field(default=2, ge=1, description="Hidden layers of the generator MLP (paper: 2).")
    pooling: Pooling = Field(default="mean", description="How the routing prompt's last hidden states become one "
                             "vector: attention-masked mean (authors' code) or the last token.")
    init: Init = Field(default="zero_update", description="`zero_update`: the first update is exactly zero (LoRA's "
                       "init); `xavier`: the authors' code (Xavier-uniform weights, a random update from step 0).")
    share_across_layers: bool = Field(default=False, description="One (A, B) pair reused in every adapted layer "
                                      "(the authors' code); default one pair per layer.")
    per_role: bool = Field(default=False, description="Condition the generator on the role (a learned embedding "
                           "added to the pooled state), so two roles on one model may get different adapters.")
    share_backbone: bool = Field(default=True, description="Generators read the high-level router's backbone "
                                 "(trained by both losses); false: a frozen copy of it (paper Fig. 3 ablation).")


GENERATORS: dict[str, type[AdapterGenerator]] = {}

#: Class decorator: ``@register_generator(name)`` makes an adapter generator available by name.
register_generator = class_registrar(GENERATORS, "adapter generator")


class AdapterGenerator(nn.Module, ABC):
    """Maps pooled routing-prompt states (and roles) to one model's adapters."""

    name: ClassVar[str] = ""

    def __init__(self, d_model: int, sites: LoraSites, rank: int, cfg: LowLevelConfig, n_roles: int) -> None:
        super().__init__()
        shapes = set(sites.shapes)
        if len(shapes) != 1:
            raise ConfigError(f"the target layers have different shapes {sorted(shapes)}; a generator needs one "
                              "projection shape per model (pick layers of one kind with lora.module_name).")
        (self.d_out, self.d_in), = shapes
        self.n_layers = len(sites.layers)
        self.rank = rank
        self.cfg = cfg

    @abstractmethod
    def forward(self, pooled: torch.Tensor, roles: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """pooled (n, d), roles (n,) long or None -> A (n, L, d_out, r), B (n, L, r, d_in) for L target layers."""


@register_generator("mlp")
class MLPGenerator(AdapterGenerator):
    """The paper's generator: Linear(d, h)-ReLU-[Linear(h, h)-ReLU]... then out_A, out_B (module docstring)."""

    def __init__(self, d_model: int, sites: LoraSites, rank: int, cfg: LowLevelConfig, n_roles: int) -> None:
        super().__init__(d_model, sites, rank, cfg, n_roles)
        dims = [d_model] + [cfg.hidden] * cfg.mlp_layers
        self.trunk = nn.Sequential(*[m for a, b in zip(dims, dims[1:], strict=False) for m in (nn.Linear(a, b), nn.ReLU())])
        self.pairs = 1 if cfg.share_across_layers else self.n_layers
        self.out_A = nn.Linear(cfg.hidden, self.pairs * self.d_out * rank)
        self.out_B = nn.Linear(cfg.hidden, self.pairs * rank * self.d_in)
        self.role_embedding = nn.Embedding(n_roles, d_model) if cfg.per_role else None
        if cfg.init == "xavier":
            for mod in self.modules():
                if isinstance(mod, nn.Linear):
                    nn.init.xavier_uniform_(mod.weight)
                    nn.init.zeros_(mod.bias)
        else:
            nn.init.zeros_(self.out_A.weight)
            nn.init.zeros_(self.out_A.bias)
        if self.role_embedding is not None:
            nn.init.zeros_(self.role_embedding.weight)  # starts as the per-model generator

    def forward(self, pooled: torch.Tensor, roles: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = pooled.to(self.out_A.weight.dtype)
        if self.role_embedding is not None:
            if roles is None:
                raise ConfigError("per_role generators need the role of each row.")
            h = h + self.role_embedding(roles)
        u = self.trunk(h)  # (n, hidden)
        n = u.shape[0]
        A = self.out_A(u).view(n, self.pairs, self.d_out, self.rank)
        B = self.out_B(u).view(n, self.pairs, self.rank, self.d_in)
        if self.pairs == 1 and self.n_layers > 1:  # one pair reused in every adapted layer
            A, B = A.expand(n, self.n_layers, -1, -1), B.expand(n, self.n_layers, -1, -1)
        return A, B


def pool_states(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """hidden (B, L, d), mask (B, L) of the tokens to pool (left padding) -> (B, d)."""
    m = mask.to(hidden.dtype)[..., None]  # (B, L, 1)
    if pooling == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)  # index of each row's last own token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@dataclass
class Decision:
    """The hierarchical router's decision for one routing prompt."""

    assignment: Assignment
    log_prob: torch.Tensor  # scalar log P(z | p) (with grad when routed with grad)
    probs: torch.Tensor  # (A,) P(. | p), detached
    adapters: dict[str, RowAdapter | None]  # per role; None for closed models or with adapters off
    norms: dict[str, float | None] = field(default_factory=dict)  # ||alpha A B||_F per role


class HierarchicalRouter:
    """The high-level router plus one adapter generator per open pool model, on one backbone."""

    def __init__(self, high: HighLevelRouter, generators: dict[str, AdapterGenerator], target: LoraTarget,
                 sites: dict[str, LoraSites], cfg: LowLevelConfig, heads_backbone: nn.Module | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        missing = [m for m in generators if m not in high.space.models]
        if missing:
            raise ConfigError(f"generators for {missing}, which the router's space {list(high.space.models)} lacks.")
        if not cfg.share_backbone and heads_backbone is None:
            raise ConfigError("share_backbone=false needs the frozen backbone copy the generators read.")
        self.high = high
        self.generators = nn.ModuleDict(generators)
        self.target = target
        self.sites = dict(sites)
        self.cfg = cfg
        self.heads_backbone = heads_backbone
        if heads_backbone is not None:
            heads_backbone.eval().requires_grad_(False)
        self.meta = dict(meta or {})

    @classmethod
    def build(cls, high: HighLevelRouter, sites: dict[str, LoraSites], target: LoraTarget,
              cfg: LowLevelConfig | None = None, seed: int = 0) -> HierarchicalRouter:
        """Fresh generators (seeded) for every model in ``sites`` (the pool's open models)."""
        cfg = cfg or LowLevelConfig()
        if cfg.generator not in GENERATORS:
            raise ConfigError(f"unknown adapter generator {cfg.generator!r}; known: {sorted(GENERATORS)}.")
        d_model = high.model.config.hidden_size
        gens = {}
        with torch.random.fork_rng():  # seeded initialisation that leaves the caller's RNG alone
            for i, (name, s) in enumerate(sorted(sites.items())):
                torch.manual_seed(seed * 1000 + i)
                gens[name] = GENERATORS[cfg.generator](d_model, s, target.rank, cfg, len(high.space.roles))
        heads_backbone = None if cfg.share_backbone else copy.deepcopy(high.model)
        return cls(high, gens, target, sites, cfg, heads_backbone)

    @property
    def space(self):
        return self.high.space

    def parameters(self, part: Literal["backbone", "heads"]) -> list[nn.Parameter]:
        if part == "backbone":
            return list(self.high.parameters())
        return list(self.generators.parameters())

    def train_mode(self, flag: bool = True) -> None:
        self.high.train_mode(flag)
        self.generators.train(flag).requires_grad_(flag)

    def backbone_to(self, dtype: torch.dtype) -> None:
        """Run the backbone (and the frozen copy, if any) in ``dtype``, for inference: the router's pass is
        compute-bound, and bf16 matmuls are several times faster where they are native (`haps.dtypes`).
        The generators stay in their dtype (pooled states are cast to it), so adapters come out as before up to
        the backbone's rounding; scores are computed in fp32 from the backbone's logits either way."""
        if any(True for _ in self.high.parameters()):  # trainable weights: the optimiser keeps fp32
            raise ConfigError("backbone_to is for inference: call train_mode(False) first (training keeps fp32).")
        self.high.model.to(dtype)
        if self.heads_backbone is not None:
            self.heads_backbone.to(dtype)

    # ------------------------------------------------------------------ routing
    def decide(self, prompts: Sequence[RoutingPrompt], decision: Literal["argmax", "sample", "given"] = "argmax", *,
               assignments: Sequence[Assignment] | None = None, adapters: bool = True,
               generator: torch.Generator | None = None, allowed: torch.Tensor | None = None) -> list[Decision]:
        """One `Decision` per prompt; gradients flow when grad is enabled (training). ``allowed`` (B, A) bool:
        argmax / sampling only among those assignments (e.g. the ones under a cost budget); ``probs`` and
        ``log_prob`` stay those of the whole distribution."""
        if not prompts:
            return []
        if decision == "given" and (assignments is None or len(assignments) != len(prompts)):
            raise ConfigError("decision='given' needs one assignment per prompt.")
        log_p, pooled = self._score(prompts, need_states=adapters and bool(self.generators))
        choose = log_p.detach()
        if allowed is not None:
            if tuple(allowed.shape) != tuple(choose.shape) or not bool(allowed.any(-1).all()):
                raise ConfigError(f"allowed must be (prompts, assignments) = {tuple(choose.shape)} with at least one "
                                  f"assignment per prompt, got {tuple(allowed.shape)}.")
            choose = choose.masked_fill(~allowed.to(choose.device), float("-inf"))
        if decision == "argmax":
            idx = choose.argmax(-1).tolist()
        elif decision == "sample":
            g = generator if generator is not None else self.high.generator
            idx = torch.multinomial(choose.float().exp().cpu(), 1, generator=g).squeeze(1).tolist()
        else:
            idx = [self.space.index(z) for z in assignments]
        zs = [self.space.at(i) for i in idx]
        ads = self.generate(pooled, zs) if adapters and pooled is not None else [
            {r: None for r in self.space.roles} for _ in zs]
        out = []
        for b, (z, i) in enumerate(zip(zs, idx, strict=True)):
            norms = {r: (None if a is None else a.update_norm(self.target.alpha)) for r, a in ads[b].items()}
            out.append(Decision(z, log_p[b, i], log_p[b].detach().exp(), ads[b], norms))
        return out

    def _score(self, prompts: Sequence[RoutingPrompt], need_states: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log P(z | p) (B, A), pooled states (B, d) or None), from one backbone pass per prompt batch."""
        high = self.high
        if not high.enumerable:
            raise ConfigError(f"the hierarchical router scores every assignment; the space has {self.space.size} "
                              f"(> max_enumerate={high.max_enumerate}).")
        cands = [high.answer_ids(z) for z in self.space.assignments()]
        pids = [high.prompt_ids(p) for p in prompts]
        scores, pooled = [], []
        bs = high.config.batch_size
        for s in range(0, len(prompts), bs):
            chunk = pids[s:s + bs]
            sc, _, hidden, own = candidate_scores(high.model, chunk, [cands] * len(chunk), high.pad_id,
                                                  prompt_states=True)
            scores.append(sc)
            if need_states:
                if self.heads_backbone is not None:  # no sharing: the frozen copy's states
                    hidden, own = self._frozen_states(chunk)
                pooled.append(pool_states(hidden, own, self.cfg.pooling))
        log_p = torch.log_softmax(torch.cat(scores), dim=-1)
        return log_p, (torch.cat(pooled) if need_states else None)

    @torch.no_grad()
    def _frozen_states(self, pids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        from haps.models.padding import left_pad

        dev = next(self.heads_backbone.parameters()).device
        ids, mask = left_pad(pids, self.high.pad_id, dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.heads_backbone.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos,
                                                   use_cache=False).last_hidden_state
        return hidden, mask

    def generate(self, pooled: torch.Tensor, assignments: Sequence[Assignment]) -> list[dict[str, RowAdapter | None]]:
        """Adapters per role for pooled states (B, d) and assignments: one generator pass per model over the
        rows that chose it. Without ``per_role`` both roles on one model share one `RowAdapter` (one slot)."""
        roles = self.space.roles
        out: list[dict[str, RowAdapter | None]] = [{r: None for r in roles} for _ in assignments]
        for name, gen in self.generators.items():
            k = self.space.models.index(name)
            pairs = [(b, ri) for b, z in enumerate(assignments) for ri, m in enumerate(z) if m == k]
            if not self.cfg.per_role:  # one row per problem, shared by its roles on this model
                pairs = list({b: (b, ri) for b, ri in pairs}.values())
            if not pairs:
                continue
            rows = torch.tensor([b for b, _ in pairs], device=pooled.device)
            role_ids = torch.tensor([ri for _, ri in pairs], device=pooled.device) if self.cfg.per_role else None
            A, B = gen(pooled.index_select(0, rows), role_ids)  # (n, L, d_out, r), (n, L, r, d_in)
            for j, (b, ri) in enumerate(pairs):
                adapter = RowAdapter(A=list(A[j].unbind(0)), B=list(B[j].unbind(0)))
                for rj, m in enumerate(assignments[b]):
                    if m == k and (rj == ri or not self.cfg.per_role):
                        out[b][roles[rj]] = adapter
        return out
