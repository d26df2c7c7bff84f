"""`run_eval`: every method of `haps eval` trained on the same train split and scored on the same test problems.

Steps::

    records     = the collection's actions; failed ones (failed: true, or no reward) are never used, and
                  the (problem, z) of its failures.jsonl without a record count as failed cells
    rewarder    = the evaluation's reward (default: the kind recorded); its cost normaliser is fitted on
                  the train split's costs; every reward is recomputed from score and cost with it
    train/valid = ActionTables of those splits (what every baseline is fitted on / best static is chosen on)
    test        = the collection's test split, or the problems of --data not in its train/valid split
    outcomes    = the test problems' cells looked up in the table (unless scoring = episodes)
    plans       = each method's picks on the test routing prompts (+ its sweep for the curves)
    play        = the cells some pick needs that the table lacks (scoring auto / episodes), one lockstep run
                  with the collection's workflow, pool and sampling (greedy decoding makes them exact);
                  oracle and random need every cell of a problem, and the weak, strong and best static
                  cells are always needed (the references of PGR and of the paired differences)
    haps        = the HAPS methods' real episodes through haps.infer.run_infer
    summary     = per-method metrics (`haps.evaluation.summary`)

Files in ``OUT``::

    summary.json        the run's settings and every method's metrics (format ``haps-eval/1``)
    per_problem.jsonl   one line per (method, test problem): status (ok | failed | missing), score, reward,
                        cost, cost_norm, the assignment and its label, and where it came from (lookup | episodes)
    routers/<name>/     each baseline fitted here (a checkpoint `<name>:<DIR>` reloads it)
    episodes/*.jsonl    the episode logs of the cells played and of each HAPS method

A rerun with the same ``OUT`` overwrites these files.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from haps.errors import ConfigError, DataError
from haps.evaluation.config import EvalConfig
from haps.evaluation.outcomes import EPISODES, MISSING, MethodRows, Outcomes, Rewarder, is_failed

FORMAT = "haps-eval/1"
SUMMARY = "summary.json"
PER_PROBLEM = "per_problem.jsonl"


def _check_task(cfg_task: str, col) -> str | None:
    """The workflow spec to rebuild the collection's workflow with (None: the recorded one)."""
    from haps.workflows.loader import canonical_spec, get_workflow

    given = canonical_spec(cfg_task)
    recorded = col.config.task
    if given == recorded:
        return None
    try:
        rec_name = get_workflow(recorded).name
    except Exception:  # a plugin that has moved: the given spec replaces it
        return given
    if get_workflow(given).name != rec_name:
        raise ConfigError(f"{str(col.path)!r} was collected for task {recorded!r}, not {cfg_task!r}; pass --task "
                          f"{rec_name} or the action folder of {cfg_task}.")
    return given


def _reward_config(cfg: EvalConfig, col):
    from haps.metrics import RewardConfig

    kind = cfg.reward or col.config.reward_kind
    if kind == "tradeoff":
        return RewardConfig(kind="tradeoff", alpha=cfg.alpha, beta=cfg.beta)
    return RewardConfig(kind=kind)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        out["haps"] = version("haps")
    except PackageNotFoundError:
        pass
    return out


