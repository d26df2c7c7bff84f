"""Phase 2 of the paper (Algorithm 3, Eq. 5 and 9): joint RL of the high-level router and the adapter generators.

Per step (a batch of training problems)::

    z ~ P(z | p)            (or argmax: route "greedy", the authors' code; or random / fixed: no high level)
    w_z = s_z(p)            adapters of the chosen open models (heads on the shared backbone)
    episodes                all in lockstep, sampled (T = 1, top-p 0.9), adapters injected; G per problem
    r = shape(score, cost)  -1 if the score is 0 else the score (or the cost-aware reward)
    L = -(1/E) sum_e w_e (log P(z_e | p_e) + sum_t log pi(a_t))            (haps.train.rl_loss)

Routing and adapter generation for the episodes run without gradients. Token log-probs with gradients come
from batched teacher-forced re-scoring of the recorded completions (`LocalModel.score`, same temperature and
top-p nucleus as sampling; only the adapted layers, from the hidden states the episodes kept) into leaf
copies of the adapters; then the router graph is rebuilt `route_batch` prompts at a time (the same decisions)
and each chunk's backward carries those gradients and the routing term to the heads and the backbone, so
memory holds one chunk's graph (a router pass with gradients over a 400-token prompt is ~1.2 GB).
Closed-model turns add no token term; heads of models no episode used get no gradient and no update.

Resumable: every `save_every` steps the router, the optimiser, the scheduler and the trainer state go to
``OUT/state/step-N/`` (safetensors + JSON) and ``OUT/state/latest`` names it (written atomically); every
random choice of step k is seeded by (seed, k) and the data order by (seed, epoch), so a run killed at any
point and restarted with the same command redoes the steps after the last save exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from haps.errors import ConfigError, DataError
from haps.files import JsonlAppender, write_json_atomic
from haps.metrics import RewardConfig
from haps.routing.high_level import HighLevelRouterConfig
from haps.routing.low_level import LowLevelConfig
from haps.train.rl_loss import BaselineKind, TokenNorm, advantages, baselines, policy_loss, token_weights

STATE = "state"


class RLConfig(BaseModel):
    """Everything a `haps rl` run is made of. Fields marked (result) change results: a resumed run must match."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="Workflow name (hotpotqa | mmlu | a registered or file workflow).")
    data: str | None = Field(default=None, description="Problems JSONL (None: the embedded demo set).")
    limit: int | None = Field(default=None, ge=1, description="Problems read from the file (as `haps collect`).")
    problem_seed: int | None = Field(default=None, description="Seeded spread-out subset with --limit.")
    pool: str = Field(default="tiny", description="Built-in pool name or pool YAML.")
    workflow_options: dict[str, Any] = Field(default_factory=dict, description="Workflow options.")
    split_fractions: tuple[float, float, float] = Field(default=(0.6, 0.2, 0.2), description="train/valid/test, "
                                                        "as in `haps collect` (same seed: the same test problems).")
    split_seed: int = Field(default=0, description="Seed of the split.")
    train_limit: int | None = Field(default=300, ge=1, description="D_train^RL: first N training problems (paper 300).")
    valid_limit: int | None = Field(default=100, ge=1, description="D_valid^RL: first N validation problems (100).")
    test_limit: int | None = Field(default=None, ge=1, description="Test problems evaluated at the best checkpoint.")
    epochs: int = Field(default=1, ge=1, description="Passes over D_train^RL (authors: 3).")
    batch_size: int = Field(default=4, ge=1, description="Problems per update (paper: 1).")
    group_size: int = Field(default=1, ge=1, description="Episodes per problem (z and trajectory sampled each time).")
    route: Literal["sample", "greedy"] = Field(default="sample", description="z ~ P(z|p), or the argmax "
                                                 "(the authors' code).")
    high_level: Literal["router", "random", "fixed"] = Field(default="router", description="Ablation: `random` or "
                                                              "`fixed` z instead of the high-level router.")
    fixed_assignment: str | None = Field(default=None, description="high_level=fixed: role=model,role=model.")
    low_level: bool = Field(default=True, description="Generate adapters (false: the 'w/o low-level' ablation).")
    routing_term: bool = Field(default=True, description="Include log P(z|p) in the loss (Eq. 5; the authors' "
                               "code leaves it out).")
    baseline: BaselineKind = Field(default="none", description="none (paper) | mean (running) | group (RLOO).")
    token_norm: TokenNorm = Field(default="sum", description="Sum of token log-probs per episode (paper) or mean.")
    reward: RewardConfig = Field(default_factory=lambda: RewardConfig(kind="shaped"),
                                 description="shaped (paper: -1 if score is 0) | score | tradeoff.")
    cost_range: tuple[float, float] | None = Field(default=None, description="tradeoff: (c_min, c_max) of the "
                                                   "training costs (e.g. from the action table).")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature of the agents in training.")
    top_p: float = Field(default=0.9, gt=0, le=1, description="Nucleus of the agents' sampling in training.")
    max_new_tokens: int = Field(default=256, ge=1, description="Per call (authors: 256).")
    lr_backbone: float = Field(default=1e-6, ge=0, description="AdamW lr of the shared backbone (authors 1e-6).")
    lr_heads: float = Field(default=1e-5, ge=0, description="AdamW lr of the adapter generators (authors 1e-5).")
    weight_decay_backbone: float = Field(default=0.01, ge=0, description="Authors: 0.01.")
    weight_decay_heads: float = Field(default=0.0, ge=0, description="Authors: 0.")
    lr_end_factor: float = Field(default=0.1, gt=0, le=1, description="Linear decay from 1 to this over the run.")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Gradient clipping (None: off).")
    max_advantage: float | None = Field(default=5.0, gt=0, description="Clamp on the loss scale |r - b|.")
    validate_every: int = Field(default=10, ge=1, description="Validate (greedy, argmax z) every K steps.")
    patience: int = Field(default=4, ge=1, description="Stop after this many validations without a gain.")
    save_every: int = Field(default=1, ge=1, description="Write the resumable state every K steps.")
    score_batch: int = Field(default=8, ge=1, description="Rows per teacher-forced scoring pass.")
    route_batch: int = Field(default=1, ge=1, description="Prompts whose router graph is rebuilt and backpropagated "
                             "at once (about 1.2 GB each for SmolLM2 as the backbone and a 400-token prompt).")
    seed: int = Field(default=0, description="Seed of routing, sampling and data order.")
    last_k_layers: int | None = Field(default=None, ge=1, description="LoRA depth l_k (default: the pool's).")
    low_level_config: LowLevelConfig = Field(default_factory=LowLevelConfig, description="The generators.")
    router: HighLevelRouterConfig = Field(default_factory=HighLevelRouterConfig,
                                          description="The backbone when starting without an SFT checkpoint.")

    # fields that change no result (resuming with other values is fine): how often validation runs and state
    # is saved, how many rows one scoring or routing pass takes, and when to give up
    NO_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset({"validate_every", "save_every", "score_batch", "route_batch",
                                                            "patience"})


