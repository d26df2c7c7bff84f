"""Action-level data collection (paper App. C, Eq. 8): run every assignment z for every problem p and
record r(p, z).

For each chunk of problems all their pending (problem, z) pairs go to the lockstep runner at once, so
each model gets large batches. Output folder::

    DIR/manifest.json        the arguments, the pool and the workflow options (checked on resume: the
                             fields that change results, `RESULT_FIELDS`, must match)
    DIR/actions.jsonl        one JSON per (problem, z): problem_id, split, assignment, reward, score, ...
    DIR/episodes/*.jsonl     the runner's episode logs; each action points at its file and episode id
    DIR/failures.jsonl       one JSON per failed episode (a model call errored): problem_id, key,
                             attempt, error, the call that failed; such an episode records no action

Resumable: records are appended one line at a time with flush + fsync; at start-up a torn last line
(a kill mid-write) is cut off, done (problem, z) keys are skipped, and a resumed run whose arguments
differ from the manifest's in a field that changes results fails with the differences listed (settings
that only change how the run goes, `RUN_FIELDS`, may differ). Killed at any point and restarted with the
same arguments, the run ends with every (problem, z) recorded exactly once. A run that fails before its
first record removes the folder's files it created.

Failures are never data: an episode that failed (`EpisodeResult.failed`: one of its model calls ended
in an error, e.g. an API endpoint that stayed down through the client's retries) writes no action
record, only a line in ``failures.jsonl``; the next run retries it, until ``max_attempts`` attempts of
that (problem, z) have failed; then it is reported (`CollectSummary.capped`, one line each naming the
problem, the assignment, the last error and what to do) and left unrecorded. Readers of the records
(warm-up, SFT, evaluation) skip any record that is a failure (`failed_record`) and count it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from haps.errors import ConfigError, DataError
from haps.files import JsonlAppender, read_jsonl, repair_jsonl, write_json_atomic
from haps.progress import progress_bar
from haps.routing.space import Assignment, AssignmentSpace

ACTIONS = "actions.jsonl"
FAILURES = "failures.jsonl"
MANIFEST = "manifest.json"
EPISODES = "episodes"
FORMAT = "haps-actions/1"


class CollectConfig(BaseModel):
    """Everything that determines the content of an action-level data folder."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(description="Workflow: a registered name (hotpotqa | mmlu), a plugin, or "
                      "path/to/file.py:ClassName (recorded with an absolute path).")
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
    stratify: bool = Field(default=True, description="Split each group of the workflow's stratify_by (MMLU: "
                           "subject) on its own, as the paper does; false: one split over all problems (small sets "
                           "whose groups hold one problem each would put every problem in train).")
    reward_kind: Literal["score", "shaped"] = Field(default="score", description="Reward recorded at collection: "
                                                   "score | shaped (tradeoff rewards need a cost normaliser and "
                                                   "are recomputed downstream, e.g. haps eval-lookup --reward-kind).")
    chunk_size: int = Field(default=8, ge=1, description="Problems per lockstep runner call (all their "
                            "assignments at once).")
    max_attempts: int = Field(default=3, ge=1, description="Runs that may try a (problem, assignment) whose "
                              "episode fails (a model call errored); after this many failures it is reported and "
                              "left unrecorded (raise it and rerun to try again).")
    share_tree: bool = Field(default=True, description="Run the shared prefixes of a problem's episode tree once: "
                             "under greedy decoding the assignments that agree on the roles called so far send "
                             "identical requests (e.g. the Student's first turn), answered by one row each "
                             "(`haps.workflows.runner`); the records are the same either way.")

    @field_validator("task")
    @classmethod
    def _canonical_task(cls, v: str) -> str:
        from haps.workflows.loader import canonical_spec

        return canonical_spec(v)