def run_eval(cfg: EvalConfig, *, pool=None, workflow=None, embedder: Callable | None = None,
             runner: Callable | None = None, progress: bool = True, log: Callable[[str], None] | None = None
             ) -> dict[str, Any]:
    """Evaluate ``cfg.methods`` (see the module docstring); writes ``cfg.out`` and returns the summary.

    ``pool`` (a `ModelPool`), ``workflow``, ``embedder`` (texts -> (n, d), for the baselines) and ``runner``
    (``run_episodes``'s signature) default to the real ones built from the collection; tests inject
    small stand-ins. ``log`` receives one line per stage."""
    from haps.evaluation.methods import Context, parse_methods, run_haps
    from haps.evaluation.summary import static_hull
    from haps.labels import Labeler
    from haps.routing.prompt import build_routing_prompt

    say = log or (lambda _s: None)
    t0 = time.perf_counter()
    out = Path(cfg.out)
    col = _open(cfg)
    space = col.space
    labeler = Labeler(space)
    keys = [space.key(z) for z in space.assignments()]
    specs = parse_methods(cfg.methods, space, cfg.router)  # option errors before any work

    tr = _fit_train(cfg, col, space)
    workflow = workflow if workflow is not None else col.workflow()
    texts, test, test_source = _test_problems(cfg, col, workflow)
    pool_cfg = col.pool_config()
    prompts = [build_routing_prompt(workflow, pool_cfg, p) for p in test]
    outcomes = _test_outcomes(cfg, col, space, tr, test)
    say(f"{len(test)} test problems ({test_source}); train {len(tr.train.problem_ids)}, valid "
        f"{len(tr.valid.problem_ids) if tr.valid is not None else 0}; {int((outcomes.status != MISSING).sum())} "
        "test cells in the action table")

    ctx = Context(space=space, train=tr.train, valid=tr.valid, texts=texts, task_name=workflow.name,
                  descriptions={m.name: m.description for m in pool_cfg.models}, prompts=prompts,
                  train_cost=tr.train_cost, points=cfg.sweep_points, out=out, save_routers=cfg.save_routers,
                  baseline_configs=cfg.baselines, embedder_factory=(lambda: embedder) if embedder is not None else None)
    out.mkdir(parents=True, exist_ok=True)
    plans = _make_plans(specs, ctx, outcomes, say)

    todo = _cells_to_play(plans, outcomes, tr)
    played = 0
    get_pool = _lazy_pool(pool, pool_cfg)
    if todo and cfg.scoring != "lookup":
        played = _play(cfg, col, todo, test, workflow, outcomes, tr.rewarder, out, get_pool, runner, progress, say)

    haps_plans = [p for p in plans if p.is_haps]
    haps_rows = {}
    if haps_plans:
        say(f"HAPS episodes: {', '.join(p.spec.name for p in haps_plans)}")
        haps_rows = run_haps(haps_plans, test, outcomes, task=col.task, pool=get_pool(), rewarder=tr.rewarder,
                             out=out, progress=progress, workflow=workflow, max_new_tokens=col.config.max_new_tokens)
        played += sum(sum(st != "missing" for st in r.status) for r in haps_rows.values())  # HAPS episodes too

    rows = _method_rows(plans, haps_rows, outcomes)
    labels = {k: labeler.assignment(k) for k in keys}
    methods, q_weak, q_strong = _method_summaries(cfg, plans, rows, outcomes, tr, labeler, labels, keys)
    summary = _summary(cfg, col=col, workflow=workflow, pool_cfg=pool_cfg, space=space, labeler=labeler,
                       labels=labels, keys=keys, tr=tr, n_test=len(test), test_source=test_source, played=played,
                       methods=methods, q_weak=q_weak, q_strong=q_strong, t0=t0)
    summary["static_hull"] = static_hull(methods)
    _write(out, summary, rows, labels, keys, space)
    return summary


def _open(cfg: EvalConfig):
    """The collection of ``cfg.actions``, reopened with ``cfg.task``'s workflow spec when that replaces the
    recorded one (`_check_task`)."""
    from haps.train.collect import open_collection

    col = open_collection(cfg.actions)
    override = _check_task(cfg.task, col)
    if override:
        col = open_collection(cfg.actions, workflow=override)
    return col


@dataclass
class _Train:
    """What the train / valid splits give every method: the reward, the tables and the reference assignments."""

    good: list[dict[str, Any]]  # the collection's records that are not failures
    failed_by_split: dict[str, int]  # failed records (and failures without a record) per split
    rewarder: Rewarder
    train: Any  # ActionTable of the train split
    valid: Any | None  # ActionTable of the valid split (None: no valid record)
    train_cost: torch.Tensor  # (A,) mean train cost per assignment
    weak: int  # the cheapest assignment on train
    strong: int  # the most expensive one
    best_j: int  # the best static assignment (mean reward on valid, else train)

    @property
    def ref_table(self):
        """The table the best static assignment is chosen on."""
        return self.valid if self.valid is not None else self.train


