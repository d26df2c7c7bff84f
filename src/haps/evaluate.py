"""Evaluation by lookup on action-level data: a policy's reward is read from r(p, z), not re-run.

Every policy is a distribution ``pi(z | p)`` over the assignments of each problem (one-hot for a
decision, uniform for `random`), so

    mean reward = mean_p sum_z pi(z | p) r(p, z)      (likewise score and cost)
    selection   = mean_p pi(. | p)
    best rate   = mean_p sum_z pi(z | p) [r(p, z) == max_z' r(p, z')]   (share of oracle-optimal picks)

Policies: `oracle` (best z per problem; ties -> first), each fixed z, `random` (expected value), and any
router (its decision, and its expected value under P(z|p) when it has one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from haps.errors import ConfigError, DataError
from haps.routing.space import AssignmentSpace


def recompute_rewards(records: list[dict[str, Any]], reward) -> list[dict[str, Any]]:
    """Copies of ``records`` with ``reward`` recomputed under a `haps.metrics.RewardConfig` (a tradeoff
    reward's cost normaliser is fitted on the train split's costs, as in the paper). Failed records
    (`haps.train.collect.failed_record`) are copied as they are: they get no reward and fit nothing."""
    from haps.metrics import CostNormalizer
    from haps.train.collect import failed_record

    ok = [r for r in records if not failed_record(r)]
    norm = None
    if reward.kind == "tradeoff" and ok:
        train = [r["cost"] for r in ok if r.get("split") == "train"] or [r["cost"] for r in ok]
        norm = CostNormalizer.fit(train)
    return [dict(r) if failed_record(r) else dict(r, reward=reward.compute(r["score"], r["cost"], norm))
            for r in records]


@dataclass
class ActionTable:
    """r(p, z), score and cost as (P, A) tensors; NaN where (p, z) was not collected.

    Failed records (`haps.train.collect.failed_record`: a failed episode, no reward) are never read:
    ``failed_records`` counts them and ``failed`` (P, A) marks the cells that have only a failed record
    (NaN like an uncollected cell; `evaluate` counts a policy's picks of them as ``failed``)."""

    space: AssignmentSpace
    problem_ids: list[str]
    reward: torch.Tensor
    score: torch.Tensor
    cost: torch.Tensor
    failed: torch.Tensor | None = None  # (P, A) bool
    failed_records: int = 0

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]], space: AssignmentSpace,
                     split: str | None = None) -> ActionTable:
        records = list(records)
        recs = [r for r in records if split is None or r.get("split") == split]
        if not recs:
            have = sorted({str(r.get("split")) for r in records})
            raise DataError(f"no action-level records for split {split!r} (the data has {have or 'none'}); evaluate "
                            "another split (--split, or all) or collect more problems.")
        from haps.train.collect import failed_record

        bad = [r for r in recs if failed_record(r)]
        recs = [r for r in recs if not failed_record(r)]
        if not recs:
            raise DataError(f"every action-level record for split {split!r} is a failed episode ({len(bad)}); rerun "
                            "`haps collect` once the failing model works to fill them in.")
        pids = list(dict.fromkeys(r["problem_id"] for r in recs))
        row = {p: i for i, p in enumerate(pids)}
        shape = (len(pids), space.size)
        t = {k: torch.full(shape, math.nan, dtype=torch.float64) for k in ("reward", "score", "cost")}
        for r in recs:
            j = space.index(space.from_names(r["assignment"]))
            for k in t:
                t[k][row[r["problem_id"]], j] = float(r[k])
        failed = torch.zeros(shape, dtype=torch.bool)
        for r in bad:
            i = row.get(r["problem_id"])
            if i is not None:
                j = space.index(space.from_names(r["assignment"]))
                failed[i, j] = bool(torch.isnan(t["reward"][i, j]))
        return cls(space, pids, t["reward"], t["score"], t["cost"], failed, len(bad))

    @property
    def complete(self) -> bool:
        return not bool(torch.isnan(self.reward).any())

    def oracle(self) -> torch.Tensor:
        """(P, A) one-hot on the best collected z of each problem (ties -> lowest index)."""
        r = torch.nan_to_num(self.reward, nan=-math.inf)
        return torch.nn.functional.one_hot(r.argmax(1), self.space.size).double()

    def fixed(self, z: Sequence[int]) -> torch.Tensor:
        pi = torch.zeros(len(self.problem_ids), self.space.size, dtype=torch.float64)
        pi[:, self.space.index(z)] = 1.0
        return pi

    def random(self) -> torch.Tensor:
        """Uniform over the collected assignments of each problem."""
        have = (~torch.isnan(self.reward)).double()
        return have / have.sum(1, keepdim=True)

    def decisions(self, choices: Mapping[str, Sequence[int]]) -> torch.Tensor:
        pi = torch.zeros(len(self.problem_ids), self.space.size, dtype=torch.float64)
        for i, pid in enumerate(self.problem_ids):
            if pid not in choices:
                raise DataError(f"no decision for problem {pid!r}.")
            pi[i, self.space.index(choices[pid])] = 1.0
        return pi

    def evaluate(self, pi: torch.Tensor) -> dict[str, Any]:
        """Lookup metrics of policy ``pi`` (P, A); a problem whose chosen z was not collected is skipped
        and counted in ``missing``, one whose chosen z only failed is skipped and counted in ``failed``."""
        pi = pi.double()
        have = ~torch.isnan(self.reward)
        failed = self.failed if self.failed is not None else torch.zeros_like(have)
        missing_mass = (pi * (~have & ~failed)).sum(1)  # (P,)
        failed_mass = (pi * failed).sum(1)
        ok = (missing_mass < 1e-9) & (failed_mass < 1e-9)
        best = torch.nan_to_num(self.reward, nan=-math.inf).max(1, keepdim=True).values
        is_best = (self.reward == best) & have  # (P, A)
        out: dict[str, Any] = {"problems": int(ok.sum()), "missing": int((missing_mass >= 1e-9).sum()),
                               "failed": int(((failed_mass >= 1e-9) & (missing_mass < 1e-9)).sum())}
        for name, t in (("reward", self.reward), ("score", self.score), ("cost", self.cost)):
            v = (pi * torch.nan_to_num(t, nan=0.0)).sum(1)
            out[name] = float(v[ok].mean()) if ok.any() else math.nan
        out["best_rate"] = float((pi * is_best).sum(1)[ok].mean()) if ok.any() else math.nan
        sel = pi.mean(0)
        out["selection"] = {self.space.key(self.space.at(j)): float(sel[j]) for j in range(self.space.size)}
        return out


