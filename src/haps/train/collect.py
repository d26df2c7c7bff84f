"""Action-level data collection (paper App. C, Eq. 8): run every assignment z for every problem p and
record r(p, z).

For each chunk of problems all their pending (problem, z) pairs go to the lockstep runner at once, so
each model gets large batches. Output folder::

    DIR/manifest.json        the arguments, the pool and the workflow options (checked on resume)
    DIR/actions.jsonl        one JSON per (problem, z): problem_id, split, assignment, reward, score, ...
    DIR/episodes/*.jsonl     the runner's episode logs; each action points at its file and episode id

Resumable: records are appended one line at a time with flush + fsync; at start-up a torn last line
(a kill mid-write) is cut off, done (problem, z) keys are skipped, and a resumed run whose arguments
differ from the manifest's fails with the differences listed. Killed at any point and restarted with
the same arguments, the run ends with every (problem, z) recorded exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from haps.errors import ConfigError, DataError
from haps.files import write_json_atomic
from haps.routing.space import Assignment, AssignmentSpace

ACTIONS = "actions.jsonl"
MANIFEST = "manifest.json"
EPISODES = "episodes"
FORMAT = "haps-actions/1"


class CollectConfig(BaseModel):
    """Everything that determines the content of an action-level data folder."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(description="Workflow / benchmark name: hotpotqa | mmlu.")
    data: str | None = Field(default=None, description="JSONL file or folder of problems (None: embedded demo set).")
    limit: int | None = Field(default=None, ge=1, description="Use N problems of the file (the first N, or a "
                              "seeded spread-out subset with problem_seed).")
    problem_seed: int | None = Field(default=None, description="With limit: pick a seeded subset spread over the "
                                     "file (e.g. across MMLU subjects) instead of the first N.")
    pool: str = Field(default="tiny", description="Built-in pool name or pool YAML.")
    workflow_options: dict[str, Any] = Field(default_factory=dict, description="Passed to get_workflow(task, ...).")
    max_new_tokens: int | None = Field(default=None, ge=1, description="Cap on tokens per model call (None: "
                                       "the workflow's own limits).")
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature of the agents (0: greedy).")
    sample: int | None = Field(default=None, ge=1, description="L: assignments sampled per problem when K^N > "
                               "max_enumerate (required then; ignored otherwise).")
    max_enumerate: int = Field(default=64, ge=1, description="Run all K^N assignments when K^N <= this.")
    seed: int = Field(default=0, description="Seed of the assignment sampling and of the agents' sampling.")
    split_fractions: tuple[float, float, float] = Field(default=(0.6, 0.2, 0.2), description="train/valid/test "
                                                        "fractions recorded with each action (split by id).")
    split_seed: int = Field(default=0, description="Seed of the train/valid/test split.")
    reward_kind: str = Field(default="score", description="Reward recorded at collection: score | shaped "
                             "(tradeoff rewards need a cost normaliser and are recomputed downstream).")
    chunk_size: int = Field(default=8, ge=1, description="Problems per lockstep runner call (all their "
                            "assignments at once).")


# ------------------------------------------------------------------------------------------- files
def record_key(problem_id: str, assignment_key: str) -> str:
    return f"{problem_id}\t{assignment_key}"


def repair_jsonl(path: Path) -> int:
    """Cut a torn last line (no trailing newline or not valid JSON) off ``path``; returns bytes removed.

    Only the last line can be torn (records are appended whole and fsynced); a bad line elsewhere is
    corruption and raises DataError naming the line.
    """
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    lines = data[:keep].split(b"\n")[:-1]
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:  # a complete-looking but torn last line: drop it too
            keep -= len(lines[-1]) + 1
            lines = lines[:-1]
    for i, ln in enumerate(lines):
        try:
            json.loads(ln)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i + 1}: not valid JSON ({e.msg}); only a torn last line is repaired. "
                            "Fix or remove that line.") from None
    removed = len(data) - keep
    if removed:
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return removed


def read_actions(path: str | Path) -> list[dict[str, Any]]:
    """Records of ``DIR/actions.jsonl`` (or a JSONL file); a torn last line is ignored, not repaired."""
    p = Path(path)
    if p.is_dir():
        p = p / ACTIONS
    if not p.exists():
        raise DataError(f"no action-level data at {str(p)!r}; run `haps collect --out DIR` first.")
    out = []
    with open(p, "rb") as f:
        lines = f.read().split(b"\n")
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # torn tail of a run in progress or killed
                break
            raise DataError(f"{p}:{i + 1}: not valid JSON ({e.msg}).") from None
    return out