#: The CollectConfig fields that change what a collection records, with the reason; a resume compares
#: exactly these with the manifest (every field is in this list or in RUN_FIELDS; a test holds it).
RESULT_FIELDS: dict[str, str] = {
    "task": "the workflow that plays every episode",
    "data": "the problems",
    "limit": "how many problems",
    "problem_seed": "which problems a limit picks",
    "pool": "the models (their specs are compared too, under 'pool')",
    "workflow_options": "how every episode is played (budget, rounds, summaries, ...)",
    "max_new_tokens": "what every generation can say",
    "temperature": "what every generation says",
    "sample": "which assignments are run in large spaces",
    "max_enumerate": "whether assignments are enumerated or sampled",
    "seed": "the sampled assignments and the agents' sampling",
    "split_fractions": "the split recorded with every action",
    "split_seed": "the split recorded with every action",
    "stratify": "the split recorded with every action",
    "reward_kind": "the reward recorded with every action",
}
#: CollectConfig fields that change how a run goes, not what it records (free to change on resume).
RUN_FIELDS: dict[str, str] = {
    "chunk_size": "batching only; a resumed run chunks the remaining problems anew anyway",
    "max_attempts": "how often a failed episode is retried; a recorded episode is the same either way",
    "share_tree": "identical greedy requests answered by one row: the same generations, fewer rows",
}
#: Model-spec / pool fields that change how calls are made, not what they return (not compared on resume).
POOL_RUN_FIELDS: dict[str, str] = {
    "cache_dir": "where converted weights are cached",
    "timeout_s": "API client timeout",
    "max_retries": "API client retries",
    "max_concurrency": "API requests in flight",
    "base_url": "where an API endpoint listens (the model it serves is `source`; e.g. `haps experiment` starts "
                "its closed model's server on a free port each run)",
}


# ------------------------------------------------------------------------------------------- files
def record_key(problem_id: str, assignment_key: str) -> str:
    return f"{problem_id}\t{assignment_key}"


def failed_record(rec: dict[str, Any]) -> bool:
    """Whether an action record stands for a failed episode (``failed: true``, or no reward or score): it
    is never read as a reward. `collect` writes none; older or hand-made files may hold some."""
    return bool(rec.get("failed")) or rec.get("reward") is None or rec.get("score") is None


def read_actions(path: str | Path) -> list[dict[str, Any]]:
    """Records of ``DIR/actions.jsonl`` (or a JSONL file); a torn last line is ignored, not repaired."""
    p = Path(path)
    if p.is_dir():
        p = p / ACTIONS
    if not p.exists():
        raise DataError(f"no action-level data at {str(p)!r}; run `haps collect --out DIR` first.")
    return read_jsonl(p)


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
    failures: list[dict[str, Any]] = field(default_factory=list)  # this run's failed episodes (failures.jsonl)
    capped: list[dict[str, Any]] = field(default_factory=list)  # last failure of each pair out of attempts
    max_attempts: int = 3

    @property
    def failed(self) -> int:
        """Episodes of this run that failed (not recorded)."""
        return len(self.failures)

    @property
    def complete(self) -> bool:
        return self.done_before + self.written == self.total

    @property
    def episodes_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def failure_summary(self) -> str | None:
        """One line on this run's failed episodes (how many, on which model, the first error), or None."""
        if not self.failures:
            return None
        by_model: dict[str, int] = {}
        for f in self.failures:
            m = (f.get("call") or {}).get("model", "?")
            by_model[m] = by_model.get(m, 0) + 1
        models = ", ".join(f"{m}: {n}" for m, n in sorted(by_model.items()))
        retry = len(self.failures) - sum(1 for f in self.failures if f["attempt"] >= self.max_attempts)
        return (f"{len(self.failures)} episode(s) failed and were not recorded ({models}); first error: "
                f"{self.failures[0]['error']}. Logged in {self.out / FAILURES}; {retry} will be retried by the "
                "next run of the same command.")

    def capped_lines(self) -> list[str]:
        """One line per (problem, assignment) that failed ``max_attempts`` times and is left unrecorded."""
        out = []
        for f in self.capped:
            call = f.get("call") or {}
            where = f" ({call.get('role')} on {call.get('model')}, round {call.get('round')})" if call else ""
            out.append(f"problem {f['problem_id']!r}, assignment {f['key']}: failed {f['attempt']} of "
                       f"{self.max_attempts} attempts, no reward recorded; last error{where}: {f['error']}. Fix "
                       f"the cause, then rerun with --max-attempts {f['attempt'] + 1} (or more) to try it again.")
        return out


