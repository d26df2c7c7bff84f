"""The methods of `haps eval` (``--methods``): how each one chooses assignments for the test problems.

| spec | name in the results | what it is |
| --- | --- | --- |
| ``oracle`` | ``oracle`` | the best scored assignment of each problem by reward (upper bound) |
| ``random`` | ``random`` | uniform over the scored assignments of each problem (its expected value) |
| ``static:<role>=<model>,...`` (or ``static:<id>,<id>``) | ``static:<key>`` | one assignment for every problem |
| ``all-static`` | ``static:<key>`` each | every assignment of the space |
| ``best_static``, ``knn``, ``routellm_mf``, ``routellm_clf``, ``graphrouter``, ``irt`` | the name | a baseline fitted on the train split (``best_static``: chosen on the valid split); ``<name>:<CKPT>`` loads a saved one instead |
| ``sft:<CKPT>`` | ``sft`` | the high-level router alone (``haps sft``), no adapters |
| ``haps[:<DIR>]`` | ``haps`` | the hierarchical router with its generated adapters, real episodes (``haps.infer.run_infer``) |
| ``haps-no-lora[:<DIR>]`` | ``haps-no-lora`` | the same routing, adapters off (Table 3: w/o low-level router) |

``--methods`` takes a comma-separated list (repeatable); ``role=model`` pairs after ``static:`` stay with it
(``static:teacher=a,student=b,knn`` is two methods). All but the HAPS methods are policies over the
action table (`Outcomes.evaluate`); ``oracle`` and ``random`` are read off it after the picks of every
other method are known, so they see the same cells.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from haps.errors import ConfigError, DataError
from haps.routing.space import AssignmentSpace

POLICY_KINDS = ("oracle", "random", "static")
HAPS_KINDS = ("haps", "haps-no-lora")


def baseline_names() -> tuple[str, ...]:
    from haps.baselines import BASELINES

    return BASELINES


def known_kinds() -> list[str]:
    return [*POLICY_KINDS, "all-static", *baseline_names(), "sft", *HAPS_KINDS]


@dataclass(frozen=True)
class MethodSpec:
    """One method: its result name, kind and argument (an assignment key or a checkpoint folder)."""

    name: str
    kind: str
    arg: str | None = None


def split_methods(items: Sequence[str]) -> list[str]:
    """``["oracle,static:teacher=a,student=b", "knn"]`` -> ``["oracle", "static:teacher=a,student=b", "knn"]``."""
    kinds = set(known_kinds())
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            head = part.split(":", 1)[0]
            joins = ("=" in part and head not in kinds) or part.isdigit()
            if joins and out and out[-1].startswith("static:"):
                out[-1] += "," + part  # the next role=model pair (or model id) of a static assignment
            else:
                out.append(part)
    return out


def parse_methods(items: Sequence[str], space: AssignmentSpace, router: str | None = None) -> list[MethodSpec]:
    """The methods named by ``items`` (see the module docstring); ``router`` is the HAPS checkpoint of
    ``haps`` / ``haps-no-lora`` given without one."""
    from haps.routing.base import FixedRouter

    specs: list[MethodSpec] = []
    for text in split_methods(items):
        kind, sep, arg = text.partition(":")
        arg = arg.strip() if sep else None
        if kind not in known_kinds():
            raise ConfigError(f"unknown method {text!r}; methods: {', '.join(known_kinds())} (static:<role>=<model>,..., "
                              "<baseline>:<CKPT>, sft:<CKPT>, haps:<DIR>).")
        if kind == "all-static":
            if space.size > 64:
                raise ConfigError(f"all-static: the space has {space.size} assignments; name the ones to run with "
                                  "static:<role>=<model>,...")
            specs += [MethodSpec(f"static:{space.key(z)}", "static", space.key(z)) for z in space.assignments()]
        elif kind == "static":
            if not arg:
                raise ConfigError(f"static needs an assignment, e.g. static:{space.key(space.at(0))}.")
            key = space.key(FixedRouter.from_spec(arg, space=space).assignment)
            specs.append(MethodSpec(f"static:{key}", "static", key))
        elif kind in ("oracle", "random"):
            if arg:
                raise ConfigError(f"method {kind!r} takes no argument, got {text!r}.")
            specs.append(MethodSpec(kind, kind))
        elif kind == "sft":
            if not arg:
                raise ConfigError("sft needs the high-level router's checkpoint: sft:<CKPT> (from `haps sft --out`).")
            specs.append(MethodSpec("sft", kind, arg))
        elif kind in HAPS_KINDS:
            arg = arg or router
            if not arg:
                raise ConfigError(f"method {kind!r} needs the HAPS checkpoint: pass --router DIR or {kind}:DIR.")
            specs.append(MethodSpec(kind, kind, arg))
        else:  # a baseline, fitted or loaded
            specs.append(MethodSpec(kind, kind, arg or None))
    seen: dict[str, int] = {}
    out = []
    for s in specs:  # the same method twice: keep the first; two checkpoints of one kind: name them apart
        if s.name in seen:
            if specs[seen[s.name]] == s:
                continue
            s = MethodSpec(f"{s.name}:{Path(s.arg or '').name or len(out)}", s.kind, s.arg)
        seen[s.name] = len(out)
        out.append(s)
    return out


@dataclass
class Context:
    """What every method is built from (train split, test prompts, costs)."""

    space: AssignmentSpace
    train: Any  # haps.evaluate.ActionTable (train split, failed records left out)
    valid: Any  # the valid split's ActionTable or None
    texts: Mapping[str, str]  # problem id -> problem text (train and valid problems)
    task_name: str
    descriptions: Mapping[str, str]
    prompts: list  # RoutingPrompt of each test problem, in Outcomes order
    train_cost: torch.Tensor  # (A,) mean train cost of each assignment
    points: int = 21
    out: Path | None = None
    save_routers: bool = True
    baseline_configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    embedder_factory: Callable[[], Any] | None = None
    _embedder: Any = None

    def embedder(self):
        if self._embedder is None:
            if self.embedder_factory is not None:
                self._embedder = self.embedder_factory()
            else:
                from haps.baselines import base

                self._embedder = base.MiniLMEmbedder()
        return self._embedder


@dataclass
class Plan:
    """A method ready to be scored: its policy (now, or ``late`` once the table is filled), its sweep
    decisions, and what to record about it."""

    spec: MethodSpec
    pi: torch.Tensor | None = None  # (P, A)
    late: Callable[[Any], torch.Tensor] | None = None  # Outcomes -> (P, A), for oracle / random
    sweep: tuple[str, list[float], torch.Tensor] | None = None  # ("threshold" | "penalty", params, (S, P))
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def is_haps(self) -> bool:
        return self.spec.kind in HAPS_KINDS


def plan_method(spec: MethodSpec, ctx: Context, outcomes) -> Plan:
    """Build ``spec``'s policy on the test prompts (fitting a baseline on the train split if needed)."""
    from haps.evaluation.curves import penalty_decisions, threshold_decisions

    space = ctx.space
    if spec.kind in HAPS_KINDS:
        return Plan(spec, info={"checkpoint": spec.arg, "adapters": spec.kind == "haps"})
    if spec.kind == "oracle":
        return Plan(spec, late=lambda o: o.oracle())
    if spec.kind == "random":
        return Plan(spec, late=lambda o: o.random())
    if spec.kind == "static":
        return Plan(spec, pi=outcomes.fixed(space.index(space.from_key(spec.arg))))
    if spec.kind == "sft":
        from haps.routers import get_router

        router = get_router(f"high_level:{spec.arg}", space=space)
        idx = _indices(router.route(ctx.prompts), space)
        with torch.no_grad():
            util = router.log_probs(ctx.prompts).double()
        lams, dec = penalty_decisions(util, ctx.train_cost, ctx.points)
        return Plan(spec, pi=outcomes.one_hot(idx), sweep=("penalty", lams, dec), info={"checkpoint": spec.arg})
    router, info = _baseline(spec, ctx)
    idx = _indices(router.route(ctx.prompts), space)
    from haps.baselines.threshold import ThresholdRouter

    if isinstance(router, ThresholdRouter):
        shares, dec = threshold_decisions(router, ctx.prompts, ctx.points)
        sweep = ("threshold", shares, dec)
        info["threshold"] = router.threshold
    else:
        lams, dec = penalty_decisions(router.utility(ctx.prompts), router.assignment_cost, ctx.points)
        sweep = ("penalty", lams, dec)
    return Plan(spec, pi=outcomes.one_hot(idx), sweep=sweep, info=info)


