"""Lockstep episode runner: many episodes advance together, one batched call per model per step.

Semantics::

    live = first max_live episodes (all by default), each started by workflow.start
    while live:
        calls = [(episode, call) for episode in live for call in workflow.pending(episode)]
        for model, bucket in group_by(calls, key=assignment[episode][call.role]):   # paper, App. E.2
            gens = pool.generate(model, [call.request + sampling + adapter of its role])
            for (episode, call), gen in zip(bucket, gens):
                if gen.finish_reason == "error":             # a failed call is a failed episode:
                    workflow.fail(episode, call.role, gen)   # its turn records the error; no more calls
                else:
                    workflow.advance(episode, call.role, gen)
        for episode in live if workflow.done(episode):
            score it (a failed one: failed=True, score None), append its JSONL line (flush + fsync),
            replace it by the next waiting episode

A failed call (`generation_failed`: ``finish_reason == "error"``, an API call that failed after its
retries) ends its episode there, for every workflow: the rule lives here, not in the workflows. The
episode's other calls of that step are dropped (not sent, or their results not used).

``max_live=1`` runs the same episodes one at a time (the reference the benchmark compares to).
With greedy decoding both give the same predictions, up to float rounding in batched kernels.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from haps.errors import ConfigError
from haps.files import JsonlAppender
from haps.models.types import GenRequest, RowAdapter
from haps.progress import progress_bar
from haps.workflows.base import EpisodeResult, EpisodeState, Turn, Workflow, generation_failed


class Sampling(BaseModel):
    """Decoding settings for every call of an episode."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=0.0, ge=0, description="0 = greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(default=256, ge=1, description="Per call (paper prompts ask for <= 256 tokens).")


@dataclass
class EpisodeJob:
    """One episode to run: a problem, a model per role, and optionally a LoRA adapter per role."""

    problem: Any
    assignment: dict[str, str]
    adapters: dict[str, RowAdapter | None] | None = None


@dataclass
class RunStats:
    """Totals of one `run_episodes` call (also returned by `summarize`)."""

    episodes: int = 0
    turns: int = 0
    parse_failures: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    wall_s: float = 0.0
    calls: int = 0  # pool.generate calls (batches)
    failed: int = 0  # episodes that ended at a failed call (counted in ``episodes`` too)

    @property
    def episodes_per_s(self) -> float:
        return self.episodes / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_out / self.wall_s if self.wall_s > 0 else 0.0


def _check_jobs(pool, workflow: Workflow, jobs: Sequence[EpisodeJob]) -> None:
    names = set(pool.names)
    for n, job in enumerate(jobs):
        missing = [r for r in workflow.roles if r not in job.assignment]
        if missing:
            raise ConfigError(f"job {n} ({getattr(job.problem, 'id', '?')}): no model for role(s) {missing}; "
                              f"give one per role of {workflow.name!r}: {list(workflow.roles)}.")
        for role, model in job.assignment.items():
            if role not in workflow.roles:
                raise ConfigError(f"job {n}: unknown role {role!r}; roles of {workflow.name!r}: {list(workflow.roles)}.")
            if model not in names:
                raise ConfigError(f"job {n}: role {role!r} is assigned {model!r}, which is not in the pool "
                                  f"({sorted(names)}).")
            adapter = (job.adapters or {}).get(role)
            if adapter is not None and not pool.spec(model).open_weights:
                raise ConfigError(f"job {n}: role {role!r} runs on closed model {model!r}, which takes no "
                                  "adapter; pass None for it.")