def _pool_dump(pool) -> Any:
    """The pool as the manifest records it; ``dtype: auto`` as what it resolved to on this machine (a resume
    where it resolves otherwise would record other generations, so it is a change)."""
    cfg = getattr(pool, "config", None)
    if cfg is not None and hasattr(cfg, "model_dump"):
        out = cfg.model_dump()
        for m, spec in zip(out.get("models", []), cfg.models, strict=True):
            m["dtype"] = spec.weights_dtype
        return out
    return {"models": [getattr(m, "name", str(m)) for m in getattr(cfg, "models", [])]}


def _result_view(section: str, value: Any) -> Any:
    """The part of a manifest section that changes results (see RESULT_FIELDS and POOL_RUN_FIELDS)."""
    if section == "config" and isinstance(value, dict):
        # a field added since the manifest was written counts as its default (what that run did)
        defaults = {k: f.get_default(call_default_factory=True) for k, f in CollectConfig.model_fields.items()
                    if k in RESULT_FIELDS and not f.is_required()}
        return {**defaults, **{k: v for k, v in value.items() if k in RESULT_FIELDS}}
    if section == "pool" and isinstance(value, dict):
        out = {k: v for k, v in value.items() if k not in POOL_RUN_FIELDS}
        if isinstance(out.get("models"), list):
            out["models"] = [{k: v for k, v in m.items() if k not in POOL_RUN_FIELDS} if isinstance(m, dict) else m
                             for m in out["models"]]
        return out
    return value


def _check_manifest(path: Path, want: dict[str, Any]) -> dict[str, Any]:
    """An existing manifest must match ``want`` on what changes results; returns the manifest to write."""
    if not path.exists():
        return dict(want, runs=[])
    have = json.loads(path.read_text())
    diffs = []
    for section in ("config", "pool", "roles"):
        a, b = _result_view(section, have.get(section)), _result_view(section, want.get(section))
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
                          "arguments or use another --out. Differences: " + "; ".join(diffs))
    return have


def default_sampling(cfg: CollectConfig):
    """The runner's sampling settings for this collection."""
    from haps.workflows.runner import Sampling

    kw: dict[str, Any] = {"temperature": cfg.temperature}
    if cfg.max_new_tokens is not None:
        kw["max_new_tokens"] = cfg.max_new_tokens
    return Sampling(**kw)


def plan_splits(problems: Sequence, cfg: CollectConfig, stratify_by: str | None, *,
                require_all: bool = False) -> dict[str, str]:
    """problem id -> "train" | "valid" | "test" (`haps.data.split_problems` with the config's fractions
    and seed). ``require_all``: a split with a positive fraction that gets no problem is a DataError
    (too few problems to train, validate and test)."""
    from haps.data import split_problems

    parts = split_problems(problems, cfg.split_fractions, cfg.split_seed, stratify_by=stratify_by)
    if require_all:
        empty = [name for name, frac in zip(("train", "valid", "test"), cfg.split_fractions, strict=True)
                 if frac > 0 and not parts[name]]
        if empty:
            groups = f", each {stratify_by} split on its own" if stratify_by else ""
            raise DataError(f"{len(problems)} problem(s) leave the {'/'.join(empty)} split empty (split_fractions "
                            f"{list(cfg.split_fractions)}{groups}); use more problems (--limit, --data) or give that "
                            "split the fraction 0 (split_fractions in --config).")
    return {p.id: name for name, ps in parts.items() for p in ps}