def _fit_train(cfg: EvalConfig, col, space) -> _Train:
    """The rewarder fitted on the train split's costs, the train / valid tables under it, the weak, strong and
    best static assignments, and the failed records per split (see `_Train`)."""
    from haps.evaluate import ActionTable
    from haps.evaluation.curves import cost_order
    from haps.metrics import CostNormalizer

    good = [r for r in col.records if not is_failed(r)]
    failed_by_split: dict[str, int] = {}
    for r in col.records:
        if is_failed(r):
            failed_by_split[str(r.get("split"))] = failed_by_split.get(str(r.get("split")), 0) + 1
    train_costs = [float(r["cost"]) for r in good if r.get("split") == "train"]
    if not train_costs:
        raise DataError(f"{str(col.path)!r} has no scored train-split record; the routers are fitted on it. "
                        "Collect more problems (or a train fraction > 0).")
    rewarder = Rewarder(_reward_config(cfg, col), CostNormalizer.fit(train_costs))
    recs = [dict(r, reward=rewarder(r["score"], r["cost"])) for r in good]
    train = ActionTable.from_records(recs, space, "train")
    try:
        valid = ActionTable.from_records(recs, space, "valid")
    except DataError:
        valid = None
    train_cost = torch.nanmean(train.cost, dim=0)  # (A,)
    order = cost_order(train_cost)
    weak, strong = int(order[0]), int(order[-1])
    ref_table = valid if valid is not None else train
    best_j = int(torch.nan_to_num(torch.nanmean(ref_table.reward, dim=0), nan=-math.inf).argmax())
    return _Train(good, failed_by_split, rewarder, train, valid, train_cost, weak, strong, best_j)


def _test_problems(cfg: EvalConfig, col, workflow) -> tuple[dict[str, str], list, str]:
    """(problem id -> problem text of the train / valid problems, the test problems, where they come from):
    the collection's test split, or the problems of ``cfg.data`` outside train / valid; at most ``cfg.limit``."""
    from haps.train.collect import problem_splits

    splits = problem_splits(col.records)
    problems = col.problems()
    texts = {str(p.id): workflow.problem_text(p) for p in problems if splits.get(str(p.id)) in ("train", "valid")}
    if cfg.data:
        from haps.data import load_problems

        given = load_problems(col.task, cfg.data)
        test = [p for p in given if splits.get(str(p.id)) not in ("train", "valid")]
        test_source = f"data file {cfg.data} ({len(given) - len(test)} of its problems in train/valid left out)"
    else:
        test = [p for p in problems if splits.get(str(p.id)) == "test"]
        test_source = "the collection's test split"
    if cfg.limit:
        test = test[:cfg.limit]
    if not test:
        raise DataError(f"no test problems: {test_source} is empty; collect with a test fraction > 0 or pass --data "
                        "with problems outside the train and valid splits.")
    return texts, test, test_source


def _test_outcomes(cfg: EvalConfig, col, space, tr: _Train, test: list) -> Outcomes:
    """The test problems' outcomes, filled from the action table (unless scoring = episodes); counts the
    collection's failures without a record into ``tr.failed_by_split``."""
    outcomes = Outcomes.empty(space, [str(p.id) for p in test])
    failures = _collection_failures(col.path)
    recorded = {(str(r["problem_id"]), space.key(r["assignment"])) for r in tr.good}
    for f in failures:  # (problem, z) the collection tried and never recorded
        if (str(f.get("problem_id")), str(f.get("key"))) not in recorded:
            split = str(f.get("split"))
            tr.failed_by_split[split] = tr.failed_by_split.get(split, 0) + 1
    if cfg.scoring != "episodes":
        outcomes.add_records(col.records, tr.rewarder)
        outcomes.add_failures(failures)
    return outcomes


def _make_plans(specs: list, ctx, outcomes: Outcomes, say: Callable[[str], None]) -> list:
    """Each method's `Plan` (its picks on the test prompts), fitting or loading the baselines."""
    from haps.evaluation.methods import plan_method

    plans = []
    for s in specs:
        if s.kind not in ("oracle", "random", "static", "haps", "haps-no-lora"):
            say(f"loading {s.name} from {s.arg}" if s.arg else f"fitting {s.name}")
        plans.append(plan_method(s, ctx, outcomes))
    return plans


def _cells_to_play(plans: list, outcomes: Outcomes, tr: _Train) -> list[list[int]]:
    """The [test row, assignment] cells some plan needs (and the weak, strong and best static ones, always)
    that the outcomes lack."""
    need = torch.zeros_like(outcomes.status, dtype=torch.bool)
    for plan in plans:
        if plan.pi is not None:
            need |= plan.pi > 0
        if plan.late is not None:
            need[:] = True
        if plan.sweep is not None:
            dec = plan.sweep[2]  # (S, P)
            need.scatter_(1, dec.t(), True)
    need[:, [tr.weak, tr.strong, tr.best_j]] = True
    return (need & (outcomes.status == MISSING)).nonzero().tolist()