def run_episodes(pool, workflow: Workflow, jobs: Sequence[EpisodeJob], *,
                 sampling: Sampling | dict[str, Any] | None = None,
                 record_logprobs: bool = False, log_path: str | os.PathLike | None = None,
                 seed: int | None = None, progress: bool = True, max_live: int | None = None,
                 stats: RunStats | None = None) -> list[EpisodeResult]:
    """Run every job's episode in lockstep (see the module docstring); results in job order.

    ``record_logprobs`` keeps each turn's generated token ids, log-probs, prompt ids and (rows with adapters)
    the hidden states entering the first adapted layer in memory (for RL); they are never written to the log. ``seed`` makes sampled runs repeatable
    (call i of the run uses seed + i). ``stats``, if given, is filled with the run's totals.
    """
    sampling = Sampling.model_validate(sampling) if isinstance(sampling, dict) else (sampling or Sampling())
    if max_live is not None and max_live < 1:
        raise ConfigError(f"max_live must be >= 1 (or None for all at once), got {max_live}.")
    _check_jobs(pool, workflow, jobs)
    stats = stats if stats is not None else RunStats()
    results: list[EpisodeResult | None] = [None] * len(jobs)
    queue = deque(range(len(jobs)))
    live: dict[int, EpisodeState] = {}
    failures: dict[int, Turn] = {}  # live episode -> the turn of its failed call
    log = JsonlAppender(log_path) if log_path is not None else None  # created on the first episode
    t0 = time.perf_counter()
    n_calls = 0
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task(f"{workflow.name} episodes", total=len(jobs))
            while queue or live:
                while queue and (max_live is None or len(live) < max_live):
                    i = queue.popleft()
                    job = jobs[i]
                    styles = {r: "completion" if pool.spec(job.assignment[r]).completion_style else "chat"
                              for r in workflow.roles}
                    live[i] = workflow.start(job.problem, styles)
                # gather the pending calls of every live episode, bucketed by model
                buckets: dict[str, list[tuple[int, str, GenRequest]]] = {}
                for i, state in live.items():
                    for call in workflow.pending(state):
                        model = jobs[i].assignment[call.role]
                        adapter = (jobs[i].adapters or {}).get(call.role)
                        cap = sampling.max_new_tokens
                        if call.max_new_tokens is not None:
                            cap = min(cap, call.max_new_tokens)
                        req = replace(call.request, max_new_tokens=cap, temperature=sampling.temperature,
                                      top_p=sampling.top_p, adapter=adapter, logprobs=record_logprobs,
                                      keep_states=record_logprobs)
                        buckets.setdefault(model, []).append((i, call.role, req))
                for model, items in buckets.items():
                    items = [it for it in items if it[0] not in failures]  # failed this step: no more calls
                    if not items:
                        continue
                    gens = pool.generate(model, [r for _, _, r in items],
                                         seed=None if seed is None else seed + n_calls)
                    n_calls += 1
                    for (i, role, req), gen in zip(items, gens, strict=True):
                        if i in failures:  # an earlier call of this episode in the same batch failed
                            continue
                        before = len(live[i].turns)
                        if generation_failed(gen):
                            failures[i] = workflow.fail(live[i], role, gen)
                        else:
                            workflow.advance(live[i], role, gen)
                        norm = None if req.adapter is None else _norm(req.adapter, pool)
                        for turn in live[i].turns[before:]:
                            turn.adapter_norm = norm
                            if not record_logprobs:
                                turn.drop_rl()
                        stats.tokens_in += gen.prompt_tokens
                        stats.tokens_out += gen.completion_tokens
                for i in [i for i, s in live.items() if i in failures or workflow.done(s) or not workflow.pending(s)]:
                    state = live.pop(i)
                    res = _result(workflow, jobs[i], state, failures.pop(i, None))
                    results[i] = res
                    if log is not None:
                        log.write(res.to_dict())
                    stats.episodes += 1
                    stats.failed += res.failed
                    stats.turns += len(res.turns)
                    stats.parse_failures += res.parse_failures
                    stats.cost += res.cost
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    bar.update(task, completed=stats.episodes,
                               info=f"{stats.episodes / elapsed:.2f} ep/s  {stats.tokens_out / elapsed:.0f} tok/s")
    finally:
        if log is not None:
            log.close()
        stats.wall_s = time.perf_counter() - t0
        stats.calls = n_calls
    return results  # type: ignore[return-value]


def _norm(adapter: RowAdapter, pool) -> float:
    """||alpha A B||_F of an adapter under the pool's LoRA target (its scale alpha)."""
    return adapter.update_norm(pool.config.lora.alpha)


def _result(workflow: Workflow, job: EpisodeJob, state: EpisodeState, failure: Turn | None = None) -> EpisodeResult:
    problem = job.problem
    turns = state.turns
    spent = dict(tokens_in=sum(t.tokens_in for t in turns), tokens_out=sum(t.tokens_out for t in turns),
                 cost=sum(t.cost for t in turns))
    if failure is not None:  # no prediction, no score: a failure is never data
        call = {"role": failure.role, "model": job.assignment.get(failure.role, failure.model),
                "round": failure.round, "kind": failure.kind}
        return EpisodeResult(
            id=str(problem.id), task=workflow.name, assignment=dict(job.assignment), turns=turns, prediction=None,
            gold=workflow.gold(problem), score=None, em=None, failed=True, error=failure.error, failed_call=call,
            **spent)
    pred = workflow.result(state)
    score, em = workflow.score(problem, pred)
    return EpisodeResult(
        id=str(problem.id), task=workflow.name, assignment=dict(job.assignment), turns=turns, prediction=pred,
        gold=workflow.gold(problem), score=score, em=em, **spent,
    )


def summarize(results: Sequence[EpisodeResult], wall_s: float = 0.0) -> dict[str, Any]:
    """Mean score / EM over the episodes that did not fail (None when all failed), failures (how many,
    per model of the failed call, the first error), parse-failure rate (per turn), token and cost
    totals, rates."""
    n = len(results)
    ok = [r for r in results if not r.failed]
    failed = [r for r in results if r.failed]
    by_model: dict[str, int] = {}
    for r in failed:
        model = (r.failed_call or {}).get("model", "?")
        by_model[model] = by_model.get(model, 0) + 1
    turns = sum(len(r.turns) for r in results)
    fails = sum(r.parse_failures for r in results)
    tok_in = sum(r.tokens_in for r in results)
    tok_out = sum(r.tokens_out for r in results)
    return {
        "episodes": n,
        "score": sum(r.score for r in ok) / len(ok) if ok else (None if failed else 0.0),
        "em": sum(r.em for r in ok) / len(ok) if ok else (None if failed else 0.0),
        "failed": len(failed),
        "failed_by_model": by_model,
        "first_error": failed[0].error if failed else None,
        "turns": turns,
        "parse_failure_rate": fails / turns if turns else 0.0,
        "null_predictions": sum(1 for r in ok if not r.prediction),
        "tokens_in": tok_in,
        "tokens_out": tok_out,
        "cost": sum(r.cost for r in results),
        "wall_s": wall_s,
        "episodes_per_s": n / wall_s if wall_s > 0 else 0.0,
        "tokens_per_s": tok_out / wall_s if wall_s > 0 else 0.0,
    }