def collect(cfg: CollectConfig, out: str | Path, *, problems: Sequence | None = None, pool=None, workflow=None,
            runner: Callable | None = None, sampling: Any = None, progress: bool = True,
            job_factory: Callable | None = None, on_record: Callable[[dict[str, Any]], None] | None = None,
            require_splits: bool = False) -> CollectSummary:
    """Collect (or resume collecting) the action-level data of ``cfg`` into ``out``.

    ``problems``, ``pool``, ``workflow``, ``runner`` and ``sampling`` default to the real ones built from
    ``cfg``; tests inject small stand-ins. ``runner(pool, workflow, jobs, sampling=..., log_path=...,
    progress=...)`` must return one EpisodeResult per job, in job order. ``require_splits`` (`haps
    collect`): every split with a positive fraction must get a problem (`plan_splits`), checked before
    anything is written.
    """
    t0 = time.perf_counter()
    out = Path(out)
    problems, workflow, pool, runner, sampling = _defaults(cfg, problems, pool, workflow, runner, sampling)
    names = [m.name for m in pool.config.models]
    space = AssignmentSpace.of(workflow.roles, names)

    from haps.metrics import RewardConfig

    reward_cfg = RewardConfig(kind=cfg.reward_kind)
    split_of = plan_splits(problems, cfg, workflow.stratify_by if cfg.stratify else None, require_all=require_splits)

    created = not out.exists()
    fresh, run_no = _start_run(cfg, out, pool, space, names, len(problems))
    repaired, done, tried = _read_progress(out)
    total, done_before, capped, chunks = _plan_chunks(cfg, problems, space, done, tried)
    if job_factory is None:
        job_factory = _episode_job

    tally = _Tally(capped=capped)
    try:
        _run_chunks(cfg, out, chunks, tally, pool=pool, workflow=workflow, runner=runner, sampling=sampling,
                    job_factory=job_factory, space=space, split_of=split_of, reward_cfg=reward_cfg, tried=tried,
                    run_no=run_no, total=total, done_before=done_before, progress=progress, on_record=on_record)
    except BaseException:
        if fresh and tally.written == 0 and done_before == 0 and not tally.failures:  # nothing collected: leave nothing
            _remove_fresh(out, created)
        raise
    return CollectSummary(out, total, done_before, tally.written, repaired, time.perf_counter() - t0,
                          failures=tally.failures, capped=tally.capped, max_attempts=cfg.max_attempts)


def _defaults(cfg: CollectConfig, problems, pool, workflow, runner, sampling) -> tuple[Any, Any, Any, Any, Any]:
    """(problems, workflow, pool, runner, sampling): each one given, or the real one built from ``cfg``."""
    if problems is None:
        from haps.data import load_problems

        problems = load_problems(cfg.task, cfg.data, cfg.limit, sample_seed=cfg.problem_seed)
    if workflow is None:
        from haps.workflows.loader import get_workflow

        workflow = get_workflow(cfg.task, **cfg.workflow_options)
    if pool is None:
        from haps.config import load_pool
        from haps.models.pool import ModelPool

        pool = ModelPool(load_pool(cfg.pool))
    if runner is None:
        from haps.workflows.runner import run_episodes as runner
    if sampling is None:
        sampling = default_sampling(cfg)
    return problems, workflow, pool, runner, sampling


def _start_run(cfg: CollectConfig, out: Path, pool, space: AssignmentSpace, names: list[str],
               n_problems: int) -> tuple[bool, int]:
    """Create ``out``, check its manifest against ``cfg`` (`_check_manifest`) and add this run to it;
    returns (whether the manifest is new, this run's number)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest_p = out / MANIFEST
    fresh = not manifest_p.exists()
    want = {"format": FORMAT, "config": cfg.model_dump(mode="json"), "pool": _pool_dump(pool),
            "roles": list(space.roles), "models": names, "n_problems": n_problems}
    manifest = _check_manifest(manifest_p, want)
    run_no = len(manifest.get("runs", []))
    run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid()}
    run.update({k: getattr(cfg, k) for k in RUN_FIELDS})
    manifest["runs"] = manifest.get("runs", []) + [run]
    write_json_atomic(manifest_p, manifest)
    (out / EPISODES).mkdir(exist_ok=True)
    return fresh, run_no


def _read_progress(out: Path) -> tuple[int, set[str], dict[str, dict[str, Any]]]:
    """Repair the torn last lines of ``out``'s records and failures; returns (bytes cut off, the record keys
    done, each tried pair's last failure with its attempt number)."""
    actions_p = out / ACTIONS
    repaired = repair_jsonl(actions_p)
    done = ({record_key(r["problem_id"], r["key"]) for r in read_actions(actions_p) if not failed_record(r)}
            if actions_p.exists() else set())
    failures_p = out / FAILURES
    repaired += repair_jsonl(failures_p)
    tried: dict[str, dict[str, Any]] = {}  # pair -> its last failure (with the attempt number)
    for f in read_jsonl(failures_p) if failures_p.exists() else []:
        tried[record_key(f["problem_id"], f["key"])] = f
    return repaired, done, tried


