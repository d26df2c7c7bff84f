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

Shared calls (``share_calls``, the episode tree of a collection): under greedy decoding a call is a
function of its request, so episodes that send the same request to the same model in one step get the
same generation. That happens whenever the assignments of a problem agree on the roles called so far:
the Student's first turn of (T=a, S=c) and (T=b, S=c) is one call. Such requests run once, as one row,
and every episode that sent it gets its own copy of the generation (token counts and cost included,
so each episode's record is what it would be alone)::

    rows = unique requests of the bucket (same model; greedy; no adapter; equal fields but the tag)
    gens = pool.generate(model, rows)
    each episode's request -> a copy of its row's generation

Sampled calls (temperature > 0) and rows with adapters are never shared.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from haps.errors import ConfigError
from haps.files import JsonlAppender
from haps.models.types import Generation, GenRequest, RowAdapter
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
    rows: int = 0  # rows the models generated (requests sent, less those shared)
    shared_rows: int = 0  # requests answered by another episode's identical row (``share_calls``)

    @property
    def episodes_per_s(self) -> float:
        return self.episodes / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_out / self.wall_s if self.wall_s > 0 else 0.0


def _episode_price(pool, job: EpisodeJob) -> float | None:
    """USD per 1M tokens of the job's whole episode when the pool prices by composition, else None."""
    cfg = getattr(pool, "config", None)
    return cfg.episode_price(job.assignment.values()) if getattr(cfg, "composition_prices", None) else None


def _check_jobs(pool, workflow: Workflow, jobs: Sequence[EpisodeJob]) -> None:
    names = set(pool.names)
    for job in jobs:
        _episode_price(pool, job)  # a composition without a price: an error before any call
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
                 stats: RunStats | None = None, share_calls: bool = False) -> list[EpisodeResult]:
    """Run every job's episode in lockstep (see the module docstring); results in job order.

    ``record_logprobs`` keeps each turn's generated token ids, log-probs, prompt ids and (rows with adapters)
    the hidden states entering the first adapted layer in memory (for RL); they are never written to the log. ``seed`` makes sampled runs repeatable
    (call i of the run uses seed + i). ``stats``, if given, is filled with the run's totals. ``share_calls``:
    identical greedy requests of one step run once (see the module docstring); results are the same.
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
                _start_waiting(pool, workflow, jobs, queue, live, max_live)
                for model, items in _pending_calls(workflow, jobs, live, sampling, record_logprobs).items():
                    items = [it for it in items if it[0] not in failures]  # failed this step: no more calls
                    if not items:
                        continue
                    gens = _generate(pool, model, [r for _, _, r in items],
                                     None if seed is None else seed + n_calls, share_calls, stats)
                    n_calls += 1
                    _advance(pool, workflow, items, gens, live, failures, record_logprobs, stats)
                _finish_done(pool, workflow, jobs, live, failures, results, log, stats,
                             lambda: _show_rate(bar, task, stats, t0))
    finally:
        if log is not None:
            log.close()
        stats.wall_s = time.perf_counter() - t0
        stats.calls = n_calls
    return results  # type: ignore[return-value]


def _start_waiting(pool, workflow: Workflow, jobs: Sequence[EpisodeJob], queue: deque[int],
                   live: dict[int, EpisodeState], max_live: int | None) -> None:
    """Start waiting jobs (indices popped from ``queue``) into ``live`` until ``max_live`` episodes run."""
    while queue and (max_live is None or len(live) < max_live):
        i = queue.popleft()
        job = jobs[i]
        styles = {r: "completion" if pool.spec(job.assignment[r]).completion_style else "chat"
                  for r in workflow.roles}
        live[i] = workflow.start(job.problem, styles)


def _pending_calls(workflow: Workflow, jobs: Sequence[EpisodeJob], live: dict[int, EpisodeState],
                   sampling: Sampling, record_logprobs: bool) -> dict[str, list[tuple[int, str, GenRequest]]]:
    """The pending calls of every live episode as model -> [(job index, role, request with the run's sampling,
    the role's adapter and token cap)], in episode order."""
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
    return buckets


def _generate(pool, model: str, reqs: list[GenRequest], seed: int | None, share_calls: bool,
              stats: RunStats) -> list[Generation]:
    """One ``pool.generate`` call on ``model`` for ``reqs`` (identical greedy ones sharing a row with
    ``share_calls``); returns one generation per request and counts the rows in ``stats``."""
    rows, row_of = share_rows(reqs) if share_calls else (reqs, list(range(len(reqs))))
    out = pool.generate(model, rows, seed=seed)
    gens = [out[k] if first else _copy(out[k]) for k, first in _firsts(row_of)]
    stats.rows += len(rows)
    stats.shared_rows += len(reqs) - len(rows)
    return gens


def _advance(pool, workflow: Workflow, items: list[tuple[int, str, GenRequest]], gens: list[Generation],
             live: dict[int, EpisodeState], failures: dict[int, Turn], record_logprobs: bool,
             stats: RunStats) -> None:
    """Feed each (job index, role, request) its generation: advance its episode, or end it at a failed call
    (recorded in ``failures``); tags the new turns with the adapter's norm and counts tokens in ``stats``."""
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


def _finish_done(pool, workflow: Workflow, jobs: Sequence[EpisodeJob], live: dict[int, EpisodeState],
                 failures: dict[int, Turn], results: list[EpisodeResult | None], log: JsonlAppender | None,
                 stats: RunStats, counted: Callable[[], None]) -> None:
    """Take the episodes that are done (or failed, or have no pending call) out of ``live``: store each
    result in ``results``, log it, count it in ``stats``, then call ``counted()``."""
    for i in [i for i, s in live.items() if i in failures or workflow.done(s) or not workflow.pending(s)]:
        state = live.pop(i)
        res = episode_result(workflow, jobs[i], state, failures.pop(i, None), _episode_price(pool, jobs[i]))
        results[i] = res
        if log is not None:
            log.write(res.to_dict())
        stats.episodes += 1
        stats.failed += res.failed
        stats.turns += len(res.turns)
        stats.parse_failures += res.parse_failures
        stats.cost += res.cost
        counted()


def _show_rate(bar, task, stats: RunStats, t0: float) -> None:
    """Update the progress bar ``task`` with the episodes done and the rates since ``t0``."""
    elapsed = max(time.perf_counter() - t0, 1e-9)
    bar.update(task, completed=stats.episodes,
               info=f"{stats.episodes / elapsed:.2f} ep/s  {stats.tokens_out / elapsed:.0f} tok/s")


def _share_key(req: GenRequest) -> tuple | None:
    """What a greedy request's generation depends on (everything but the free-text tag); None: never shared
    (sampled, or carrying an adapter)."""
    if req.temperature > 0 or req.adapter is not None:
        return None
    msgs = None if req.messages is None else tuple(tuple(sorted(m.items())) for m in req.messages)
    return (msgs, req.prompt, req.max_new_tokens, req.top_p, tuple(req.stop), req.response_prefix, req.logprobs,
            req.truncation, req.keep_states)


def share_rows(requests: Sequence[GenRequest]) -> tuple[list[GenRequest], list[int]]:
    """(the distinct rows to generate, the row answering each request): identical greedy requests share one
    row (`_share_key`); the others get a row each. Rows keep the order of their first request."""
    rows: list[GenRequest] = []
    row_of: list[int] = []
    seen: dict[tuple, int] = {}
    for req in requests:
        key = _share_key(req)
        if key is not None and key in seen:
            row_of.append(seen[key])
            continue
        if key is not None:
            seen[key] = len(rows)
        row_of.append(len(rows))
        rows.append(req)
    return rows, row_of


def _firsts(row_of: Sequence[int]) -> list[tuple[int, bool]]:
    """(row, whether this is the row's first request) for each request."""
    used: set[int] = set()
    out = []
    for k in row_of:
        out.append((k, k not in used))
        used.add(k)
    return out


def _copy(gen: Generation) -> Generation:
    """Another episode's copy of a shared row's generation (its own lists; tensors are read-only)."""
    return replace(gen, token_ids=list(gen.token_ids), logprobs=list(gen.logprobs), prompt_ids=list(gen.prompt_ids))


def _norm(adapter: RowAdapter, pool) -> float:
    """||alpha A B||_F of an adapter under the pool's LoRA target (its scale alpha)."""
    return adapter.update_norm(pool.config.lora.alpha)


def episode_result(workflow: Workflow, job: EpisodeJob, state: EpisodeState, failure: Turn | None = None,
            price: float | None = None) -> EpisodeResult:
    """The episode's result; ``price`` (USD per 1M tokens, a pool's `composition_prices`) reprices every turn."""
    problem = job.problem
    turns = state.turns
    if price is not None:
        for t in turns:
            t.cost = (t.tokens_in + t.tokens_out) * price / 1e6
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