def _indices(assignments: Sequence[Sequence[int]], space: AssignmentSpace) -> list[int]:
    return [space.index(z) for z in assignments]


def _baseline(spec: MethodSpec, ctx: Context):
    """(router, info): the baseline loaded from ``spec.arg`` or fitted on the train split (and saved)."""
    from haps.baselines.train import baseline_class

    cls = baseline_class(spec.kind)
    embedder = ctx.embedder() if cls.needs_embeddings else None
    if spec.arg:
        from haps.routers import get_router

        return get_router(f"{spec.kind}:{spec.arg}", space=ctx.space, embedder=embedder), {"checkpoint": spec.arg,
                                                                                            "fitted": False}
    if spec.kind == "best_static" and ctx.valid is None:
        raise DataError("best_static is chosen on the valid split, and the collection has none; collect with a "
                        "valid fraction (split_fractions) or drop best_static from --methods.")
    config = cls.config_cls.model_validate(dict(ctx.baseline_configs.get(spec.kind, {})))
    router = cls(ctx.space, config, embedder=embedder)
    router.fit(ctx.train, ctx.texts, valid=ctx.valid, tasks=ctx.task_name, descriptions=ctx.descriptions)
    info: dict[str, Any] = {"fitted": True, "config": config.model_dump()}
    if ctx.save_routers and ctx.out is not None:
        info["checkpoint"] = str(router.save(ctx.out / "routers" / spec.name.replace(":", "_")))
    return router, info


