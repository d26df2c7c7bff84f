"""The Python API: load a hierarchical router, route a problem or a text, run an episode.

    import haps
    router = haps.load_router("runs/haps-mmlu", pool="tiny")  # None: untrained backbone + fresh heads (warns)
    d = router.route("Which gas do plants absorb?\\nA. Oxygen\\nB. CO2\\nC. Helium\\nD. Neon", workflow="mmlu")
    d.assignment, d.probs[d.key], d.norms        # model per role, P(z|p) of the choice, ||alpha A B||_F per role
    result = haps.run(problem, router=router)    # an EpisodeResult (haps.workflows.base)

`HapsRouter` is a thin facade over `haps.routing.low_level.HierarchicalRouter` and its pool: it builds
the routing prompt of the workflow (`haps.routing.prompt`), turns text into a problem
(`haps.workflows.from_text`), decides greedily (argmax P(z | p)) and generates the adapters of the chosen
models, optionally under a cost budget (`max_cost`, the expected cost below). `haps serve` routes through it.

Expected cost (USD) of an assignment z, from the pool's prices (per 1M tokens)::

    cost(z) = sum over roles r of  n_r * (T_in * price_in[z_r] + T_out * price_out[z_r]) / 1e6

- one call answered by one role (``answer_role``; `haps serve`'s ``model: "haps"``): n = 1 for that role,
  0 for the others; T_in = the request's prompt tokens, T_out = its ``max_tokens``;
- a whole workflow: n_r = the calls role r makes in a full-length episode (`max_calls`: MMLU ``rounds``
  per role; HotpotQA Student 2B + 2 and Teacher 2B with summaries, B + 2 and B without, for budget B;
  a workflow may define ``max_calls() -> {role: n}``, else 1 per role); T_in = the problem's tokens plus
  the call overhead (`call_overhead`: the instructions, worked example and what earlier rounds add, measured
  on the built-in prompts and rounded up: MMLU 500, HotpotQA 1200 (retrieved passages included), others 500
  or their ``call_overhead_tokens`` attribute), T_out = the per-call token cap. Token counts come from the
  router backbone's tokenizer.

It is an upper bound on what a greedy episode spends (episodes often stop early). ``max_cost`` picks the most
probable assignment whose expected cost is at most ``max_cost``; when even the cheapest one costs more,
`BudgetError` names that cheapest cost.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from haps.dtypes import DtypeName, resolve_dtype
from haps.errors import ConfigError, HapsError

#: what the untrained router warns (at load, in `haps serve`'s log and /health)
UNTRAINED = ("no router checkpoint given: routing uses the untrained backbone and fresh adapter heads (random "
             "choices, zero adapters); train one with `haps sft` / `haps rl` and pass its folder")
DEFAULT_WORKFLOW = "mmlu"
#: prompt tokens a call of a workflow adds to its problem's (the module docstring; measured, rounded up)
CALL_OVERHEAD_TOKENS = {"mmlu": 500, "hotpotqa": 1200}
DEFAULT_CALL_OVERHEAD = 500
DEFAULT_MAX_NEW_TOKENS = 256


class UntrainedRouterWarning(UserWarning):
    """The router has no trained checkpoint (its choices are not learned)."""


class BudgetError(HapsError):
    """``max_cost`` is below the cheapest expected cost of the request."""

    def __init__(self, max_cost: float, cheapest: float, assignment: str) -> None:
        self.max_cost, self.cheapest, self.assignment = max_cost, cheapest, assignment
        super().__init__(f"max_cost={max_cost:g} USD is below the cheapest expected cost of this request, "
                         f"{cheapest:.6g} USD ({assignment}); raise max_cost to at least {cheapest:.6g} or ask for "
                         "fewer tokens (max_tokens).")


# ---------------------------------------------------------------------- the cost model
def max_calls(workflow) -> dict[str, int]:
    """Calls per role of one full-length episode of ``workflow`` (see the module docstring)."""
    own = getattr(workflow, "max_calls", None)
    if callable(own):
        return {r: int(n) for r, n in own().items()}
    opts = getattr(workflow, "options", None)
    roles = tuple(workflow.roles)
    if workflow.name == "mmlu" and opts is not None:
        return {r: int(opts.rounds) for r in roles}
    if workflow.name == "hotpotqa" and opts is not None:
        b, s = int(opts.budget), bool(opts.summaries)
        student = (b + 1) + (b if s else 0) + (1 if opts.forced_answer == "ask" else 0)
        return {"student": student, "teacher": b * (2 if s else 1)}
    return {r: 1 for r in roles}


def call_overhead(workflow) -> int:
    """Prompt tokens one call of ``workflow`` adds to the problem's (its ``call_overhead_tokens`` attribute, the
    built-in table, else `DEFAULT_CALL_OVERHEAD`)."""
    own = getattr(workflow, "call_overhead_tokens", None)
    if isinstance(own, int):
        return own
    return CALL_OVERHEAD_TOKENS.get(workflow.name, DEFAULT_CALL_OVERHEAD)


@dataclass(frozen=True)
class CostEstimate:
    """How many calls each role makes and the tokens of each call (the module docstring's formula)."""

    calls: Mapping[str, int]
    tokens_in: int
    tokens_out: int

    def cost(self, pool_config, names: Mapping[str, str]) -> float:
        total = 0.0
        for role, n in self.calls.items():
            spec = pool_config.get(names[role])
            total += n * spec.cost(self.tokens_in, self.tokens_out)
        return total

    def costs(self, space, pool_config) -> list[float]:
        """Expected cost of every assignment of ``space``, in its product order."""
        return [self.cost(pool_config, space.to_names(z)) for z in space.assignments()]


# ---------------------------------------------------------------------- decisions
@dataclass
class RouteQuery:
    """One routing request: the prompt, the expected cost of every assignment, and the budget."""

    prompt: Any  # haps.routing.prompt.RoutingPrompt
    workflow: str
    costs: list[float] | None = None
    max_cost: float | None = None
    problem: Any = None  # haps.data.Problem

    def allowed(self) -> list[bool] | None:
        if self.max_cost is None or self.costs is None:
            return None
        return [c <= self.max_cost for c in self.costs]


@dataclass
class RouteDecision:
    """The router's decision for one problem: models per role, P(z|p), the adapters of the chosen models."""

    workflow: str
    assignment: dict[str, str]  # role -> model name
    ids: tuple[int, ...]  # model ids (pool positions) in role order
    key: str  # "teacher=...,student=..."
    probs: dict[str, float]  # assignment key -> P(z | p), every assignment
    adapters: dict[str, Any]  # role -> RowAdapter | None (closed models, adapters off, high-level-only routers)
    norms: dict[str, float | None]  # role -> ||alpha A B||_F of its adapter
    expected_cost: float | None = None  # of the chosen assignment (USD)
    cheapest_cost: float | None = None
    max_cost: float | None = None
    trained: bool = True
    problem: Any = None

    @property
    def prob(self) -> float:
        return self.probs[self.key]

    def summary(self) -> dict[str, Any]:
        """JSON-ready view (what `haps serve` reports)."""
        return {"workflow": self.workflow, "assignment": dict(self.assignment), "probs": dict(self.probs),
                "adapter_norms": dict(self.norms), "expected_cost": self.expected_cost,
                "cheapest_cost": self.cheapest_cost, "max_cost": self.max_cost, "trained": self.trained}


class HapsRouter:
    """A hierarchical router with the pool it routes to (see the module docstring)."""

    def __init__(self, router, pool, *, workflow: str | None = None, trained: bool = True,
                 source: str | None = None, workflow_options: Mapping[str, Mapping[str, Any]] | None = None,
                 call_overhead_tokens: int | None = None, dtype: DtypeName = "float32") -> None:
        if list(router.space.models) != list(pool.names):
            raise ConfigError(f"the router assigns the models {list(router.space.models)}, but the pool has "
                              f"{list(pool.names)}; use the pool it was trained for.")
        self.hier = router
        self.pool = pool
        self.trained = trained
        self.source = source
        self.task = router.meta.get("task")
        self.default_workflow = workflow or self.task or DEFAULT_WORKFLOW
        self.workflow_options = {k: dict(v) for k, v in (workflow_options or {}).items()}
        self.call_overhead_tokens = call_overhead_tokens  # None: per workflow (`call_overhead`)
        self.warnings: list[str] = [] if trained else [UNTRAINED]
        self._workflows: dict[str, Any] = {}
        router.train_mode(False)
        import torch

        self.dtype = resolve_dtype(dtype, next(router.high.model.parameters()).device)
        if self.dtype != torch.float32:
            router.backbone_to(self.dtype)

    @property
    def space(self):
        return self.hier.space

    @property
    def tokenizer(self):
        return self.hier.high.tokenizer

    @property
    def context_window(self) -> int | None:
        n = getattr(self.hier.high.model.config, "max_position_embeddings", None)
        return int(n) if n else None

    def workflow(self, spec: str | None = None):
        """The workflow ``spec`` (default: the router's), built once with its options; its roles must be the
        router's."""
        from haps.workflows import get_workflow

        spec = spec or self.default_workflow
        if spec not in self._workflows:
            wf = get_workflow(spec, **self.workflow_options.get(spec, {}))
            if tuple(wf.roles) != tuple(self.space.roles):
                raise ConfigError(f"workflow {spec!r} has the roles {list(wf.roles)}, but this router assigns models "
                                  f"to {list(self.space.roles)}; use a router trained for {spec!r}.")
            self._workflows[spec] = wf
        return self._workflows[spec]

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` under the router backbone's tokenizer (the cost model's unit)."""
        return len(self.tokenizer(str(text), add_special_tokens=False)["input_ids"])

    def problem(self, x, workflow=None):
        """A `Problem` as it is, or text parsed in the workflow's format (`haps.workflows.from_text`)."""
        from haps.problem import Problem
        from haps.workflows.from_text import problem_from_text

        wf = workflow if hasattr(workflow, "roles") else self.workflow(workflow)
        if isinstance(x, Problem):
            return x
        if isinstance(x, str):
            return problem_from_text(wf, x)
        raise ConfigError(f"route/run take a haps.data.Problem or a str, got {type(x).__name__}.")

    # ------------------------------------------------------------------ planning and deciding
    def estimate(self, workflow, problem_tokens: int, max_new_tokens: int, answer_role: str | None = None,
                 ) -> CostEstimate:
        """The cost model's inputs for one request (module docstring)."""
        if answer_role is not None:
            if answer_role not in self.space.roles:
                raise ConfigError(f"answer_role {answer_role!r} is not a role of {list(self.space.roles)}.")
            return CostEstimate({answer_role: 1}, problem_tokens, max_new_tokens)
        overhead = self.call_overhead_tokens if self.call_overhead_tokens is not None else call_overhead(workflow)
        return CostEstimate(max_calls(workflow), problem_tokens + overhead, max_new_tokens)

    def plan(self, x, workflow: str | None = None, *, max_cost: float | None = None,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, answer_role: str | None = None,
             tokens_in: int | None = None) -> RouteQuery:
        """The routing query of one problem or text (prompt and expected costs); raises `BudgetError` when
        ``max_cost`` is below the cheapest assignment. ``tokens_in``: the prompt tokens when already counted
        (default: the problem text's)."""
        from haps.routing.prompt import build_routing_prompt

        wf = self.workflow(workflow)
        problem = self.problem(x, wf)
        prompt = build_routing_prompt(wf, self.pool.config, problem)
        n_in = tokens_in if tokens_in is not None else self.count_tokens(prompt.meta.get("problem", ""))
        costs = self.estimate(wf, n_in, max_new_tokens, answer_role).costs(self.space, self.pool.config)
        if max_cost is not None:
            if not math.isfinite(max_cost) or max_cost < 0:
                raise ConfigError(f"max_cost must be a finite number >= 0, got {max_cost!r}.")
            i = min(range(len(costs)), key=costs.__getitem__)
            if costs[i] > max_cost:
                raise BudgetError(max_cost, costs[i], self.space.key(self.space.at(i)))
        return RouteQuery(prompt=prompt, workflow=wf.name, costs=costs, max_cost=max_cost, problem=problem)

    def decide(self, queries: Sequence[RouteQuery], adapters: bool = True) -> list[RouteDecision]:
        """One router batch: argmax P(z | p) per query (within its budget) and the chosen models' adapters.

        A query with a budget is decided among the assignments it can afford, in the same router pass."""
        import torch

        if not queries:
            return []
        space = self.space
        prompts = [q.prompt for q in queries]
        allowed = torch.tensor([q.allowed() or [True] * space.size for q in queries], dtype=torch.bool)
        with torch.no_grad():
            decs = self.hier.decide(prompts, "argmax", adapters=adapters, allowed=allowed)
        keys = [space.key(z) for z in space.assignments()]
        out = []
        for q, d in zip(queries, decs, strict=True):
            probs = d.probs.tolist()
            idx = space.index(d.assignment)
            out.append(RouteDecision(
                workflow=q.workflow, assignment=space.to_names(d.assignment), ids=tuple(d.assignment), key=keys[idx],
                probs=dict(zip(keys, (float(p) for p in probs), strict=True)), adapters=dict(d.adapters),
                norms=dict(d.norms), expected_cost=None if q.costs is None else q.costs[idx],
                cheapest_cost=None if q.costs is None else min(q.costs), max_cost=q.max_cost, trained=self.trained,
                problem=q.problem))
        return out

    def route(self, x, workflow: str | None = None, *, max_cost: float | None = None,
              max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, answer_role: str | None = None,
              adapters: bool = True) -> RouteDecision:
        """Route one problem (a `Problem`, or text in the workflow's format) greedily."""
        q = self.plan(x, workflow, max_cost=max_cost, max_new_tokens=max_new_tokens, answer_role=answer_role)
        return self.decide([q], adapters=adapters)[0]

    def run(self, x, workflow: str | None = None, *, max_new_tokens: int | None = None,
            max_cost: float | None = None, adapters: bool = True, log_path: str | Path | None = None):
        """Route ``x`` and run its episode greedily with the generated adapters; an `EpisodeResult`."""
        from haps.workflows import EpisodeJob, run_episodes

        wf = self.workflow(workflow)
        d = self.route(x, wf.name, max_cost=max_cost, max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                       adapters=adapters)
        job = EpisodeJob(d.problem, d.assignment, d.adapters if adapters else None)
        sampling = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
        return run_episodes(self.pool, wf, [job], sampling=sampling, log_path=log_path, progress=False)[0]


# ---------------------------------------------------------------------- loading
def as_pool(pool, default: str = "tiny"):
    """A `ModelPool` from a pool, a `PoolConfig`, a built-in name or a YAML path (None: ``default``)."""
    from haps.config import PoolConfig, load_pool
    from haps.models.pool import ModelPool

    if isinstance(pool, ModelPool):
        return pool
    if isinstance(pool, PoolConfig):
        return ModelPool(pool)
    return ModelPool(load_pool(str(pool) if pool is not None else default))


def checkpoint_pool(path: str | Path | None) -> str | None:
    """The pool a router checkpoint names in its manifest (None when it names none)."""
    if path is None:
        return None
    from haps.routing.checkpoints import read_manifest

    info = read_manifest(path)
    meta = info.get("meta") or {}
    return meta.get("pool") or (meta.get("sft") or {}).get("pool")


def checkpoint_task(path: str | Path) -> str | None:
    from haps.routing.checkpoints import read_manifest

    info = read_manifest(path)
    meta = info.get("meta") or {}
    return info.get("task") or meta.get("task") or (meta.get("sft") or {}).get("task")


def fresh_router(pool, workflow: str = DEFAULT_WORKFLOW, backbone=None, seed: int = 0):
    """An untrained `HierarchicalRouter` for ``workflow`` over ``pool``: the backbone of ``backbone`` (a
    `HighLevelRouterConfig`; default SmolLM2 of the tiny pool) and fresh generator heads (zero first update)."""
    from haps.routing.high_level import HighLevelRouter, HighLevelRouterConfig
    from haps.routing.prompt import space_for
    from haps.workflows import get_workflow

    wf = get_workflow(workflow)
    high = HighLevelRouter.from_pool(space_for(wf, pool.config), backbone or HighLevelRouterConfig())
    return with_fresh_heads(high, pool, seed=seed)


def with_fresh_heads(high, pool, seed: int = 0):
    """A `HierarchicalRouter` over ``high`` with fresh generators for the pool's open models (loads them)."""
    from haps.routing.low_level import HierarchicalRouter, LowLevelConfig

    target = pool.config.lora
    sites = {m.name: pool.backend(m.name).lora_sites(target) for m in pool.config.models if m.open_weights}
    return HierarchicalRouter.build(high, sites, target, LowLevelConfig(), seed=seed)


def load_router(path: str | Path | None = None, pool=None, *, workflow: str | None = None, task: str | None = None,
                backbone=None, seed: int = 0,
                workflow_options: Mapping[str, Mapping[str, Any]] | None = None,
                dtype: DtypeName = "float32") -> HapsRouter:
    """The router saved at ``path`` (``haps rl``: hierarchical; ``haps sft``: high-level only, no adapters) over
    ``pool`` (default: the pool its manifest names, else ``tiny``), checked against the pool it was trained
    for. ``path=None``: an untrained router (backbone ``backbone``, fresh heads) for ``workflow``; it warns
    (`UntrainedRouterWarning`). ``dtype``: the backbone's dtype for routing (``auto``: bf16 where bf16 matmuls
    are native, `haps.dtypes`; routes may then differ from fp32's on near ties)."""
    from haps.routing.high_level import HighLevelRouter

    mp = as_pool(pool, checkpoint_pool(path) or "tiny")
    if path is None:
        wf = workflow or DEFAULT_WORKFLOW
        warnings.warn(UNTRAINED, UntrainedRouterWarning, stacklevel=2)
        return HapsRouter(fresh_router(mp, wf, backbone, seed), mp, workflow=wf, trained=False,
                          workflow_options=workflow_options, dtype=dtype)
    from haps.routing.checkpoints import load_router as load_checkpoint
    from haps.routing.low_level import HierarchicalRouter, LowLevelConfig

    loaded = load_checkpoint(path, pool=mp, task=task)
    if isinstance(loaded, HighLevelRouter):  # no adapter heads: routes models only
        loaded = HierarchicalRouter(loaded, {}, mp.config.lora, {}, LowLevelConfig(), meta={"task": checkpoint_task(path)})
    return HapsRouter(loaded, mp, workflow=workflow, source=str(path), workflow_options=workflow_options,
                      dtype=dtype)


def run(problem, router=None, workflow: str | None = None, *, pool=None, max_new_tokens: int | None = None,
        max_cost: float | None = None, adapters: bool = True, log_path: str | Path | None = None):
    """Route ``problem`` (a `Problem` or text) with ``router`` (a `HapsRouter` or a checkpoint folder) and run
    its episode; returns the `EpisodeResult`."""
    if router is None:
        raise ConfigError("haps.run needs router=: a HapsRouter (haps.load_router(...)) or a checkpoint folder.")
    if not isinstance(router, HapsRouter):
        router = load_router(router, pool, workflow=workflow)
    return router.run(problem, workflow, max_new_tokens=max_new_tokens, max_cost=max_cost, adapters=adapters,
                      log_path=log_path)