@dataclass
class StepRecord:
    step: int
    epoch: int
    reward_mean: float
    reward_std: float
    score_mean: float
    loss: float
    log_p_mean: float
    assignments: dict[str, int]
    adapter_norms: dict[str, float]
    tokens: int
    failed: int
    lr_backbone: float
    lr_heads: float
    seconds: dict[str, float] = field(default_factory=dict)


def _seed(*parts: Any) -> int:
    return int(hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:15], 16)


# ---------------------------------------------------------------------------------------------- data
@dataclass
class RLData:
    train: list
    valid: list
    test: list


def load_data(cfg: RLConfig, workflow, problems: list | None = None) -> RLData:
    """The splits of `haps collect` for the same data/limit/seed, then D_train^RL / D_valid^RL by limits."""
    from haps.data import load_problems, split_problems

    if problems is None:
        problems = load_problems(cfg.task, cfg.data, cfg.limit, sample_seed=cfg.problem_seed)
    if not problems:
        raise DataError(f"no {cfg.task} problems in {cfg.data or 'the demo set'}; give a non-empty data file.")
    parts = split_problems(problems, cfg.split_fractions, cfg.split_seed,
                           stratify_by=getattr(workflow, "stratify_by", None))
    data = RLData(parts["train"][: cfg.train_limit], parts["valid"][: cfg.valid_limit], parts["test"][: cfg.test_limit])
    if not data.train:
        raise DataError(f"the train split of {len(problems)} problems is empty; use more problems (--limit) or "
                        "larger train fractions.")
    return data