def run_haps(plans: Sequence[Plan], problems: Sequence, outcomes, *, task: str, pool, rewarder, out: Path | None,
             progress: bool, workflow=None, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Real episodes of every HAPS plan through ``haps.infer.run_infer``; name -> `MethodRows`.

    ``workflow`` and ``max_new_tokens`` (the collection's, so HAPS plays the episodes the other methods
    were scored on) are passed when ``run_infer`` takes them."""
    import inspect

    from haps.evaluation.outcomes import MethodRows
    from haps.infer import run_infer

    params = inspect.signature(run_infer).parameters
    same = {k: v for k, v in (("workflow", workflow), ("max_new_tokens", max_new_tokens))
            if v is not None and k in params}
    space = outcomes.space
    rows_by_name = {}
    for plan in plans:
        log = out / "episodes" / f"{plan.spec.name}.jsonl" if out is not None else None
        if log is not None and log.exists():
            log.unlink()
        results = run_infer(Path(plan.spec.arg), task, list(problems), pool=pool, adapters=plan.info["adapters"],
                            log_path=log, progress=progress, **same)
        plan.info["passed"] = sorted(same)
        if len(results) != len(problems):
            raise DataError(f"{plan.spec.name}: run_infer returned {len(results)} results for {len(problems)} "
                            "problems.")
        rows = MethodRows.empty(plan.spec.name, outcomes.problem_ids, space.size)
        for i, res in enumerate(results):
            try:
                rows.choice[i] = space.index(space.from_names(res.assignment))
            except ConfigError as e:
                raise DataError(f"{plan.spec.name}: problem {outcomes.problem_ids[i]!r} was routed to "
                                f"{res.assignment}, outside the collection's space: {e}") from None
            rows.source[i] = "episodes"
            score, cost = getattr(res, "score", None), getattr(res, "cost", None)
            if getattr(res, "failed", False) or score is None or cost is None:
                rows.status[i] = "failed"
                continue
            rows.status[i] = "ok"
            rows.score[i], rows.cost[i] = float(score), float(cost)
            rows.reward[i], rows.cost_norm[i] = rewarder(score, cost), rewarder.cost_norm(cost)
        rows.extra.update(plan.info)
        if log is not None and log.exists():
            rows.extra["episode_log"] = str(log)
        rows_by_name[plan.spec.name] = rows
    return rows_by_name