def _lazy_pool(pool, pool_cfg) -> Callable[[], Any]:
    """A function returning ``pool``, or (None) a `ModelPool` of ``pool_cfg`` built on its first call."""
    state: dict[str, Any] = {"pool": pool}

    def get_pool():
        if state["pool"] is None:
            from haps.models.pool import ModelPool

            state["pool"] = ModelPool(pool_cfg)
        return state["pool"]

    return get_pool


def _play(cfg: EvalConfig, col, todo: list[list[int]], test: list, workflow, outcomes: Outcomes, rewarder: Rewarder,
          out: Path, get_pool: Callable[[], Any], runner: Callable | None, progress: bool,
          say: Callable[[str], None]) -> int:
    """Play the ``todo`` cells in one lockstep run with the collection's sampling (log:
    ``episodes/assignments.jsonl``) and put their outcomes in ``outcomes``; returns how many were played."""
    from haps.train.collect import default_sampling
    from haps.workflows.runner import EpisodeJob

    if runner is None:
        from haps.workflows.runner import run_episodes as runner
    space = outcomes.space
    say(f"playing {len(todo)} (problem, assignment) episodes the action table lacks")
    logp = out / "episodes" / "assignments.jsonl"
    logp.parent.mkdir(parents=True, exist_ok=True)
    logp.unlink(missing_ok=True)
    jobs = [EpisodeJob(test[i], space.to_names(space.at(j)), None) for i, j in todo]
    results = runner(get_pool(), workflow, jobs, sampling=default_sampling(col.config), log_path=logp,
                     seed=col.config.seed, progress=progress)
    if len(results) != len(jobs):
        raise DataError(f"the episode runner returned {len(results)} results for {len(jobs)} jobs.")
    for (i, j), res in zip(todo, results, strict=True):
        outcomes.set(i, j, score=getattr(res, "score", None), cost=getattr(res, "cost", None),
                     failed=bool(getattr(res, "failed", False)), source=EPISODES, rewarder=rewarder)
    return len(todo)


def _method_rows(plans: list, haps_rows: dict[str, MethodRows], outcomes: Outcomes) -> dict[str, MethodRows]:
    """Method name -> its per-problem rows: the HAPS methods' from their episodes, the others' looked up."""
    rows: dict[str, MethodRows] = {}
    for plan in plans:
        if plan.is_haps:
            rows[plan.spec.name] = haps_rows[plan.spec.name]
        else:
            rows[plan.spec.name] = outcomes.evaluate(plan.spec.name, plan.late(outcomes) if plan.late else plan.pi)
    return rows


def _method_summaries(cfg: EvalConfig, plans: list, rows: dict[str, MethodRows], outcomes: Outcomes, tr: _Train,
                      labeler, labels: dict[str, str], keys: list[str]
                      ) -> tuple[dict[str, Any], float | None, float | None]:
    """(method name -> its metrics (`method_summary`), the weak assignment's mean score, the strong one's)."""
    from haps.evaluation.curves import curve
    from haps.evaluation.summary import method_summary

    weak, strong = tr.weak, tr.strong
    best_rows = outcomes.evaluate("best-static-ref", outcomes.fixed(tr.best_j))
    refs = {"haps": rows.get("haps"), "best_static": best_rows,
            "oracle": rows.get("oracle") or outcomes.evaluate("oracle", outcomes.oracle())}
    weak_rows, strong_rows = outcomes.evaluate("weak", outcomes.fixed(weak)), outcomes.evaluate("strong",
                                                                                              outcomes.fixed(strong))
    q_weak = float(weak_rows.score[weak_rows.ok].mean()) if weak_rows.ok.any() else None
    q_strong = float(strong_rows.score[strong_rows.ok].mean()) if strong_rows.ok.any() else None
    bs = dict(n_boot=cfg.n_boot, level=cfg.level, seed=cfg.seed)
    methods: dict[str, Any] = {}
    for plan in plans:
        r = rows[plan.spec.name]
        pts = curve(outcomes, plan.sweep[2], plan.sweep[1], weak) if plan.sweep is not None else None
        info = dict(plan.info)
        info.update({k: v for k, v in r.extra.items() if k != "n_assignments"})
        methods[plan.spec.name] = method_summary(
            r, label=labeler.method(plan.spec.name), kind=plan.spec.kind, labels=labels, keys=keys, weak=weak,
            refs=refs, q_weak=q_weak, q_strong=q_strong, curve=pts, sweep_kind=plan.sweep[0] if plan.sweep else None,
            info=info, **bs)
    return methods, q_weak, q_strong


