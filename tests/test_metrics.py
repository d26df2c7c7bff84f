"""HotpotQA F1/EM (official rules), choice accuracy and letter extraction, cost normaliser, rewards."""

from __future__ import annotations

import math
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from haps.errors import ConfigError, DataError
from haps.metrics import (
    CostNormalizer,
    RewardConfig,
    choice_accuracy,
    exact_match,
    extract_choice_letter,
    f1_precision_recall,
    f1_score,
    normalize_answer,
    shaped_reward,
    tradeoff_reward,
)


@pytest.mark.parametrize("raw,norm", [
    ("The Beatles", "beatles"),
    ("  An   apple, a day! ", "apple day"),
    ("U.S.A.", "usa"),
    ("Theatre the", "theatre"),  # only whole-word articles go
    ("Rock 'n' Roll", "rock n roll"),
    ("", ""),
    (None, ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize("pred,gold,f1,em", [
    ("the Eiffel Tower", "Eiffel Tower", 1.0, 1.0),  # articles
    ("Eiffel Tower.", "eiffel tower", 1.0, 1.0),  # punctuation and case
    ("Paris France", "Paris", 2 * 0.5 * 1.0 / 1.5, 0.0),  # partial overlap: P=1/2, R=1
    ("Arthur's Magazine", "Arthur's Magazine was first", 2 * 1 * 0.5 / 1.5, 0.0),  # P=1, R=2/4
    ("yes", "yes", 1.0, 1.0),
    ("yes", "no", 0.0, 0.0),
    ("yes it is", "yes", 0.0, 0.0),  # yes/no rule: no partial credit
    ("no", "no way", 0.0, 0.0),
    ("noanswer", "something", 0.0, 0.0),
    ("", "Paris", 0.0, 0.0),
    ("Paris", "", 0.0, 0.0),
    ("", "", 0.0, 1.0),  # official: empty strings share no token, yet are equal
    ("the the", "a", 0.0, 1.0),  # both normalise to ""
    ("Paris Paris", "Paris", 2 * 0.5 * 1.0 / 1.5, 0.0),  # token counts are multisets
])
def test_f1_em_official_examples(pred, gold, f1, em):
    assert f1_score(pred, gold) == pytest.approx(f1)
    assert exact_match(pred, gold) == em


def test_precision_recall_match_the_official_formula():
    f1, p, r = f1_precision_recall("new york city", "new york")
    assert (p, r) == (pytest.approx(2 / 3), 1.0)
    assert f1 == pytest.approx(2 * p * r / (p + r))


@given(st.text(max_size=30), st.text(max_size=30))
def test_f1_is_symmetric_and_bounded(a, b):
    x = f1_score(a, b)
    assert 0.0 <= x <= 1.0 and x == pytest.approx(f1_score(b, a))
    if exact_match(a, b) and normalize_answer(a):
        assert x == 1.0


def test_choice_accuracy_and_letter_extraction():
    assert choice_accuracy("b", " B ") == 1.0
    assert choice_accuracy("A", "B") == 0.0
    assert choice_accuracy(None, "B") == 0.0
    cases = {"Answer: B": "B", "The answer is (C).": "C", "Final answer: **D**": "D", "Finish[A]": "A",
             "B": "B", "(B) Mitochondrion": "B", "C. because": "C", "I pick (D) here": "D",
             "the answer is a mitochondrion": None, "A bird flew": None, "": None, None: None,
             "First I thought A... Answer: C": "C"}
    for text, letter in cases.items():
        assert extract_choice_letter(text) == letter, text
    ch = ["Ribosome", "Mitochondrion", "Golgi apparatus", "Lysosome"]
    assert extract_choice_letter("It is the mitochondrion.", ch) == "B"
    assert extract_choice_letter("Ribosome or lysosome", ch) is None  # ambiguous


def test_cost_normalizer_is_frozen_after_fit():
    n = CostNormalizer.fit([0.2, 0.4, 1.0])
    assert n.transform(0.2) == 0.0 and n.transform(1.0) == 1.0
    assert n.transform(0.6) == pytest.approx(0.5)
    assert n.transform([-5.0, 7.0]) == [0.0, 1.0]  # clipped
    # transforming out-of-range (validation/test) costs never moves the fitted range
    assert (n.c_min, n.c_max) == (0.2, 1.0)
    with pytest.raises(AttributeError):
        n.c_max = 3.0  # type: ignore[misc]
    again = CostNormalizer.from_dict(n.to_dict())
    assert again == n and again.transform(0.6) == pytest.approx(0.5)


def test_cost_normalizer_degenerate_and_bad_input():
    n = CostNormalizer.fit([0.3, 0.3])
    assert n.transform(0.3) == 0.0 and n.transform(0.1) == 0.0 and n.transform(0.5) == 1.0
    with pytest.raises(DataError, match="no costs"):
        CostNormalizer.fit([])
    with pytest.raises(DataError, match="non-finite"):
        CostNormalizer.fit([1.0, math.nan])
    with pytest.raises(ConfigError, match="c_min <= c_max"):
        CostNormalizer(2.0, 1.0)
    with pytest.raises(ConfigError, match="missing keys"):
        CostNormalizer.from_dict({"c_min": 0.0})


def test_rewards():
    assert tradeoff_reward(0.5, 0.25, alpha=0.8, beta=0.2) == pytest.approx(0.35)
    assert shaped_reward(0) == -1.0 and shaped_reward(0.0) == -1.0
    assert shaped_reward(0.4) == 0.4 and shaped_reward(1) == 1.0
    norm = CostNormalizer.fit([0.0, 2.0])
    assert RewardConfig().compute(0.7) == 0.7
    assert RewardConfig(kind="shaped").compute(0.0) == -1.0
    cfg = RewardConfig(kind="tradeoff", alpha=0.5, beta=0.5)
    assert cfg.compute(0.8, cost=1.0, normalizer=norm) == pytest.approx(0.5 * 0.8 - 0.5 * 0.5)
    assert cfg.compute(1.0, cost=10.0, normalizer=norm) == pytest.approx(0.0)  # cost clipped to 1
    with pytest.raises(ConfigError, match="CostNormalizer"):
        cfg.compute(0.8, cost=1.0)


def test_reward_config_validation_and_ignored_options_warn():
    with pytest.raises(ValueError):
        RewardConfig(kind="bogus")
    with pytest.raises(ValueError):
        RewardConfig(kind="tradeoff", beta=-1)
    with pytest.warns(UserWarning, match="ignored"):
        RewardConfig(kind="shaped", alpha=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RewardConfig(kind="tradeoff", alpha=0.2, beta=0.8)
    assert RewardConfig.model_validate({"kind": "tradeoff", "alpha": 0.8, "beta": 0.2}).alpha == 0.8