def standard_policies(table: ActionTable) -> dict[str, torch.Tensor]:
    """oracle, random (expected value) and every fixed assignment."""
    pols = {"oracle": table.oracle(), "random": table.random()}
    if table.space.size <= 64:
        for z in table.space.assignments():
            pols[f"fixed:{table.space.key(z)}"] = table.fixed(z)
    return pols


def router_policies(router, table: ActionTable, prompts: Sequence, name: str = "router") -> dict[str, torch.Tensor]:
    """The router's decision (and its expected value under P(z|p) when the space is enumerable)."""
    by_id = {p.problem_id: p for p in prompts}
    missing = [pid for pid in table.problem_ids if pid not in by_id]
    if missing:
        raise DataError(f"no routing prompt for problems {missing[:5]} (of {len(missing)}); the problems file "
                        "must hold every problem of the collection.")
    ordered = [by_id[pid] for pid in table.problem_ids]
    choices = dict(zip(table.problem_ids, router.route(ordered), strict=False))
    pols = {name: table.decisions(choices)}
    if router.enumerable and router.decision == "argmax" and router.name not in ("fixed",):
        pols[f"{name} (expected)"] = router.probs(ordered).double()
    return pols


def lookup_report(table: ActionTable, policies: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return {"problems": len(table.problem_ids), "complete": table.complete, "failed_records": table.failed_records,
            "policies": {n: table.evaluate(pi) for n, pi in policies.items()}}


def report_table(report: Mapping[str, Any], title: str = "evaluation by lookup"):
    from rich.table import Table

    skipped = report.get("failed_records", 0)
    t = Table(title=f"{title} ({report['problems']} problems"
                    + (f"; {skipped} failed episode records skipped" if skipped else "") + ")")
    from haps.labels import key_labels

    for c in ("policy", "reward", "score", "cost", "best z", "failed", "selection"):
        t.add_column(c, justify="left" if c in ("policy", "selection") else "right", no_wrap=c != "selection",
                     overflow="fold")
    keys = sorted({k for m in report["policies"].values() for k in m["selection"]})
    label = key_labels(keys)
    for name, m in report["policies"].items():
        sel = ", ".join(f"{label[k]}: {v:.0%}" for k, v in m["selection"].items() if v > 0.005)
        kind, _, arg = name.partition(":")
        shown = label.get(arg, name) if kind == "fixed" else name
        t.add_row(shown, f"{m['reward']:.4f}", f"{m['score']:.4f}", f"{m['cost']:.3g}", f"{m['best_rate']:.1%}",
                  str(m.get("failed", 0)), sel)
    return t


def write_report(report: Mapping[str, Any], path: str | Path) -> None:
    from haps.files import write_json_atomic

    write_json_atomic(Path(path), dict(report))  # creates the parent folders


def parse_policy_spec(spec: str) -> tuple[str, str]:
    """'oracle' | 'random' | 'fixed:...' | a checkpoint folder -> (kind, argument)."""
    if spec in ("oracle", "random", "all"):
        return spec, ""
    if spec.startswith("fixed:"):
        return "fixed", spec.split(":", 1)[1]
    if Path(spec).is_dir():
        return "checkpoint", spec
    raise ConfigError(f"router {spec!r} is not 'oracle', 'random', 'all', 'fixed:<role>=<model>,...' or an "
                      "existing checkpoint folder.")