class JsonlAppender:
    """Append one JSON object per line with flush + fsync (a kill loses at most the line in flight)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, rec: dict[str, Any]) -> None:
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------- plan
def assignments_for(space: AssignmentSpace, problem_id: str, cfg: CollectConfig) -> list[Assignment]:
    """All assignments, or ``cfg.sample`` distinct ones (seeded by seed and problem id) for large spaces."""
    if space.size <= cfg.max_enumerate:
        return space.assignments()
    if cfg.sample is None:
        raise ConfigError(f"the space has {space.size} assignments (K={len(space.models)} models, N="
                          f"{len(space.roles)} roles), more than max_enumerate={cfg.max_enumerate}: pass --sample L "
                          "to run L sampled assignments per problem, or raise --max-enumerate.")
    h = int(hashlib.sha256(f"{cfg.seed}\x00{problem_id}".encode()).hexdigest()[:16], 16)
    idx = sorted(random.Random(h).sample(range(space.size), min(cfg.sample, space.size)))
    return [space.at(i) for i in idx]


@dataclass
class CollectSummary:
    out: Path
    total: int  # (problem, z) pairs planned
    done_before: int  # found already recorded at start-up
    written: int  # recorded by this run
    repaired_bytes: int
    seconds: float

    @property
    def episodes_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def _pool_dump(pool) -> Any:
    cfg = getattr(pool, "config", None)
    if cfg is not None and hasattr(cfg, "model_dump"):
        return cfg.model_dump()
    return {"models": [getattr(m, "name", str(m)) for m in getattr(cfg, "models", [])]}


def _check_manifest(path: Path, want: dict[str, Any]) -> dict[str, Any]:
    """Existing manifest must match ``want`` on config and pool; returns the manifest to write."""
    if not path.exists():
        return dict(want, runs=[])
    have = json.loads(path.read_text())
    diffs = []
    for section in ("config", "pool", "roles"):
        a, b = have.get(section), want.get(section)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    diffs.append(f"{section}.{k}: recorded {a.get(k)!r}, now {b.get(k)!r}")
        else:
            diffs.append(f"{section}: recorded {a!r}, now {b!r}")
    if diffs:
        raise ConfigError(f"{path.parent} holds a collection made with other arguments; resume with the same "
                          "arguments or use another --out. Differences:\n  " + "\n  ".join(diffs))
    return have


def default_sampling(cfg: CollectConfig):
    """The runner's sampling settings for this collection."""
    from haps.workflows.runner import Sampling

    kw: dict[str, Any] = {"temperature": cfg.temperature}
    if cfg.max_new_tokens is not None:
        kw["max_new_tokens"] = cfg.max_new_tokens
    return Sampling(**kw)


