"""Warm-up set on a hand-made action table: every tie policy and class-balance option."""

from __future__ import annotations

from collections import Counter

import pytest

from haps.errors import ConfigError, DataError
from haps.train.warmup import build_warmup

KEYS = ["t=A,s=A", "t=A,s=B", "t=B,s=A", "t=B,s=B"]  # product order
TABLE = {
    "p1": [1.0, 0.5, 1.0, 0.0],  # tie: AA, BA
    "p2": [0.0, 1.0, 0.0, 0.0],  # AB
    "p3": [0.0, 0.0, 0.0, 0.0],  # nobody solves it: a 4-way tie
    "p4": [0.2, 0.2, 0.9, 0.1],  # BA
}


def records(split="train"):
    out = []
    for pid, rewards in TABLE.items():
        for k, r in zip(KEYS, rewards, strict=False):
            t, s = (x.split("=")[1] for x in k.split(","))
            out.append({"problem_id": pid, "split": split, "key": k, "assignment": {"t": t, "s": s},
                        "reward": r, "score": r, "cost": 0.0})
    return out


def labels(ex):
    return {(e.problem_id, e.key) for e in ex}


def test_first():
    ex, st = build_warmup(records(), tie="first")
    assert labels(ex) == {("p1", KEYS[0]), ("p2", KEYS[1]), ("p3", KEYS[0]), ("p4", KEYS[2])}
    assert st.problems == 4 and st.examples == 4
    assert st.tie_share == 0.5 and st.all_zero_share == 0.25 and st.dropped_all_zero == 0
    assert st.labels == {KEYS[0]: 2, KEYS[1]: 1, KEYS[2]: 1}
    assert {e.problem_id: e.n_best for e in ex} == {"p1": 2, "p2": 1, "p3": 4, "p4": 1}


def test_all():
    ex, st = build_warmup(records(), tie="all")
    assert labels(ex) == {("p1", KEYS[0]), ("p1", KEYS[2]), ("p2", KEYS[1]), ("p4", KEYS[2])} | {
        ("p3", k) for k in KEYS}
    assert st.examples == 8


def test_random_is_seeded_and_picks_among_the_best():
    a, _ = build_warmup(records(), tie="random", seed=0)
    b, _ = build_warmup(records(), tie="random", seed=0)
    assert a == b and len(a) == 4
    picks = set()
    for seed in range(40):
        ex, _ = build_warmup(records(), tie="random", seed=seed)
        p1 = [e.key for e in ex if e.problem_id == "p1"]
        assert p1[0] in (KEYS[0], KEYS[2])
        picks.add(p1[0])
        assert [e.key for e in ex if e.problem_id == "p2"] == [KEYS[1]]
    assert picks == {KEYS[0], KEYS[2]}


def test_drop_all_zero():
    ex, st = build_warmup(records(), tie="all", drop_all_zero=True)
    assert "p3" not in {e.problem_id for e in ex}
    assert st.dropped_all_zero == 1 and st.all_zero_share == 0.25 and st.examples == 4
    assert st.labels == {KEYS[0]: 1, KEYS[1]: 1, KEYS[2]: 2}


def test_undersample_and_oversample():
    ex, st = build_warmup(records(), tie="all", drop_all_zero=True, balance="undersample", seed=1)
    assert Counter(e.key for e in ex) == {KEYS[0]: 1, KEYS[1]: 1, KEYS[2]: 1}
    assert st.labels_before_balance == {KEYS[0]: 1, KEYS[1]: 1, KEYS[2]: 2}
    ex, st = build_warmup(records(), tie="all", drop_all_zero=True, balance="oversample", seed=1)
    assert Counter(e.key for e in ex) == {KEYS[0]: 2, KEYS[1]: 2, KEYS[2]: 2}
    assert st.examples == 6
    again, _ = build_warmup(records(), tie="all", drop_all_zero=True, balance="oversample", seed=1)
    assert again == ex


def test_split_filter_and_errors():
    recs = records("train") + [dict(r, problem_id="v" + r["problem_id"], split="valid") for r in records()]
    ex, st = build_warmup(recs, split="valid", tie="first")
    assert st.problems == 4 and all(e.problem_id.startswith("v") for e in ex)
    with pytest.raises(DataError, match="split 'test'"):
        build_warmup(recs, split="test")
    with pytest.raises(ConfigError, match="tie policy"):
        build_warmup(recs, tie="best")
    with pytest.raises(DataError, match="twice"):
        build_warmup(records() + records()[:1])