def _plan_chunks(cfg: CollectConfig, problems: Sequence, space: AssignmentSpace, done: set[str],
                 tried: dict[str, dict[str, Any]]) -> tuple[int, int, list[dict[str, Any]], list[list[tuple]]]:
    """(pairs planned, pairs done before, the last failure of each pending pair out of attempts, the chunks
    of (problem, z) left to run: ``cfg.chunk_size`` whole problems each, in problem order)."""
    plan = [(p, z) for p in problems for z in assignments_for(space, p.id, cfg)]
    pending = [(p, z) for p, z in plan if record_key(p.id, space.key(z)) not in done]
    done_before = len(plan) - len(pending)
    capped = [tried[k] for k in (record_key(p.id, space.key(z)) for p, z in pending)
              if k in tried and tried[k]["attempt"] >= cfg.max_attempts]
    out_of_attempts = {record_key(f["problem_id"], f["key"]) for f in capped}
    todo = [(p, z) for p, z in pending if record_key(p.id, space.key(z)) not in out_of_attempts]
    # chunks of whole problems, in problem order
    by_problem: dict[str, list[tuple[Any, Assignment]]] = {}
    for p, z in todo:
        by_problem.setdefault(p.id, []).append((p, z))
    groups = list(by_problem.values())
    chunks = [[pz for g in groups[i:i + cfg.chunk_size] for pz in g] for i in range(0, len(groups), cfg.chunk_size)]
    return len(plan), done_before, capped, chunks


@dataclass
class _Tally:
    """What a collection run has written so far: records, failed episodes, pairs out of attempts."""

    written: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    capped: list[dict[str, Any]] = field(default_factory=list)


def _run_chunks(cfg: CollectConfig, out: Path, chunks: list[list[tuple]], tally: _Tally, *, pool, workflow,
                runner: Callable, sampling: Any, job_factory: Callable, space: AssignmentSpace,
                split_of: dict[str, str], reward_cfg, tried: dict[str, dict[str, Any]], run_no: int, total: int,
                done_before: int, progress: bool, on_record: Callable[[dict[str, Any]], None] | None) -> None:
    """Run each chunk's episodes in one ``runner`` call and append each one's record to ``actions.jsonl``
    (or, failed, its line to ``failures.jsonl``) as it comes; counts go into ``tally``."""
    actions_p, failures_p = out / ACTIONS, out / FAILURES
    with progress_bar(progress) as bar, JsonlAppender(actions_p) as app, JsonlAppender(failures_p) as fail_log:
        task_id = bar.add_task(f"collect {workflow.name}", total=total, completed=done_before)
        for ci, chunk in enumerate(chunks):
            jobs = [job_factory(p, space.to_names(z)) for p, z in chunk]
            log_name = f"{EPISODES}/run{run_no:03d}-chunk{ci:05d}.jsonl"
            results = runner(pool, workflow, jobs, sampling=sampling, log_path=out / log_name, seed=cfg.seed,
                             progress=False, share_calls=cfg.share_tree)
            if len(results) != len(jobs):
                raise ConfigError(f"runner returned {len(results)} results for {len(jobs)} jobs.")
            lines = _log_lines(out / log_name)
            for (p, z), res in zip(chunk, results, strict=False):
                if getattr(res, "failed", False):  # never a reward: logged, retried by the next run
                    key = record_key(p.id, space.key(z))
                    f = _failure(p, z, res, space, split_of, log_name, lines, run_no,
                                 tried.get(key, {}).get("attempt", 0) + 1)
                    fail_log.write(f)
                    tally.failures.append(f)
                    if f["attempt"] >= cfg.max_attempts:
                        tally.capped.append(f)
                    continue
                rec = _record(p, z, res, space, split_of, reward_cfg, log_name, lines)
                app.write(rec)
                tally.written += 1
                if on_record is not None:
                    on_record(rec)
            bar.advance(task_id, len(chunk))


def _pointer(res, z: Assignment, space: AssignmentSpace, log_name: str, lines: dict[tuple[str, str], int]):
    ptr: dict[str, Any] = {"file": log_name, "id": str(res.id)}
    line = lines.get((str(res.id), space.key(z)))
    if line is not None:
        ptr["line"] = line
    return ptr