def collect(cfg: CollectConfig, out: str | Path, *, problems: Sequence | None = None, pool=None, workflow=None,
            runner: Callable | None = None, sampling: Any = None, progress: bool = True,
            job_factory: Callable | None = None,
            on_record: Callable[[dict[str, Any]], None] | None = None) -> CollectSummary:
    """Collect (or resume collecting) the action-level data of ``cfg`` into ``out``.

    ``problems``, ``pool``, ``workflow``, ``runner`` and ``sampling`` default to the real ones built from
    ``cfg``; tests inject small stand-ins. ``runner(pool, workflow, jobs, sampling=..., log_path=...,
    progress=...)`` must return one EpisodeResult per job, in job order.
    """
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.reward_kind not in ("score", "shaped"):
        raise ConfigError(f"reward_kind {cfg.reward_kind!r} cannot be recorded at collection; use 'score' or "
                          "'shaped' (tradeoff rewards are recomputed from score and cost downstream).")
    if problems is None:
        from haps.data import load_problems

        problems = load_problems(cfg.task, cfg.data, cfg.limit, sample_seed=cfg.problem_seed)
    if pool is None:
        from haps.config import load_pool
        from haps.models.pool import ModelPool

        pool = ModelPool(load_pool(cfg.pool))
    if workflow is None:
        from haps.workflows.base import get_workflow

        workflow = get_workflow(cfg.task, **cfg.workflow_options)
    if runner is None:
        from haps.workflows.runner import run_episodes as runner
    if sampling is None:
        sampling = default_sampling(cfg)
    names = [m.name for m in pool.config.models]
    space = AssignmentSpace.of(workflow.roles, names)

    from haps.data import split_problems
    from haps.metrics import RewardConfig

    reward_cfg = RewardConfig(kind=cfg.reward_kind)
    strat = "subject" if cfg.task == "mmlu" else None
    split_of = {p.id: name for name, ps in split_problems(problems, cfg.split_fractions, cfg.split_seed,
                                                          stratify_by=strat).items() for p in ps}

    manifest_p = out / MANIFEST
    want = {"format": FORMAT, "config": cfg.model_dump(mode="json"), "pool": _pool_dump(pool),
            "roles": list(space.roles), "models": names, "n_problems": len(problems)}
    manifest = _check_manifest(manifest_p, want)
    run_no = len(manifest.get("runs", []))
    manifest["runs"] = manifest.get("runs", []) + [{"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid()}]
    write_json_atomic(manifest_p, manifest)

    actions_p = out / ACTIONS
    repaired = repair_jsonl(actions_p)
    done = {record_key(r["problem_id"], r["key"]) for r in read_actions(actions_p)} if actions_p.exists() else set()
    (out / EPISODES).mkdir(exist_ok=True)

    plan = [(p, z) for p in problems for z in assignments_for(space, p.id, cfg)]
    todo = [(p, z) for p, z in plan if record_key(p.id, space.key(z)) not in done]
    done_before = len(plan) - len(todo)
    # chunks of whole problems, in problem order
    by_problem: dict[str, list[tuple[Any, Assignment]]] = {}
    for p, z in todo:
        by_problem.setdefault(p.id, []).append((p, z))
    groups = list(by_problem.values())
    chunks = [[pz for g in groups[i:i + cfg.chunk_size] for pz in g] for i in range(0, len(groups), cfg.chunk_size)]
    if job_factory is None:
        job_factory = _episode_job

    written = 0
    bar = _progress(progress)
    with bar, JsonlAppender(actions_p) as app:
        task_id = bar.add_task(f"collect {cfg.task}", total=len(plan), completed=done_before)
        for ci, chunk in enumerate(chunks):
            jobs = [job_factory(p, space.to_names(z)) for p, z in chunk]
            log_name = f"{EPISODES}/run{run_no:03d}-chunk{ci:05d}.jsonl"
            results = runner(pool, workflow, jobs, sampling=sampling, log_path=out / log_name, seed=cfg.seed,
                             progress=False)
            if len(results) != len(jobs):
                raise ConfigError(f"runner returned {len(results)} results for {len(jobs)} jobs.")
            lines = _log_lines(out / log_name)
            for (p, z), res in zip(chunk, results, strict=False):
                ptr: dict[str, Any] = {"file": log_name, "id": str(res.id)}
                line = lines.get((str(res.id), space.key(z)))
                if line is not None:
                    ptr["line"] = line
                rec = {
                    "problem_id": p.id, "split": split_of.get(p.id), "key": space.key(z),
                    "assignment": space.to_names(z), "assignment_ids": list(z),
                    "reward": reward_cfg.compute(float(res.score), float(res.cost)),
                    "score": float(res.score), "em": float(getattr(res, "em", 0.0)),
                    "tokens_in": int(res.tokens_in), "tokens_out": int(res.tokens_out), "cost": float(res.cost),
                    "episode_log": ptr,
                }
                app.write(rec)
                written += 1
                if on_record is not None:
                    on_record(rec)
            bar.advance(task_id, len(chunk))
    return CollectSummary(out, len(plan), done_before, written, repaired, time.perf_counter() - t0)


def _log_lines(path: Path) -> dict[tuple[str, str], int]:
    """(episode id, assignment key) -> 1-based line of the runner's episode log (empty if none)."""
    out: dict[tuple[str, str], int] = {}
    if not path.exists():
        return out
    for i, rec in enumerate(read_actions(path), start=1):
        a = rec.get("assignment")
        if isinstance(a, dict):
            out.setdefault((str(rec.get("id")), ",".join(f"{k}={v}" for k, v in a.items())), i)
    return out


def _episode_job(problem, assignment: dict[str, str]):
    from haps.workflows.runner import EpisodeJob

    return EpisodeJob(problem=problem, assignment=assignment, adapters=None)


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), disable=not enabled)


def problem_splits(records: Iterable[dict[str, Any]]) -> dict[str, str]:
    """problem_id -> split as recorded."""
    return {r["problem_id"]: r.get("split") for r in records}


@dataclass
class Collection:
    """An action-level data folder opened for training or evaluation."""

    path: Path
    manifest: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def config(self) -> CollectConfig:
        return CollectConfig.model_validate(self.manifest["config"])

    @property
    def space(self) -> AssignmentSpace:
        return AssignmentSpace.of(self.manifest["roles"], self.manifest["models"])

    def pool_config(self):
        """The pool as recorded (names, prices, descriptions), without loading any model."""
        from haps.config import PoolConfig

        return PoolConfig.model_validate(self.manifest["pool"])

    def workflow(self):
        from haps.workflows.base import get_workflow

        return get_workflow(self.config.task, **self.config.workflow_options)

    def problems(self) -> list:
        """The collection's problems, reloaded from the recorded data path and limit."""
        from haps.data import load_problems

        c = self.config
        return load_problems(c.task, c.data, c.limit, sample_seed=c.problem_seed)

    def split_ids(self, split: str | None) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.records:
            if split is None or r.get("split") == split:
                seen.setdefault(r["problem_id"], None)
        return list(seen)


def open_collection(path: str | Path) -> Collection:
    p = Path(path)
    m = p / MANIFEST
    if not m.exists():
        raise DataError(f"{str(p)!r} has no {MANIFEST}; pass a folder written by `haps collect`.")
    return Collection(p, json.loads(m.read_text()), read_actions(p))
