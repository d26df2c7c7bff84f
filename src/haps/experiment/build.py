"""The plan of an experiment: every stage's resolved config, output, inputs and work (`haps.experiment.plan`).

Nothing here loads a model or writes outside ``OUT/pools`` (the pool each setting runs on, written so that
every stage and a user reading the folder see the same file).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from haps.config import PoolConfig, load_pool
from haps.errors import ConfigError
from haps.experiment.config import ExperimentConfig, Variant, for_task
from haps.experiment.plan import DEFAULT_RATES, Stage, episode_seconds
from haps.profiles import collect_overrides, composition_prices, merge, rl_overrides, sft_overrides

RUNS, RESULTS, REPORT, POOLS = "runs", "results", "report", "pools"
#: the SFTConfig fields the warm-up set depends on
WARMUP_FIELDS = ("tie", "drop_all_zero", "balance", "seed", "train_split")
#: the closed models' port in a pool file before its server has started (rewritten at start)
NO_PORT = 9


@dataclass
class SettingPlan:
    """A setting resolved: its pool (prices and closed models applied) and the file every stage reads."""

    name: str
    pool: PoolConfig  # as the stages see it (closed models as API models)
    base: PoolConfig  # before the closed models became API models
    closed: list[str]
    file: Path
    serve_options: dict[str, Any] = field(default_factory=dict)

    @property
    def mixed(self) -> bool:
        return bool(self.closed)

    def view(self) -> Any:
        """The pool as it enters fingerprints: what changes results (no ports, timeouts, cache folders)."""
        from haps.train.collect import _result_view

        return _result_view("pool", self.pool.model_dump(mode="json", exclude_defaults=True))


def resolve_setting(cfg: ExperimentConfig, name: str, out: Path, port: int = NO_PORT) -> SettingPlan:
    """The setting's pool with the profile's composition prices (unless the pool has its own) and its closed
    models as API models at ``port``; written to ``OUT/pools/<name>.yaml``."""
    from haps.experiment.closed import mixed_pool

    s = cfg.settings[name]
    try:
        base = PoolConfig.model_validate(s.pool) if isinstance(s.pool, dict) else load_pool(s.pool)
    except ValueError as e:
        raise ConfigError(f"settings.{name}.pool: {e}") from None
    if not base.composition_prices:
        prices = composition_prices(cfg.profile, base.names)
        if prices:
            base = base.model_copy(update={"composition_prices": prices})
    pool = mixed_pool(base, s.closed, port)[0] if s.closed else base
    file = (out / POOLS / f"{name}.yaml").resolve()
    return SettingPlan(name, pool, base, list(s.closed), file, dict(s.serve_options))


def write_pool(sp: SettingPlan) -> None:
    from haps.files import write_text_atomic

    sp.file.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(sp.pool.model_dump(mode="json", exclude_defaults=False), sort_keys=False)
    if not sp.file.exists() or sp.file.read_text() != text:
        write_text_atomic(sp.file, text)


def _rl_config(cfg: ExperimentConfig, task: str, ccfg, variant: Variant, sp: SettingPlan):
    from haps.train.rl import RLConfig

    section = merge(merge(rl_overrides(cfg.profile), for_task(cfg.rl, task, cfg.tasks)), variant.rl)
    bad = [k for k in ("task", "data", "limit", "problem_seed", "pool", "workflow_options", "split_fractions",
                       "split_seed") if k in for_task(cfg.rl, task, cfg.tasks)]
    if bad:
        raise ConfigError(f"rl: {bad} come from the collection (the RL run must see its problems and split); "
                          "set them in the collect section.")
    return RLConfig(task=task, data=ccfg.data, limit=ccfg.limit, problem_seed=ccfg.problem_seed, pool=str(sp.file),
                    workflow_options=dict(ccfg.workflow_options), split_fractions=ccfg.split_fractions,
                    split_seed=ccfg.split_seed, **section)


def _steps(cfg: ExperimentConfig, task: str) -> int | None:
    v = cfg.rl_steps
    return v.get(task) if isinstance(v, dict) else v


def _done_steps(rl_dir: Path) -> int:
    import json

    latest = rl_dir / "state" / "latest.json"
    try:
        return int(json.loads(latest.read_text())["step"]) if latest.exists() else 0
    except (ValueError, KeyError, OSError):
        return 0


def _recorded(actions: Path) -> int:
    from haps.train.collect import failed_record, read_actions

    if not (actions / "actions.jsonl").exists():
        return 0
    return len({(r["problem_id"], r["key"]) for r in read_actions(actions) if not failed_record(r)})


def build_plan(cfg: ExperimentConfig, out: Path, *, tasks: list[str] | None = None, data: str | None = None
               ) -> tuple[list[Stage], dict[str, SettingPlan]]:
    """Every stage of ``cfg`` (restricted to ``tasks``), in run order, and the settings they run on."""
    from haps.train.sft import SFTConfig

    out = Path(out)
    run_tasks = _run_tasks(cfg, tasks, data)
    settings = {name: resolve_setting(cfg, name, out) for name in cfg.settings
                if any(name in cfg.settings_of(t) for t in run_tasks)}
    variants = [Variant.parse(v) for v in cfg.variants]
    sft_cfg = SFTConfig.model_validate(merge(sft_overrides(cfg.profile), cfg.sft))
    stages: list[Stage] = []
    evals: list[str] = []
    for task in run_tasks:
        for sname in cfg.settings_of(task):
            ts = _task_setting(cfg, task, sname, settings[sname], out, data)
            stages += _training_stages(ts, sft_cfg)
            rl_stages, rl_ids = _rl_stages(cfg, ts, variants)
            stages += rl_stages
            bl_cfgs = dict(cfg.eval.get("baselines", {}))
            stages.append(Stage(f"{ts.pid}/baselines", "baselines", ts.root / "baselines",
                                {"names": list(cfg.baselines), "configs": bl_cfgs}, task, sname,
                                after=[f"{ts.pid}/collect"], work=len(cfg.baselines), unit="baselines",
                                rate_key="baselines", info={**ts.base_info, "default_rate": DEFAULT_RATES["baseline"]}))
            eval_stages = _eval_stages(cfg, ts, variants, rl_ids, bl_cfgs, out)
            evals += [s.id for s in eval_stages]
            stages += eval_stages
    stages.append(Stage("report", "report", out / REPORT / "report.html", {}, after=evals, work=1, unit="stage",
                        rate_key="report"))
    return stages, settings


def _run_tasks(cfg: ExperimentConfig, tasks: list[str] | None, data: str | None) -> list[str]:
    """The experiment's tasks restricted to ``tasks`` (in the experiment's order); ConfigError for a task not
    in it, or for ``data`` (one task's problems) with more than one task."""
    run_tasks = list(cfg.tasks)
    if tasks:
        unknown = [t for t in tasks if t not in cfg.tasks]
        if unknown:
            raise ConfigError(f"--task {unknown[0]!r} is not a task of this experiment ({cfg.tasks}).")
        run_tasks = [t for t in cfg.tasks if t in tasks]
    if data and len(run_tasks) != 1:
        raise ConfigError(f"--data names one task's problems; this experiment runs {run_tasks}: add --task.")
    return run_tasks


@dataclass
class _TaskSetting:
    """One (task, setting) of the plan: its collection, its split sizes and the folders its stages write."""

    task: str
    sname: str
    sp: SettingPlan
    ccfg: Any  # CollectConfig
    n: dict[str, int]  # problems per split
    pairs: int  # (problem, assignment) pairs the collection runs
    ep_s: float  # default seconds per episode
    root: Path  # OUT/runs/<task>/<setting>
    res: Path  # OUT/results/<task>/<setting>
    base_info: dict[str, Any]

    @property
    def pid(self) -> str:
        return f"{self.task}/{self.sname}"


def _task_setting(cfg: ExperimentConfig, task: str, sname: str, sp: SettingPlan, out: Path,
                  data: str | None) -> _TaskSetting:
    """``task`` on setting ``sp``: its collect config (``data`` replacing the problems), problems, splits and
    (problem, assignment) pairs, resolved without running anything."""
    from haps.cli.common import data_path
    from haps.data import load_problems
    from haps.routing.space import AssignmentSpace
    from haps.train.collect import CollectConfig, assignments_for, plan_splits
    from haps.workflows.loader import get_workflow

    section = merge(collect_overrides(cfg.profile, task), for_task(cfg.collect, task, cfg.tasks))
    if data:
        section["data"] = data
    section["data"] = data_path(section.get("data"))
    ccfg = CollectConfig.model_validate({**section, "task": task, "pool": str(sp.file)})
    wf = get_workflow(task, **ccfg.workflow_options)
    problems = load_problems(task, ccfg.data, ccfg.limit, sample_seed=ccfg.problem_seed)
    split_of = plan_splits(problems, ccfg, wf.stratify_by if ccfg.stratify else None, require_all=True)
    n = {k: sum(1 for v in split_of.values() if v == k) for k in ("train", "valid", "test")}
    space = AssignmentSpace.of(wf.roles, sp.pool.names)
    pairs = sum(len(assignments_for(space, p.id, ccfg)) for p in problems)
    ep_s = episode_seconds(task, ccfg.max_new_tokens, ccfg.workflow_options)
    base_info = {"collect": ccfg, "setting": sp, "splits": n, "workflow": wf}
    return _TaskSetting(task, sname, sp, ccfg, n, pairs, ep_s, out / RUNS / task / sname,
                        out / RESULTS / task / sname, base_info)


def _training_stages(ts: _TaskSetting, sft_cfg) -> list[Stage]:
    """The collect, warm-up and SFT stages of one (task, setting)."""
    from haps.train.collect import RESULT_FIELDS

    task, sname, pid, root, n = ts.task, ts.sname, ts.pid, ts.root, ts.n
    cview = {k: v for k, v in _spec(ts.ccfg).items() if k in RESULT_FIELDS and k != "pool"}
    return [
        Stage(f"{pid}/collect", "collect", root / "actions", {"config": cview, "pool": ts.sp.view()},
              task, sname, needs_models=True, work=max(0, ts.pairs - _recorded(root / "actions")),
              unit="episodes", rate_key=f"collect/{task}",
              info={**ts.base_info, "default_rate": ts.ep_s, "pairs": ts.pairs}),
        Stage(f"{pid}/warmup", "warmup", root / "warmup.json", {k: getattr(sft_cfg, k) for k in WARMUP_FIELDS},
              task, sname, after=[f"{pid}/collect"], work=1, unit="stage", rate_key="warmup", info=ts.base_info),
        Stage(f"{pid}/sft", "sft", root / "sft", _spec(sft_cfg), task, sname,
              after=[f"{pid}/warmup"], work=sft_cfg.epochs * n["train"], unit="examples x epochs",
              rate_key="sft", info={**ts.base_info, "sft": sft_cfg, "default_rate": DEFAULT_RATES["sft_example"]}),
    ]


def _rl_stages(cfg: ExperimentConfig, ts: _TaskSetting, variants: list[Variant]
               ) -> tuple[list[Stage], dict[str, str]]:
    """(one RL stage per variant, variant name -> its stage id) of one (task, setting); the work left counts
    the steps a previous run has done."""
    task, sname, pid, root, n = ts.task, ts.sname, ts.pid, ts.root, ts.n
    stages: list[Stage] = []
    rl_ids: dict[str, str] = {}
    for v in variants:
        rcfg = _rl_config(cfg, task, ts.ccfg, v, ts.sp)
        steps_cap = _steps(cfg, task)
        n_train = min(rcfg.train_limit or n["train"], n["train"])
        total = rcfg.epochs * math.ceil(n_train / rcfg.batch_size)
        steps = min(total, steps_cap) if steps_cap else total
        done = min(_done_steps(root / "rl" / v.name), steps)
        n_valid = min(rcfg.valid_limit or n["valid"], n["valid"])
        vals = sum(1 for k in range(done + 1, steps + 1) if k % rcfg.validate_every == 0 or k == total)
        rl_ep = DEFAULT_RATES["rl_episode"] * rcfg.max_new_tokens / 80
        sid = f"{pid}/rl/{v.name}"
        rl_ids[v.name] = sid
        spec = {"rl": _spec(rcfg), "steps": steps_cap}
        spec["rl"].pop("pool", None)
        stages.append(Stage(sid, "rl", root / "rl" / v.name, spec, task, sname, v.name,
                            after=[f"{pid}/sft"], needs_models=True,
                            work=(steps - done) * rcfg.batch_size * rcfg.group_size, unit="episodes",
                            rate_key=f"rl/{task}", extra_s=vals * n_valid * ts.ep_s,
                            info={**ts.base_info, "rl": rcfg, "steps": steps, "variant": v,
                                  "default_rate": rl_ep}))
    return stages, rl_ids


def _eval_stages(cfg: ExperimentConfig, ts: _TaskSetting, variants: list[Variant], rl_ids: dict[str, str],
                 bl_cfgs: dict[str, Any], out: Path) -> list[Stage]:
    """The main eval stage and one per variant (but "full") that has methods of its own, of one (task,
    setting); a variant with a tradeoff reward refits the baselines (configs ``bl_cfgs``) under it."""
    task, sname, pid, n = ts.task, ts.sname, ts.pid, ts.n
    stages: list[Stage] = []
    for v in [None, *[v for v in variants if v.name != "full"]]:
        methods, after, haps_n = _eval_methods(cfg, v, variants, ts.root, pid, rl_ids, n["test"])
        if v is not None and not methods:
            continue
        eval_section = {k: x for k, x in cfg.eval.items() if k != "baselines"}
        if v is not None and v.tradeoff is not None:
            eval_section.update(reward="tradeoff", alpha=v.tradeoff[0], beta=v.tradeoff[1],
                                baselines=bl_cfgs)
        folder = ts.res if v is None or v.folder is None else ts.res / v.folder
        sid = f"{pid}/eval/{'main' if v is None else v.name}"
        spec = {"methods": [_rel(m, out) for m in methods], "eval": eval_section, "setting": sname,
                "depth": v.depth if v is not None else None}
        refit = len(cfg.baselines) if v is not None and v.tradeoff is not None else 0
        stages.append(Stage(sid, "eval", folder / "summary.json", spec, task, sname,
                            None if v is None else v.name, after=[f"{pid}/collect", *after],
                            needs_models=haps_n > 0, work=haps_n * min(cfg.eval.get("limit") or n["test"],
                                                                       n["test"]),
                            unit="episodes", rate_key=f"eval/{task}",
                            extra_s=30 + refit * DEFAULT_RATES["baseline"],
                            info={**ts.base_info, "methods": methods, "eval": eval_section, "folder": folder,
                                  "variant": v, "default_rate": ts.ep_s}))
    return stages


def _spec(cfg) -> dict[str, Any]:
    """A stage config as it enters fingerprints: the values that differ from the model's defaults (a field added
    to a config model later, with a default, leaves the stages done before it done)."""
    return cfg.model_dump(mode="json", exclude_defaults=True)


def _rel(method: str, out: Path) -> str:
    """A method spec with its checkpoint path relative to OUT (fingerprints do not depend on where OUT is)."""
    kind, sep, arg = method.partition(":")
    if sep and arg.startswith(str(out)):
        return f"{kind}:{Path(arg).relative_to(out)}"
    return method


def _eval_methods(cfg: ExperimentConfig, v: Variant | None, variants: list[Variant], root: Path, pid: str,
                  rl_ids: dict[str, str], n_test: int) -> tuple[list[str], list[str], int]:
    """(methods, stages they read, HAPS methods) of the main eval (``v`` None) or of variant ``v``'s eval."""
    names = {x.name for x in variants}
    best = {name: str(root / "rl" / name / "best") for name in names}
    if v is None:
        methods = ["oracle", "random", "all-static"]
        methods += [f"{b}:{root / 'baselines' / b}" for b in cfg.baselines]
        methods.append(f"sft:{root / 'sft'}")
        after = [f"{pid}/baselines", f"{pid}/sft"]
        haps = 0
        if "full" in names:
            methods.append(f"haps:{best['full']}")
            after.append(rl_ids["full"])
            haps += 1
            if "no-lora" not in names:  # Table 3's w/o low-level row from the full router, adapters off
                methods.append(f"haps-no-lora:{best['full']}")
                haps += 1
        return methods, after, haps
    if v.tradeoff is not None:  # Table 5: every method under the regime's reward; baselines fitted there
        methods = ["oracle", "random", "all-static", *cfg.baselines, f"haps:{best[v.name]}"]
        return methods, [rl_ids[v.name]], 1
    kind = "haps-no-lora" if v.name == "no-lora" else "haps"
    return [f"{kind}:{best[v.name]}"], [rl_ids[v.name]], 1
