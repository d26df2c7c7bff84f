"""Outcomes of the test problems: r(p, z), score and cost per (problem, assignment), and one method's rows.

`Outcomes` holds (P, A) tensors for the P test problems and the A assignments (product order) with a
status per cell: ``MISSING`` (neither collected nor played), ``OK`` (scored) or ``FAILED`` (the episode
failed: its record has ``failed: true`` or no reward / score, or the collection logged it only in
``failures.jsonl``, or it failed when played here). Cells come from the action table
(``LOOKUP``: exact under greedy decoding, the episode would replay identically) or from episodes played
for this evaluation (``EPISODES``). Rewards are always recomputed from score and cost with the
evaluation's reward (`Rewarder`), so a lookup and a played episode of the same (p, z) agree.

A method is evaluated as a policy pi (P, A) (one-hot for a decision, a distribution for `random`)::

    problem i is  missing  if pi_i puts mass on a MISSING cell
                  failed   else if it puts mass on a FAILED cell       (never scored; counted)
                  ok       else: score_i = sum_z pi_i(z) score(i, z)   (likewise reward, cost)

Failed problems are never scored: every mean, interval and paired difference is over the ``ok`` ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from haps.routing.space import AssignmentSpace

MISSING, OK, FAILED = 0, 1, 2
NO_SOURCE, LOOKUP, EPISODES = 0, 1, 2
SOURCE_NAMES = {LOOKUP: "lookup", EPISODES: "episodes"}


def is_failed(record: Mapping[str, Any]) -> bool:
    """A record that must not be scored: ``failed: true``, or no reward or score (`haps.train.collect.failed_record`)."""
    from haps.train.collect import failed_record

    return failed_record(dict(record))


class Rewarder:
    """The evaluation's reward of one episode: ``RewardConfig.compute(score, cost, normaliser)``; the
    cost normaliser is fitted on the train split (paper Eq. 13) and also gives each episode's
    normalised cost."""

    def __init__(self, reward, normalizer) -> None:
        self.reward = reward  # haps.metrics.RewardConfig
        self.normalizer = normalizer  # haps.metrics.CostNormalizer

    def __call__(self, score: float, cost: float) -> float:
        return float(self.reward.compute(float(score), float(cost), self.normalizer))

    def cost_norm(self, cost: float) -> float:
        return float(self.normalizer.transform(float(cost)))

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.reward.kind}
        if self.reward.kind == "tradeoff":
            d.update(alpha=self.reward.alpha, beta=self.reward.beta)
        d["cost_normalizer"] = self.normalizer.to_dict()
        return d


@dataclass
class Outcomes:
    """(P, A) score / reward / cost / normalised cost of the test problems, with a status and source per cell."""

    space: AssignmentSpace
    problem_ids: list[str]
    score: torch.Tensor
    reward: torch.Tensor
    cost: torch.Tensor
    cost_norm: torch.Tensor
    status: torch.Tensor  # (P, A) int8: MISSING / OK / FAILED
    source: torch.Tensor  # (P, A) int8: NO_SOURCE / LOOKUP / EPISODES

    @classmethod
    def empty(cls, space: AssignmentSpace, problem_ids: Sequence[str]) -> Outcomes:
        shape = (len(problem_ids), space.size)
        nan = {k: torch.full(shape, math.nan, dtype=torch.float64) for k in ("score", "reward", "cost", "cost_norm")}
        return cls(space, list(problem_ids), **nan, status=torch.zeros(shape, dtype=torch.int8),
                   source=torch.zeros(shape, dtype=torch.int8))

    @property
    def row(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.problem_ids)}

    def set(self, i: int, j: int, *, score: float | None, cost: float | None, failed: bool, source: int,
            rewarder: Rewarder) -> None:
        """Fill cell (i, j) with one episode's outcome (a failed one keeps only its status and source)."""
        self.source[i, j] = source
        if failed or score is None or cost is None:
            self.status[i, j] = FAILED
            for t in (self.score, self.reward, self.cost, self.cost_norm):
                t[i, j] = math.nan
            return
        self.status[i, j] = OK
        self.score[i, j] = float(score)
        self.cost[i, j] = float(cost)
        self.reward[i, j] = rewarder(score, cost)
        self.cost_norm[i, j] = rewarder.cost_norm(cost)

    def add_records(self, records: Iterable[Mapping[str, Any]], rewarder: Rewarder) -> int:
        """Look up the action-table records of these problems; returns how many cells were filled."""
        row = self.row
        n = 0
        for r in records:
            i = row.get(str(r["problem_id"]))
            if i is None:
                continue
            j = self.space.index(self.space.from_names(r["assignment"]))
            self.set(i, j, score=r.get("score"), cost=r.get("cost"), failed=is_failed(r), source=LOOKUP,
                     rewarder=rewarder)
            n += 1
        return n

    def add_failures(self, failures: Iterable[Mapping[str, Any]]) -> int:
        """Mark as FAILED (looked up) the cells of these problems that only failed at collection
        (``failures.jsonl`` lines; a cell with a record keeps it); returns how many were marked."""
        row = self.row
        n = 0
        for f in failures:
            i = row.get(str(f.get("problem_id")))
            if i is None or not isinstance(f.get("assignment"), Mapping):
                continue
            j = self.space.index(self.space.from_names(f["assignment"]))
            if int(self.status[i, j]) == MISSING:
                self.status[i, j] = FAILED
                self.source[i, j] = LOOKUP
                n += 1
        return n

    def missing_cells(self, pi: torch.Tensor) -> list[tuple[int, int]]:
        """Cells (i, j) where ``pi`` (P, A) puts mass and nothing is known yet."""
        need = (pi > 0) & (self.status == MISSING)
        return [(int(i), int(j)) for i, j in need.nonzero().tolist()]

    # ------------------------------------------------------------------ policies read from the table
    def oracle(self) -> torch.Tensor:
        """(P, A) one-hot on the best scored z of each problem by reward (ties -> lowest index); a problem
        with no scored cell gets its first failed cell (so it counts as failed, not missing)."""
        r = torch.where(self.status == OK, self.reward, torch.full_like(self.reward, -math.inf))
        idx = r.argmax(1)
        none = ~(self.status == OK).any(1)
        if none.any():
            fallback = (self.status == FAILED).double().argmax(1)
            idx = torch.where(none, fallback, idx)
        return torch.nn.functional.one_hot(idx, self.space.size).double()

    def random(self) -> torch.Tensor:
        """(P, A) uniform over the scored cells of each problem (its expected value); a problem with none:
        uniform over every cell (failed or missing)."""
        ok = (self.status == OK).double()
        none = ok.sum(1, keepdim=True) == 0
        ok = torch.where(none, torch.ones_like(ok), ok)
        return ok / ok.sum(1, keepdim=True)

    def fixed(self, j: int) -> torch.Tensor:
        pi = torch.zeros(len(self.problem_ids), self.space.size, dtype=torch.float64)
        pi[:, j] = 1.0
        return pi

    def one_hot(self, idx: Sequence[int] | torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return torch.nn.functional.one_hot(idx, self.space.size).double()

    def evaluate(self, name: str, pi: torch.Tensor) -> MethodRows:
        """The per-problem rows of policy ``pi`` (see the module docstring)."""
        pi = pi.double()
        support = pi > 0
        missing = (support & (self.status == MISSING)).any(1)
        failed = (support & (self.status == FAILED)).any(1) & ~missing
        ok = ~missing & ~failed
        rows = MethodRows.empty(name, self.problem_ids, self.space.size)
        for key in ("score", "reward", "cost", "cost_norm"):
            v = (pi * torch.nan_to_num(getattr(self, key), nan=0.0)).sum(1)
            getattr(rows, key)[ok] = v[ok]
        one_hot = (support.sum(1) == 1)
        choice = pi.argmax(1)
        for i in range(len(self.problem_ids)):
            rows.status[i] = "missing" if missing[i] else "failed" if failed[i] else "ok"
            rows.choice[i] = int(choice[i]) if one_hot[i] else None
            srcs = {SOURCE_NAMES[int(s)] for s in self.source[i][support[i]].tolist() if int(s) in SOURCE_NAMES}
            rows.source[i] = "+".join(sorted(srcs)) if srcs else None
        rows.pi = pi
        rows.best = self._best_mask()
        return rows

    def _best_mask(self) -> torch.Tensor:
        r = torch.where(self.status == OK, self.reward, torch.full_like(self.reward, -math.inf))
        return (r == r.max(1, keepdim=True).values) & (self.status == OK)


@dataclass
class MethodRows:
    """One method's results on the P test problems (NaN where the problem was not scored)."""

    name: str
    problem_ids: list[str]
    score: torch.Tensor
    reward: torch.Tensor
    cost: torch.Tensor
    cost_norm: torch.Tensor
    status: list[str]  # "ok" | "failed" | "missing"
    choice: list[int | None]  # assignment index, None for a distribution (random)
    source: list[str | None]  # "lookup" | "episodes" | "episodes+lookup"
    pi: torch.Tensor | None = None  # (P, A) the policy, when the method is one
    best: torch.Tensor | None = None  # (P, A) reward-optimal cells of the table (policies only)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def empty(cls, name: str, problem_ids: Sequence[str], n_assignments: int) -> MethodRows:
        p = len(problem_ids)
        nan = {k: torch.full((p,), math.nan, dtype=torch.float64) for k in ("score", "reward", "cost", "cost_norm")}
        return cls(name, list(problem_ids), **nan, status=["missing"] * p, choice=[None] * p, source=[None] * p,
                   extra={"n_assignments": n_assignments})

    @property
    def ok(self) -> torch.Tensor:
        return torch.tensor([s == "ok" for s in self.status], dtype=torch.bool)

    def count(self, status: str) -> int:
        return sum(1 for s in self.status if s == status)

    def selection(self, n_assignments: int) -> torch.Tensor:
        """(A,) mean of the method's choice distribution over the problems where it chose (scored or not)."""
        if self.pi is not None:
            return self.pi.mean(0)
        sel = torch.zeros(n_assignments, dtype=torch.float64)
        chosen = [c for c in self.choice if c is not None]
        for c in chosen:
            sel[c] += 1
        return sel / max(len(chosen), 1)

    def sources(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.source:
            if s is not None:
                for part in s.split("+"):
                    out[part] = out.get(part, 0) + 1
        return out