def _summary(cfg: EvalConfig, *, col, workflow, pool_cfg, space, labeler, labels: dict[str, str], keys: list[str],
             tr: _Train, n_test: int, test_source: str, played: int, methods: dict[str, Any],
             q_weak: float | None, q_strong: float | None, t0: float) -> dict[str, Any]:
    """``summary.json`` (format ``haps-eval/1``) but its static hull: the run's settings, pool, assignments,
    references and every method's metrics; ``t0`` is when the run started."""
    k_weak, k_strong, k_best = keys[tr.weak], keys[tr.strong], keys[tr.best_j]
    models = [{"name": m.name, "short": labeler.models[m.name], "backend": m.backend, "open_weights": m.open_weights,
               "price_in": m.price_in, "price_out": m.price_out} for m in pool_cfg.models]
    return {
        "format": FORMAT, "task": workflow.name, "task_spec": col.task,
        "setting": cfg.setting or pool_cfg.name or "pool", "actions": str(col.path),
        "pool": {"name": pool_cfg.name, "models": models},
        "mixed": any(not m["open_weights"] or m["backend"] == "api" for m in models),
        "roles": list(space.roles), "role_labels": labeler.roles,
        "assignments": [{"key": k, "label": labels[k], "train_cost": _finite(tr.train_cost[j])}
                        for j, k in enumerate(keys)],
        "legend": labeler.legend(), "reward": tr.rewarder.describe(), "scoring": cfg.scoring,
        "splits": {"train": len(tr.train.problem_ids),
                   "valid": len(tr.valid.problem_ids) if tr.valid is not None else 0},
        "test_problems": n_test, "test_source": test_source, "failed_records": tr.failed_by_split,
        "episodes_played": played,
        "weak": {"key": k_weak, "label": labels[k_weak], "score": q_weak},
        "strong": {"key": k_strong, "label": labels[k_strong], "score": q_strong},
        "best_static": {"key": k_best, "label": labels[k_best],
                        "split": "valid" if tr.valid is not None else "train",
                        "mean_reward": _finite(torch.nanmean(tr.ref_table.reward[:, tr.best_j]))},
        "methods": methods,
        "n_boot": cfg.n_boot, "level": cfg.level, "seed": cfg.seed,
        "wall_s": round(time.perf_counter() - t0, 3), "versions": _versions(), "argv": list(sys.argv),
        "config": cfg.model_dump(mode="json"),
    }


def _collection_failures(path: Path) -> list[dict[str, Any]]:
    """The collection's ``failures.jsonl`` lines, one per (problem, assignment) (empty when it has none)."""
    from haps.files import read_jsonl
    from haps.train.collect import FAILURES

    p = Path(path) / FAILURES
    if not p.exists():
        return []
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for f in read_jsonl(p):
        if isinstance(f, dict):
            last[(str(f.get("problem_id")), str(f.get("key")))] = f
    return list(last.values())


def _finite(x) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def _write(out: Path, summary: dict[str, Any], rows: dict[str, MethodRows], labels, keys, space) -> None:
    import json

    from haps.files import write_json_atomic, write_text_atomic

    lines = []
    for name, r in rows.items():
        for i, pid in enumerate(r.problem_ids):
            c = r.choice[i]
            lines.append(json.dumps({
                "method": name, "problem_id": pid, "status": r.status[i],
                "score": _finite(r.score[i]), "reward": _finite(r.reward[i]), "cost": _finite(r.cost[i]),
                "cost_norm": _finite(r.cost_norm[i]),
                "assignment": space.to_names(space.at(c)) if c is not None else None,
                "label": labels[keys[c]] if c is not None else None, "source": r.source[i],
            }))
    write_text_atomic(out / PER_PROBLEM, "\n".join(lines) + "\n")
    write_json_atomic(out / SUMMARY, summary)
