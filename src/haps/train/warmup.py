"""The warm-up (SFT initialisation) set of paper App. C: per training problem, its best assignment(s).

    D_warm = {(p, z*) | p in D_train, z* in argmax_z r(p, z)}

Tie policies: ``all`` keeps every best assignment (one example each), ``random`` picks one uniformly
(seeded per problem, the paper's choice), ``first`` takes the first in the records' assignment order
(product order of the space). ``drop_all_zero`` removes problems that no assignment solved (every score
is 0): their "best" label is arbitrary. Class balance over assignment labels: ``undersample`` cuts
every label to the rarest label's count, ``oversample`` repeats examples of every label (sampled with
replacement) up to the commonest label's count; both seeded.

Failed episodes are never rewards: a record that is one (`haps.train.collect.failed_record`: ``failed:
true`` or no reward) is skipped before anything else and counted (``failed_records``, per assignment
in ``failed_by_key``); the best assignment of a problem is chosen among its other records.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from haps.errors import ConfigError, DataError

TiePolicy = Literal["all", "random", "first"]
Balance = Literal["none", "undersample", "oversample"]
TIE_POLICIES = ("all", "random", "first")
BALANCES = ("none", "undersample", "oversample")


@dataclass(frozen=True)
class WarmupExample:
    problem_id: str
    key: str  # canonical assignment key, e.g. "teacher=m0,student=m1"
    assignment: dict[str, str]
    reward: float
    n_best: int  # how many assignments tied for the best reward


@dataclass
class WarmupStats:
    problems: int  # problems considered (of the requested split)
    examples: int  # after ties and balance
    dropped_all_zero: int
    tie_share: float  # share of problems with more than one best assignment
    all_zero_share: float  # share of problems no assignment solved (before dropping)
    labels_before_balance: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    failed_records: int = 0  # records of failed episodes, skipped
    failed_by_key: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def table(self, title: str = "warm-up set"):
        from rich.table import Table

        from haps.labels import key_labels

        t = Table(title=f"{title}: {self.examples} examples from {self.problems} problems "
                        f"(ties {self.tie_share:.1%}, all-zero {self.all_zero_share:.1%}, "
                        f"dropped {self.dropped_all_zero}, failed records skipped {self.failed_records})")
        t.add_column("assignment", no_wrap=True)
        t.add_column("best", justify="right")  # problems it is a best assignment of, before balancing
        t.add_column("examples", justify="right")
        t.add_column("share", justify="right")
        t.add_column("failed (skipped)", justify="right")
        keys = sorted(set(self.labels_before_balance) | set(self.labels) | set(self.failed_by_key))
        label = key_labels(keys)
        for k in keys:
            n = self.labels.get(k, 0)
            t.add_row(label[k], str(self.labels_before_balance.get(k, 0)), str(n),
                      f"{n / self.examples:.1%}" if self.examples else "-", str(self.failed_by_key.get(k, 0)))
        return t


def _rng(seed: int, *parts: str) -> random.Random:
    h = hashlib.sha256("\x00".join([str(seed), *parts]).encode()).hexdigest()
    return random.Random(int(h[:16], 16))


def group_by_problem(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """problem_id -> its records, in file order; a repeated (problem, assignment) is an error."""
    out: dict[str, list[dict[str, Any]]] = {}
    seen: set[tuple[str, str]] = set()
    for r in records:
        k = (r["problem_id"], r["key"])
        if k in seen:
            raise DataError(f"action-level data has (problem, assignment) {k} twice; recollect or deduplicate.")
        seen.add(k)
        out.setdefault(r["problem_id"], []).append(r)
    return out


def build_warmup(records: Iterable[dict[str, Any]], *, split: str | None = "train", tie: TiePolicy = "random",
                 drop_all_zero: bool = False, balance: Balance = "none", seed: int = 0,
                 order: Sequence[str] | None = None) -> tuple[list[WarmupExample], WarmupStats]:
    """The warm-up examples of ``split`` (None: all records) and their statistics.

    ``order`` is the assignment-key order that ``first`` follows (default: each problem's record order,
    which `collect` writes in product order).
    """
    if tie not in TIE_POLICIES:
        raise ConfigError(f"tie policy must be one of {TIE_POLICIES}, got {tie!r}.")
    if balance not in BALANCES:
        raise ConfigError(f"balance must be one of {BALANCES}, got {balance!r}.")
    from haps.train.collect import failed_record

    recs = [r for r in records if split is None or r.get("split") == split]
    failed = Counter(str(r.get("key")) for r in recs if failed_record(r))
    recs = [r for r in recs if not failed_record(r)]
    groups = group_by_problem(recs)
    if not groups:
        why = (f" ({sum(failed.values())} failed episode records skipped; rerun `haps collect` to fill them in)"
               if failed else "")
        raise DataError(f"no action-level records for split {split!r}{why}; check the data folder and the split name.")
    rank = {k: i for i, k in enumerate(order)} if order is not None else None
    examples: list[WarmupExample] = []
    ties = zeros = dropped = 0
    for pid in sorted(groups):
        rows = groups[pid]
        if rank is not None:
            rows = sorted(rows, key=lambda r: rank.get(r["key"], len(rank)))
        best = max(float(r["reward"]) for r in rows)
        top = [r for r in rows if float(r["reward"]) == best]
        all_zero = all(float(r["score"]) == 0 for r in rows)
        ties += len(top) > 1
        zeros += all_zero
        if all_zero and drop_all_zero:
            dropped += 1
            continue
        n_best = len(top)
        if tie == "first":
            top = top[:1]
        elif tie == "random":
            top = [_rng(seed, "tie", pid).choice(top)]
        for r in top:
            examples.append(WarmupExample(pid, r["key"], dict(r["assignment"]), best, n_best))
    before = dict(Counter(e.key for e in examples))
    examples = rebalance(examples, balance, seed)
    n = len(groups)
    stats = WarmupStats(problems=n, examples=len(examples), dropped_all_zero=dropped, tie_share=ties / n,
                        all_zero_share=zeros / n, labels_before_balance=before,
                        labels=dict(Counter(e.key for e in examples)), failed_records=sum(failed.values()),
                        failed_by_key=dict(failed))
    return examples, stats


def rebalance(examples: list[WarmupExample], balance: Balance, seed: int) -> list[WarmupExample]:
    """Equalise label counts (see module docstring); ``none`` returns the examples unchanged."""
    if balance == "none" or not examples:
        return list(examples)
    by: dict[str, list[WarmupExample]] = {}
    for e in examples:
        by.setdefault(e.key, []).append(e)
    rng = _rng(seed, "balance", balance)
    out: list[WarmupExample] = []
    if balance == "undersample":
        n = min(len(v) for v in by.values())
        for k in sorted(by):
            out += rng.sample(by[k], n)
    else:
        n = max(len(v) for v in by.values())
        for k in sorted(by):
            out += by[k] + [rng.choice(by[k]) for _ in range(n - len(by[k]))]
    rng.shuffle(out)
    return out