def _failure(p, z: Assignment, res, space: AssignmentSpace, split_of: dict[str, str], log_name: str,
             lines: dict[tuple[str, str], int], run_no: int, attempt: int) -> dict[str, Any]:
    """The failures.jsonl line of one failed episode (no reward, no score)."""
    return {
        "problem_id": p.id, "split": split_of.get(p.id), "key": space.key(z), "assignment": space.to_names(z),
        "attempt": attempt, "error": str(getattr(res, "error", None) or "the episode failed"),
        "call": getattr(res, "failed_call", None), "run": run_no, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tokens_in": int(res.tokens_in), "tokens_out": int(res.tokens_out), "cost": float(res.cost),
        "episode_log": _pointer(res, z, space, log_name, lines),
    }


def _record(p, z: Assignment, res, space: AssignmentSpace, split_of: dict[str, str], reward_cfg, log_name: str,
            lines: dict[tuple[str, str], int]) -> dict[str, Any]:
    """The actions.jsonl line of one finished episode."""
    ptr = _pointer(res, z, space, log_name, lines)
    return {
        "problem_id": p.id, "split": split_of.get(p.id), "key": space.key(z),
        "assignment": space.to_names(z), "assignment_ids": list(z),
        "reward": reward_cfg.compute(float(res.score), float(res.cost)),
        "score": float(res.score), "em": float(getattr(res, "em", 0.0)),
        "tokens_in": int(res.tokens_in), "tokens_out": int(res.tokens_out), "cost": float(res.cost),
        "episode_log": ptr,
    }


def _remove_fresh(out: Path, created: bool) -> None:
    """Undo a fresh collection that recorded nothing: its manifest, episode logs and the folder itself."""
    (out / MANIFEST).unlink(missing_ok=True)
    (out / ACTIONS).unlink(missing_ok=True)
    shutil.rmtree(out / EPISODES, ignore_errors=True)
    if created:
        try:
            out.rmdir()  # only when empty
        except OSError:
            pass


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


def problem_splits(records: Iterable[dict[str, Any]]) -> dict[str, str]:
    """problem_id -> split as recorded."""
    return {r["problem_id"]: r.get("split") for r in records}


@dataclass
class Collection:
    """An action-level data folder opened for training or evaluation. ``workflow_spec`` overrides the
    recorded workflow (e.g. a ``file.py:Class`` that has moved since collection)."""

    path: Path
    manifest: dict[str, Any]
    records: list[dict[str, Any]]
    workflow_spec: str | None = None

    @property
    def config(self) -> CollectConfig:
        return CollectConfig.model_validate(self.manifest["config"])

    @property
    def task(self) -> str:
        """The workflow spec the problems and prompts are rebuilt with."""
        return self.workflow_spec or self.config.task

    @property
    def space(self) -> AssignmentSpace:
        return AssignmentSpace.of(self.manifest["roles"], self.manifest["models"])

    def pool_config(self):
        """The pool as recorded (names, prices, descriptions), without loading any model."""
        from haps.config import PoolConfig

        return PoolConfig.model_validate(self.manifest["pool"])

    def workflow(self):
        from haps.workflows.loader import get_workflow

        return get_workflow(self.task, **self.config.workflow_options)

    def problems(self) -> list:
        """The collection's problems, reloaded from the recorded data path and limit."""
        from haps.data import load_problems

        c = self.config
        return load_problems(self.task, c.data, c.limit, sample_seed=c.problem_seed)

    def split_ids(self, split: str | None) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.records:
            if split is None or r.get("split") == split:
                seen.setdefault(r["problem_id"], None)
        return list(seen)


def open_collection(path: str | Path, workflow: str | None = None) -> Collection:
    """The folder written by `collect`; ``workflow`` (a spec) overrides the recorded workflow."""
    from haps.workflows.loader import canonical_spec

    p = Path(path)
    m = p / MANIFEST
    if not m.exists():
        raise DataError(f"{str(p)!r} has no {MANIFEST}; pass a folder written by `haps collect`.")
    return Collection(p, json.loads(m.read_text()), read_actions(p),
                      workflow_spec=canonical_spec(workflow) if workflow else None)
