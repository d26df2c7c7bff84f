"""`run_experiment`: plan, print the stage table, run every stage that is not done, stop the servers."""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from haps.errors import ConfigError
from haps.experiment.build import POOLS, REPORT, RESULTS, SettingPlan, build_plan, write_pool
from haps.experiment.config import ExperimentConfig
from haps.experiment.plan import Stage, StageState, apply_rates, assign_status, fmt_seconds
from haps.files import write_json_atomic

MANIFEST = "experiment.json"


class StageFailed(Exception):
    """A stage ran but left work undone (e.g. failed episodes); ``lines`` say what and what to do."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


@dataclass
class ExperimentResult:
    out: Path
    stages: list[Stage]
    ran: list[tuple[str, float]] = field(default_factory=list)  # (stage id, seconds)
    failures: list[str] = field(default_factory=list)

    @property
    def report(self) -> Path:
        return self.out / REPORT / "report.html"


# ---------------------------------------------------------------------------------------------- tables
def plan_table(stages: list[Stage], title: str):
    from rich import box
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, caption_justify="left", title_justify="left")
    for col, j in (("stage", "left"), ("status", "left"), ("work left", "right"), ("estimate", "right")):
        t.add_column(col, justify=j)
    for s in stages:
        unit = s.unit[:-1] if s.work == 1 and s.unit.endswith("s") else s.unit
        work = "-" if s.status == "done" or not s.work else f"{s.work:g} {unit}"
        status = {"partial": "partial: " + ("resume" if s.kind in ("collect", "rl", "baselines") else "redo"),
                  "changed": "changed: redo"}.get(s.status, s.status)
        t.add_row(s.id, status, work, fmt_seconds(s.estimate_s) if s.status != "done" else "-")
    total = sum(s.estimate_s for s in stages)
    todo = sum(1 for s in stages if s.status != "done")
    t.caption = (f"{todo} of {len(stages)} stages to run, about {fmt_seconds(total)}: work left x seconds per "
                 "unit, as measured by this experiment's finished stages of the same kind and task, else haps' "
                 "2-core CPU defaults (haps.experiment.plan); model loading not included.")
    return t


# ---------------------------------------------------------------------------------------------- stages
class StageRunner:
    """Runs one stage at a time; keeps the pools, the embedder and the closed-model servers across stages."""

    def __init__(self, cfg: ExperimentConfig, out: Path, settings: dict[str, SettingPlan], *, progress: bool,
                 console) -> None:
        self.cfg, self.out, self.settings, self.progress, self.console = cfg, out, settings, progress, console
        self._pools: dict[tuple[str, int | None], Any] = {}
        self._servers: dict[str, Any] = {}
        self._embedder = None

    # ------------------------------------------------------------------ shared resources
    def pool(self, sp: SettingPlan, last_k: int | None = None):
        """The setting's ModelPool (its closed models' server started first), LoRA on the last ``last_k`` layers."""
        from haps.models.pool import ModelPool

        if sp.mixed:
            self._serve(sp)
        key = (sp.name, last_k)
        if key not in self._pools:
            pc = self.settings[sp.name].pool
            if last_k is not None and last_k != pc.lora.last_k_layers:
                pc = pc.model_copy(update={"lora": pc.lora.model_copy(update={"last_k_layers": last_k})})
            self._pools[key] = ModelPool(pc)
        return self._pools[key]

    def _serve(self, sp: SettingPlan) -> None:
        import yaml

        from haps.experiment.build import resolve_setting
        from haps.experiment.closed import ClosedServer, free_port, mixed_pool

        if sp.name in self._servers:
            return
        port = free_port()
        served = mixed_pool(sp.base, sp.closed, port)[1]
        served_file = self.out / POOLS / f"{sp.name}-served.yaml"
        served_file.write_text(yaml.safe_dump(served.model_dump(mode="json"), sort_keys=False))
        server = ClosedServer(served_file, port, log=self.out / POOLS / f"{sp.name}-serve.log",
                              options=sp.serve_options)
        self.console.print(f"[dim]starting the closed models {sp.closed} of setting {sp.name!r}: haps serve on "
                           f"{server.url} (log {server.log})[/]")
        server.start()
        self._servers[sp.name] = server
        fresh = resolve_setting(self.cfg, sp.name, self.out, port)
        self.settings[sp.name] = fresh
        write_pool(fresh)  # every stage reads the pool file: now with the server's port
        for key in [k for k in self._pools if k[0] == sp.name]:
            del self._pools[key]

    def embedder(self):
        if self._embedder is None:
            from haps.baselines.base import MiniLMEmbedder

            self._embedder = MiniLMEmbedder()
        return self._embedder

    def close(self) -> None:
        for name, server in list(self._servers.items()):
            server.stop()
            del self._servers[name]

    # ------------------------------------------------------------------ dispatch
    def run(self, s: Stage) -> float | None:
        """Run stage ``s``; returns the units of work it did (None: as planned)."""
        return getattr(self, f"_{s.kind}")(s)

    def _sp(self, s: Stage) -> SettingPlan:
        return self.settings[s.setting]

    def _actions(self, s: Stage) -> Path:
        return self.out / "runs" / s.task / s.setting / "actions"

    def _collect(self, s: Stage) -> float:
        from haps.train.collect import collect

        pool = self.pool(self._sp(s))
        summary = collect(s.info["collect"], s.output, pool=pool, progress=self.progress, require_splits=True)
        self.console.print(f"{s.output}: {summary.total} (problem, assignment) pairs, {summary.done_before} done "
                           f"before, {summary.written} written in {summary.seconds:.0f} s")
        lines = [x for x in [summary.failure_summary() or "", *summary.capped_lines()] if x]
        if lines or not summary.complete:
            raise StageFailed(lines or [f"{s.id}: the collection is incomplete; rerun the same command."])
        return summary.written

    def _warmup(self, s: Stage) -> None:
        from haps.train.collect import open_collection
        from haps.train.warmup import build_warmup

        sft = s.info.get("sft") or self._sft_config()
        col = open_collection(self._actions(s))
        examples, stats = build_warmup(col.records, split=sft.train_split, tie=sft.tie,
                                       drop_all_zero=sft.drop_all_zero, balance=sft.balance, seed=sft.seed)
        self.console.print(stats.table())
        write_json_atomic(s.output, {"stats": stats.to_dict(), "examples": [asdict(e) for e in examples]})

    def _sft_config(self):
        from haps.profiles import merge, sft_overrides
        from haps.train.sft import SFTConfig

        return SFTConfig.model_validate(merge(sft_overrides(self.cfg.profile), self.cfg.sft))

    def _sft(self, s: Stage) -> None:
        from haps.train.sft import run_sft

        if s.output.exists():  # SFT does not resume: a partial run starts again
            shutil.rmtree(s.output)
        run_sft(self._actions(s), s.output, s.info["sft"], progress=self.progress)

    def _rl(self, s: Stage) -> float:
        from haps.train.rl import RLRecipe
        from haps.workflows.loader import get_workflow

        rcfg, variant, ccfg = s.info["rl"], s.info["variant"], s.info["collect"]
        if variant.tradeoff is not None:
            rcfg = rcfg.model_copy(update={"cost_range": _train_cost_range(self._actions(s))})
        pool = self.pool(self._sp(s), rcfg.last_k_layers)
        wf = get_workflow(s.task, **rcfg.workflow_options)
        if not ccfg.stratify:
            wf.stratify_by = None  # the collection's split (`CollectConfig.stratify`)
        recipe = RLRecipe(rcfg, s.output, self.progress)
        recipe.setup(self.out / "runs" / s.task / s.setting / "sft", pool=pool, workflow=wf)
        recipe.data.test = []  # the eval stage tests the best checkpoint on the test split
        before = recipe.state["step"]
        summary = recipe.train(s.info["steps"])
        self.console.print(f"{s.output}: {summary['steps']} updates; best validation reward "
                           f"{summary['best_valid']} at step {summary['best_step']}; checkpoint {s.output / 'best'}")
        return (summary["steps"] - before) * rcfg.batch_size * rcfg.group_size

    def _baselines(self, s: Stage) -> float:
        from haps.baselines.train import baseline_class, fit_from_collection
        from haps.train.collect import open_collection

        col = open_collection(self._actions(s))
        done = 0
        for name in s.spec["names"]:
            folder = s.output / name
            if s.status == "partial" and (folder / "router.json").exists():
                continue  # fitted before the interruption
            cls = baseline_class(name)
            config = cls.config_cls.model_validate(dict(s.spec["configs"].get(name, {})))
            router = fit_from_collection(name, col, config=config,
                                         embedder=self.embedder() if cls.needs_embeddings else None)
            router.save(folder)
            done += 1
            self.console.print(f"[dim]fitted {name} -> {folder}[/]")
        s.output.mkdir(parents=True, exist_ok=True)
        return done

    def _eval(self, s: Stage) -> float:
        from haps.evaluation.config import EvalConfig
        from haps.evaluation.run import run_eval
        from haps.evaluation.summary import tables

        v = s.info["variant"]
        folder: Path = s.info["folder"]
        ecfg = EvalConfig.model_validate({**s.info["eval"], "task": s.task, "actions": str(self._actions(s)),
                                          "out": str(folder), "methods": s.info["methods"], "setting": s.setting})
        pool = self.pool(self._sp(s), v.depth if v is not None else None) if s.needs_models else None
        summary = run_eval(ecfg, pool=pool, embedder=self.embedder(), progress=self.progress,
                           log=lambda x: self.console.print(f"[dim]{x}[/]"))
        for t in tables(summary):
            self.console.print(t)
        return sum(1 for m in summary["methods"].values() if m.get("kind") in ("haps", "haps-no-lora")) * \
            summary["test_problems"]

    def _report(self, s: Stage) -> None:
        from haps.report import build_report

        rep = build_report(self.out / RESULTS, self.out / REPORT)
        for line in rep.status_lines():
            self.console.print(f"  {line}")
        self.console.print(f"report: {rep.html} ({rep.runs} runs)")


def _train_cost_range(actions: Path) -> tuple[float, float]:
    """(min, max) episode cost of the collection's train split: the cost normaliser of the tradeoff reward."""
    from haps.metrics import CostNormalizer
    from haps.train.collect import failed_record, read_actions

    n = CostNormalizer.fit(float(r["cost"]) for r in read_actions(actions)
                           if r.get("split") == "train" and not failed_record(r))
    return (n.c_min, n.c_max)