# ---------------------------------------------------------------------------------------------- recipe
class RLRecipe:
    """setup -> train (steps, validation, checkpoints) -> test at the best checkpoint."""

    def __init__(self, cfg: RLConfig, out: str | Path, progress: bool = True) -> None:
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.state: dict[str, Any] = {"step": 0, "best": None, "best_step": None, "bad_validations": 0,
                                      "reward_sum": 0.0, "reward_n": 0, "done": False}

    # ------------------------------------------------------------------ setup
    def setup(self, router_ckpt: str | Path | None = None, *, pool=None, workflow=None, router=None,
              problems: list | None = None) -> None:
        """Pool, workflow, data, router (SFT checkpoint, fresh backbone, or given), optimiser; resumes if
        ``OUT/state/latest`` exists. ``pool``, ``workflow``, ``router`` and ``problems`` replace the ones the
        config names (tests, programs)."""
        from haps.config import load_pool
        from haps.models.pool import ModelPool
        from haps.workflows import get_workflow

        cfg = self.cfg
        self._check_config()
        self.workflow = workflow or get_workflow(cfg.task, **cfg.workflow_options)
        if pool is None:
            pc = load_pool(cfg.pool)
            if cfg.last_k_layers is not None:
                pc = pc.model_copy(update={"lora": pc.lora.model_copy(update={"last_k_layers": cfg.last_k_layers})})
            pool = ModelPool(pc)
        self.pool = pool
        self.data = load_data(cfg, self.workflow, problems)
        resumed = self._resume_router()
        self.router = resumed or (router if router is not None else self._build_router(router_ckpt))
        self.router.meta.update(task=self.workflow.name, pool=cfg.pool)
        self._build_optimizer()
        if resumed is not None:
            self._resume_optimizer()
        self.normalizer = None
        if cfg.reward.kind == "tradeoff":
            from haps.metrics import CostNormalizer

            if cfg.cost_range is None:
                raise ConfigError("reward kind 'tradeoff' needs cost_range: (c_min, c_max) of the training costs "
                                  "(e.g. the min and max cost in the action table's train split).")
            self.normalizer = CostNormalizer(*cfg.cost_range)

    def _check_config(self) -> None:
        cfg = self.cfg
        if cfg.baseline == "group" and cfg.group_size < 2:
            raise ConfigError("baseline 'group' needs group_size >= 2 (episodes per problem).")
        if cfg.high_level == "fixed" and not cfg.fixed_assignment:
            raise ConfigError("high_level 'fixed' needs fixed_assignment: role=model,role=model.")
        if not cfg.low_level and (not cfg.routing_term or cfg.high_level != "router"):
            raise ConfigError("nothing to train: without the low-level router the loss is the routing term only; "
                              "keep routing_term on with high_level 'router'.")
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "config.json"
        want = self.cfg.model_dump(mode="json")
        if path.exists():
            have = json.loads(path.read_text())
            diffs = [k for k in sorted(set(have) | set(want))
                     if k not in RLConfig.NO_RESULT_FIELDS and have.get(k) != want.get(k)]
            if diffs:
                raise ConfigError(f"{self.out} holds an RL run made with other settings ({', '.join(diffs)}); "
                                  "resume with the same settings or use another --out.")
        write_json_atomic(path, want)

    def _build_router(self, ckpt):
        from haps.routing.checkpoints import FORMAT as HIER
        from haps.routing.checkpoints import load_hierarchical, read_manifest
        from haps.routing.high_level import HighLevelRouter, load_router
        from haps.routing.low_level import HierarchicalRouter
        from haps.routing.prompt import space_for

        space = space_for(self.workflow, self.pool)
        if ckpt is not None and read_manifest(ckpt).get("format") == HIER:
            return load_hierarchical(ckpt, self.pool.config, self.workflow.name)
        if ckpt is not None:
            high = load_router(ckpt)
            if high.space != space:
                raise ConfigError(f"SFT checkpoint {str(ckpt)!r} routes {list(high.space.models)} for roles "
                                  f"{list(high.space.roles)}, not {list(space.models)} / {list(space.roles)}.")
        else:
            import warnings

            warnings.warn("haps rl: no SFT checkpoint (--router): training starts from the untrained backbone "
                          f"{self.cfg.router.backbone!r}.", UserWarning, stacklevel=2)
            high = HighLevelRouter.from_pool(space, self.cfg.router)
        target = self.pool.config.lora
        sites = {m.name: self.pool.backend(m.name).lora_sites(target)
                 for m in self.pool.config.models if m.open_weights}
        return HierarchicalRouter.build(high, sites, target, self.cfg.low_level_config, seed=self.cfg.seed)

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        self.router.train_mode(True)
        groups = [{"params": self.router.parameters("backbone"), "lr": cfg.lr_backbone,
                   "weight_decay": cfg.weight_decay_backbone, "name": "backbone"},
                  {"params": self.router.parameters("heads"), "lr": cfg.lr_heads,
                   "weight_decay": cfg.weight_decay_heads, "name": "heads"}]
        self.optimizer = torch.optim.AdamW(groups)
        self.total_steps = cfg.epochs * math.ceil(len(self.data.train) / cfg.batch_size)
        end, total = cfg.lr_end_factor, max(1, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda k: 1.0 - (1.0 - end) * min(1.0, k / total))

    # ------------------------------------------------------------------ one step
    def batch_of(self, step: int) -> list:
        """The training problems of update ``step`` (each epoch a seeded permutation)."""
        bs, n = self.cfg.batch_size, len(self.data.train)
        per_epoch = math.ceil(n / bs)
        epoch, k = divmod(step, per_epoch)
        order = list(range(n))
        random.Random(_seed(self.cfg.seed, "epoch", epoch)).shuffle(order)
        return [self.data.train[i] for i in order[k * bs:(k + 1) * bs]]

    def step(self, step: int) -> StepRecord:
        """Roll out, score, update once (see the module docstring)."""
        t = {"start": time.perf_counter()}
        cfg = self.cfg
        problems = self.batch_of(step)
        rollout = self._rollout(problems, step)
        t["episodes"] = time.perf_counter()
        rewards, groups = rollout["rewards"], rollout["groups"]
        base = baselines(rewards, groups, cfg.baseline,
                         self.state["reward_sum"] / self.state["reward_n"] if self.state["reward_n"] else None)
        weights = advantages(rewards, base, cfg.max_advantage)
        leaves, token_lp, counts = self._token_logprobs(rollout, weights)
        t["rescoring"] = time.perf_counter()
        loss = self._backward(weights, token_lp, counts, leaves, rollout)
        t["backward"] = time.perf_counter()
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        t["optimizer"] = time.perf_counter()
        self.state["reward_sum"] += sum(rewards)
        self.state["reward_n"] += len(rewards)
        return self._record(step, rollout, float(loss), lrs, t)

    def _rollout(self, problems: list, step: int) -> dict[str, Any]:
        """Route, generate adapters, run every episode in lockstep with sampled decoding (no gradients yet)."""
        from haps.routing.prompt import build_routing_prompt
        from haps.workflows import EpisodeJob, Sampling, run_episodes

        cfg, router = self.cfg, self.router
        G = cfg.group_size
        prompts = [build_routing_prompt(self.workflow, self.pool.config, p) for p in problems for _ in range(G)]
        gen = torch.Generator().manual_seed(_seed(cfg.seed, "route", step))
        given = self._given_assignments(len(prompts), gen)
        decision = "given" if given is not None else ("sample" if cfg.route == "sample" else "argmax")
        with torch.no_grad():  # the graph is rebuilt prompt chunk by prompt chunk in `_backward`
            decisions = router.decide(prompts, decision, assignments=given, adapters=cfg.low_level, generator=gen)
        jobs = [EpisodeJob(problems[i // G], router.space.to_names(d.assignment), d.adapters if cfg.low_level else None)
                for i, d in enumerate(decisions)]
        sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
        results = run_episodes(self.pool, self.workflow, jobs, sampling=sampling, record_logprobs=True,
                               seed=_seed(cfg.seed, "episodes", step) % (2**31), progress=False)
        keep = [i for i, r in enumerate(results) if not getattr(r, "failed", False)]
        return {"decisions": [decisions[i] for i in keep], "results": [results[i] for i in keep],
                "prompts": [prompts[i] for i in keep],
                "groups": [i // G for i in keep], "failed": len(results) - len(keep),
                "rewards": [self.cfg.reward.compute(results[i].score, results[i].cost, self.normalizer) for i in keep],
                "trains_route": cfg.routing_term and cfg.high_level == "router"}

    def _given_assignments(self, n: int, gen: torch.Generator):
        cfg, space = self.cfg, self.router.space
        if cfg.high_level == "router":
            return None
        if cfg.high_level == "fixed":
            return [space.from_key(cfg.fixed_assignment)] * n
        return [space.at(int(i)) for i in torch.randint(0, space.size, (n,), generator=gen)]

    def _token_logprobs(self, rollout: dict[str, Any], weights: Sequence[float]):
        """Summed token log-probs per episode (E,), detached, plus leaf copies of the adapters holding the gradient
        of the token term (computed here, chunk by chunk, with ``backward``) and each episode's token count."""
        from haps.models.types import RowAdapter

        cfg = self.cfg
        E = len(rollout["results"])
        leaves: dict[int, tuple[RowAdapter, RowAdapter]] = {}  # id(original) -> (original, leaf copy)
        rows: dict[str, list[tuple[int, Any, RowAdapter]]] = {}  # model -> (episode, turn, leaf adapter)
        counts = [0] * E
        sums_recorded = [0.0] * E
        for e, (res, dec) in enumerate(zip(rollout["results"], rollout["decisions"], strict=True)):
            for turn in res.turns:
                if not turn.token_ids or not turn.prompt_ids or not self.pool.spec(turn.model).open_weights:
                    continue  # closed models: no token term
                a = dec.adapters.get(turn.role) if cfg.low_level else None
                if a is not None and id(a) not in leaves:
                    leaves[id(a)] = (a, RowAdapter(A=[x.detach().requires_grad_() for x in a.A],
                                                   B=[x.detach().requires_grad_() for x in a.B]))
                counts[e] += len(turn.token_ids)
                if a is None:  # nothing to differentiate: the log-probs recorded while sampling
                    sums_recorded[e] += sum(turn.logprobs)
                    continue
                rows.setdefault(turn.model, []).append((e, turn, leaves[id(a)][1]))
        tw = token_weights(weights, counts, cfg.token_norm)
        sums = torch.tensor(sums_recorded)
        target = self.pool.config.lora
        for model, items in rows.items():
            backend = self.pool.backend(model)
            items.sort(key=lambda it: len(it[1].prompt_ids) + len(it[1].token_ids))  # little padding per chunk
            for s in range(0, len(items), cfg.score_batch):
                chunk = items[s:s + cfg.score_batch]
                layers = {t.states_layer for _, t, _ in chunk}
                kept = len(layers) == 1 and None not in layers  # every row kept its states: the adapted layers only
                with torch.enable_grad():
                    lp = backend.score([t.prompt_ids for _, t, _ in chunk], [t.token_ids for _, t, _ in chunk],
                                       [a for _, _, a in chunk], target, temperature=cfg.temperature, top_p=cfg.top_p,
                                       states=[t.states for _, t, _ in chunk] if kept else None,
                                       states_layer=layers.pop() if kept else None)
                    (-(torch.tensor([tw[e] for e, _, _ in chunk]) * lp).sum() / E).backward()
                for (e, _, _), v in zip(chunk, lp.detach(), strict=True):
                    sums[e] += v
        return [(k, leaf) for k, (_, leaf) in leaves.items()], sums, counts

    def _backward(self, weights, token_lp, counts, leaves, rollout) -> torch.Tensor:
        """Gradients of the loss into the router: the routing term, plus the adapters' gradients that scoring left
        in their leaf copies, through the router graph rebuilt for `route_batch` prompts at a time (the same
        decisions: routing is deterministic given the prompt and z), each chunk's graph freed after its backward.
        Returns the loss value (for the log)."""
        cfg = self.cfg
        decs, prompts = rollout["decisions"], rollout["prompts"]
        trains_route = rollout["trains_route"]
        route_lp = torch.stack([d.log_prob for d in decs]).detach() if trains_route else None
        loss = policy_loss(weights, route_lp, token_lp, counts, routing_term=trains_route, token_norm=cfg.token_norm)
        leaf_of = dict(leaves)  # id(no-grad adapter) -> its leaf copy (holding the token term's gradient)
        E = len(decs)
        for s in range(0, E, cfg.route_batch):
            chunk = range(s, min(E, s + cfg.route_batch))
            with torch.enable_grad():
                again = self.router.decide([prompts[i] for i in chunk], "given",
                                           assignments=[decs[i].assignment for i in chunk], adapters=cfg.low_level)
                tensors, grads = [], []
                if trains_route:
                    w = torch.tensor([weights[i] for i in chunk], dtype=again[0].log_prob.dtype)
                    tensors.append(-(w * torch.stack([d.log_prob for d in again])).sum() / E)
                    grads.append(torch.ones(()))
                seen: set[int] = set()
                for i, d in zip(chunk, again, strict=True):
                    for role, a in d.adapters.items():
                        orig = decs[i].adapters.get(role)
                        leaf = None if orig is None else leaf_of.get(id(orig))
                        if a is None or leaf is None or id(a) in seen:
                            continue
                        seen.add(id(a))
                        for x, y in zip(a.A + a.B, leaf.A + leaf.B, strict=True):
                            if y.grad is not None and x.requires_grad:
                                tensors.append(x)
                                grads.append(y.grad)
                if tensors:
                    torch.autograd.backward(tensors, grads)
        return loss

    def _record(self, step: int, rollout, loss: float, lrs: list[float], t: dict[str, float]) -> StepRecord:
        rewards, res, decs = rollout["rewards"], rollout["results"], rollout["decisions"]
        keys = [self.router.space.key(d.assignment) for d in decs]
        norms: dict[str, list[float]] = {}
        for d in decs:
            for role, n in d.norms.items():
                if n is not None:
                    norms.setdefault(self.router.space.models[d.assignment[self.router.space.roles.index(role)]],
                                     []).append(n)
        n = max(len(rewards), 1)
        mean = sum(rewards) / n
        stamps = list(t.items())
        return StepRecord(
            step=step, epoch=step // max(1, math.ceil(len(self.data.train) / self.cfg.batch_size)), reward_mean=mean,
            reward_std=(sum((r - mean) ** 2 for r in rewards) / n) ** 0.5, score_mean=sum(r.score for r in res) / n,
            loss=loss, log_p_mean=float(sum(float(d.log_prob.detach()) for d in decs) / n),
            assignments={k: keys.count(k) for k in sorted(set(keys))},
            adapter_norms={m: sum(v) / len(v) for m, v in norms.items()},
            tokens=sum(r.tokens_out for r in res), failed=rollout["failed"], lr_backbone=lrs[0], lr_heads=lrs[1],
            seconds={b[0]: b[1] - a[1] for a, b in zip(stamps, stamps[1:], strict=False)})

    # ------------------------------------------------------------------ validation / test
    @torch.no_grad()
    def evaluate(self, problems: list, log_path: Path | None = None) -> tuple[dict[str, Any], list]:
        """Greedy episodes with argmax z (and the adapters): mean reward, score, cost, failures."""
        from haps.routing.prompt import build_routing_prompt
        from haps.workflows import EpisodeJob, run_episodes

        if not problems:
            return {"problems": 0}, []
        router, cfg = self.router, self.cfg
        router.train_mode(False)
        try:
            prompts = [build_routing_prompt(self.workflow, self.pool.config, p) for p in problems]
            gen = torch.Generator().manual_seed(_seed(cfg.seed, "eval"))
            given = self._given_assignments(len(prompts), gen)
            decs = router.decide(prompts, "given" if given is not None else "argmax", assignments=given,
                                 adapters=cfg.low_level)
            jobs = [EpisodeJob(p, router.space.to_names(d.assignment), d.adapters if cfg.low_level else None)
                    for p, d in zip(problems, decs, strict=True)]
            results = run_episodes(self.pool, self.workflow, jobs, sampling={"max_new_tokens": cfg.max_new_tokens},
                                   log_path=log_path, progress=False)
        finally:
            router.train_mode(True)
        ok = [r for r in results if not getattr(r, "failed", False)]
        n = max(len(ok), 1)
        rewards = [cfg.reward.compute(r.score, r.cost, self.normalizer) for r in ok]
        keys = [router.space.key(d.assignment) for d in decs]
        return {"problems": len(problems), "failed": len(results) - len(ok), "reward": sum(rewards) / n,
                "score": sum(r.score for r in ok) / n, "cost": sum(r.cost for r in ok) / n,
                "selection": {k: keys.count(k) / len(keys) for k in sorted(set(keys))}}, results

    # ------------------------------------------------------------------ state
    def _state_dir(self, step: int) -> Path:
        return self.out / STATE / f"step-{step:06d}"

    def save_state(self) -> None:
        """Router + optimiser + scheduler + trainer state for resuming at ``state['step']``."""
        from safetensors.torch import save_file

        from haps.files import atomic_dir
        from haps.routing.checkpoints import save_hierarchical

        step = self.state["step"]
        final = self._state_dir(step)
        with atomic_dir(final) as tmp:
            save_hierarchical(self.router, tmp / "router")
            opt = self.optimizer.state_dict()
            tensors = {f"{pid}/{k}": v.contiguous() for pid, st in opt["state"].items() for k, v in st.items()}
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "trainer.json").write_text(json.dumps({
                "state": self.state, "param_groups": opt["param_groups"],
                "scheduler": self.scheduler.state_dict()}, indent=2) + "\n")
        write_json_atomic(self.out / STATE / "latest.json", {"step": step, "dir": final.name})
        for old in (self.out / STATE).glob("step-*"):
            if old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)

    def _latest(self) -> Path | None:
        latest = self.out / STATE / "latest.json"
        return self.out / STATE / json.loads(latest.read_text())["dir"] if latest.exists() else None

    def _resume_router(self):
        """The router of the last saved state (None when there is none)."""
        from haps.routing.checkpoints import load_hierarchical

        d = self._latest()
        return None if d is None else load_hierarchical(d / "router", self.pool.config, self.workflow.name)

    def _resume_optimizer(self) -> None:
        """Optimiser, scheduler and trainer state of the last saved state (the per-step log is cut to match)."""
        from safetensors.torch import load_file

        d = self._latest()
        info = json.loads((d / "trainer.json").read_text())
        tensors = load_file(str(d / "optimizer.safetensors"))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            pid, k = key.split("/", 1)
            state.setdefault(int(pid), {})[k] = v
        self.optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
        self.scheduler.load_state_dict(info["scheduler"])
        self.state = info["state"]
        _truncate_log(self.out / "log.jsonl", self.state["step"])

    # ------------------------------------------------------------------ the run
    def train(self, max_steps: int | None = None) -> dict[str, Any]:
        """Steps until the epochs are done, ``max_steps`` updates exist, or patience runs out; then the test."""
        from haps.progress import progress_bar

        cfg = self.cfg
        end = self.total_steps if max_steps is None else min(self.total_steps, max_steps)
        with progress_bar(self.progress) as bar, JsonlAppender(self.out / "log.jsonl") as log:
            task = bar.add_task("rl", total=end, completed=self.state["step"])
            while self.state["step"] < end and not self.state["done"]:
                step = self.state["step"]
                rec = self.step(step)
                log.write(rec.__dict__)
                self.state["step"] = step + 1
                if self.state["step"] % cfg.validate_every == 0 or self.state["step"] == self.total_steps:
                    self._validate()
                if self.state["step"] % cfg.save_every == 0 or self.state["step"] == end or self.state["done"]:
                    self.save_state()
                bar.update(task, completed=self.state["step"],
                           info=f"reward {rec.reward_mean:+.3f}  score {rec.score_mean:.3f}")
        return self.finish()

    def _validate(self) -> None:
        from haps.routing.checkpoints import save_hierarchical

        v, _ = self.evaluate(self.data.valid)
        v["step"] = self.state["step"]
        with JsonlAppender(self.out / "valid.jsonl") as f:
            f.write(v)
        best = self.state["best"]
        if best is None or v["reward"] > best:
            self.state.update(best=v["reward"], best_step=v["step"], bad_validations=0)
            save_hierarchical(self.router, self.out / "best", meta={"valid": v})
        else:
            self.state["bad_validations"] += 1
            if self.state["bad_validations"] >= self.cfg.patience:
                self.state["done"] = True

    def finish(self) -> dict[str, Any]:
        """Test evaluation at the best checkpoint (the last one if no validation ran); the run's summary."""
        from haps.routing.checkpoints import load_hierarchical, save_hierarchical

        best = self.out / "best"
        if not best.exists():
            save_hierarchical(self.router, best, meta={"valid": None})
        summary = {"steps": self.state["step"], "best_step": self.state["best_step"], "best_valid": self.state["best"]}
        if self.data.test:
            current = self.router
            self.router = load_hierarchical(best, self.pool.config)
            try:
                test, _ = self.evaluate(self.data.test, log_path=self.out / "test" / "episodes.jsonl.tmp")
            finally:
                self.router = current
            tmp = self.out / "test" / "episodes.jsonl.tmp"
            if tmp.exists():
                tmp.replace(self.out / "test" / "episodes.jsonl")
            summary["test"] = test
        write_json_atomic(self.out / "summary.json", summary)
        return summary


def _truncate_log(path: Path, step: int) -> None:
    """Keep the per-step log lines of steps < ``step`` (a resumed run redoes the later ones)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a torn last line
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    tmp.replace(path)


def run_rl(cfg: RLConfig, out: str | Path, *, router: str | Path | None = None, steps: int | None = None,
           progress: bool = True) -> dict[str, Any]:
    """The `haps rl` command: setup (or resume) -> train -> test at the best checkpoint."""
    recipe = RLRecipe(cfg, out, progress)
    recipe.setup(router)
    return recipe.train(steps)