# ---------------------------------------------------------------------------------------------- the run
def plan_experiment(cfg: ExperimentConfig, out: str | Path, *, tasks: list[str] | None = None,
                    data: str | None = None) -> tuple[list[Stage], dict[str, SettingPlan], StageState]:
    """The stages with their status and estimates (nothing runs)."""
    out = Path(out)
    stages, settings = build_plan(cfg, out, tasks=tasks, data=data)
    state = StageState(out)
    assign_status(stages, state)
    by_id = {s.id: s for s in stages}
    for s in stages:  # an input that will run again makes its readers run again
        if s.status == "done" and any(by_id[a].status != "done" for a in s.after if a in by_id):
            s.status = "changed"
        if s.kind == "collect" and s.status == "changed":
            raise ConfigError(f"{s.output} holds a collection made with other settings ({s.id}); resume with the "
                              "config it was made with, or use another --out.")
    apply_rates(stages, state)
    return stages, settings, state


def run_experiment(cfg: ExperimentConfig, out: str | Path, *, tasks: list[str] | None = None, data: str | None = None,
                   progress: bool = True, console=None, on_stage=None) -> ExperimentResult:
    """Run (or resume) the experiment ``cfg`` into ``out`` (see `haps.experiment`). ``on_stage(stage, event,
    seconds)`` is called with event "start" before a stage runs and "done" (with its seconds) after."""
    from rich.console import Console

    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages, settings, state = plan_experiment(cfg, out, tasks=tasks, data=data)
    console.print(plan_table(stages, f"experiment {out} (profile {cfg.profile})"))
    write_json_atomic(out / MANIFEST, {"config": cfg.model_dump(mode="json"), "tasks": tasks, "data": data,
                                       "argv": list(sys.argv), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    for sp in settings.values():
        write_pool(sp)
    result = ExperimentResult(out, stages)
    runner = StageRunner(cfg, out, settings, progress=progress, console=console)
    todo = [s for s in stages if s.status != "done"]
    try:
        for i, s in enumerate(todo, 1):
            console.rule(f"[bold]{i}/{len(todo)} {s.id}[/] ({s.status})")
            if s.kind == "rl" and s.status == "changed" and s.output.exists():
                shutil.rmtree(s.output)  # made with other settings or inputs: RL would resume it
            state.started(s)
            if on_stage is not None:
                on_stage(s, "start", None)
            t0 = time.perf_counter()
            try:
                units = runner.run(s)
            except StageFailed as e:
                result.failures = e.lines
                console.print(f"[red]{s.id} stopped; later stages not run[/]")
                break
            secs = time.perf_counter() - t0
            state.finished(s, secs, units)
            s.status = "done"
            result.ran.append((s.id, secs))
            if on_stage is not None:
                on_stage(s, "done", secs)
    finally:
        runner.close()
    if result.ran:
        console.print(f"ran {len(result.ran)} stage(s) in {fmt_seconds(sum(x for _, x in result.ran))}: "
                      + ", ".join(f"{sid} {fmt_seconds(x)}" for sid, x in result.ran))
    else:
        console.print("every stage was done already; nothing to run.")
    if (out / REPORT / "report.html").exists():
        console.print(f"report: {out / REPORT / 'report.html'}")
    return result


def load_experiment_config(path: str | Path) -> ExperimentConfig:
    from haps.config import load_yaml

    return ExperimentConfig.model_validate(load_yaml(path))


def stage_records(out: str | Path) -> dict[str, Any]:
    """``OUT/stages.json`` as a dict (empty when the experiment has not started)."""
    p = Path(out) / "stages.json"
    return json.loads(p.read_text()) if p.exists() else {}
