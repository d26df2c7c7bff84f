"""Task metrics and rewards.

- HotpotQA: the official answer normalisation and token-level F1 / exact match (``hotpot_evaluate_v1.py``),
  including its yes/no/noanswer rule: when either normalised string is one of those three words and the
  two differ, F1 is 0 (no partial credit for "yes" vs "yes it is").
- MMLU: accuracy on the option letter; `extract_choice_letter` reads a letter from free text.
- Rewards: the raw score, the shaped score of paper Appendix D (-1 when the score is 0), and the
  performance-cost trade-off of paper Eq. 14, ``alpha * Perf - beta * Cost_norm``, with the cost min-max
  normalised by a `CostNormalizer` fitted on the training split and then frozen (Eq. 13).
"""

from __future__ import annotations

import math
import re
import string
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

from pydantic import BaseModel, ConfigDict, Field, model_validator

from haps.errors import ConfigError, DataError

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SPECIAL = ("yes", "no", "noanswer")


# --------------------------------------------------------------------------- HotpotQA


def normalize_answer(s: str | None) -> str:
    """Official HotpotQA/SQuAD normalisation: lower-case, drop punctuation, articles and extra spaces.

    The order is the official one (lower -> punctuation -> articles -> whitespace); None counts as "".
    """
    text = (s or "").lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def f1_precision_recall(prediction: str | None, gold: str | None) -> tuple[float, float, float]:
    """Token-level (F1, precision, recall) of the normalised strings, as the official script computes them.

    If either normalised string is "yes", "no" or "noanswer" and they differ, all three are 0. Two empty
    strings share no token, so they score 0 (official behaviour; `exact_match` gives them 1).
    """
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if (pred in _SPECIAL or ref in _SPECIAL) and pred != ref:
        return 0.0, 0.0, 0.0
    pred_toks, ref_toks = pred.split(), ref.split()
    same = sum((Counter(pred_toks) & Counter(ref_toks)).values())
    if same == 0:
        return 0.0, 0.0, 0.0
    precision = same / len(pred_toks)
    recall = same / len(ref_toks)
    return 2 * precision * recall / (precision + recall), precision, recall


def f1_score(prediction: str | None, gold: str | None) -> float:
    """Official HotpotQA token F1 in [0, 1] (see `f1_precision_recall`)."""
    return f1_precision_recall(prediction, gold)[0]


def exact_match(prediction: str | None, gold: str | None) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


# --------------------------------------------------------------------------- MMLU

_LETTER_PATTERNS = [
    # "Answer: B", "answer is (C)", "final answer: **D**", "Finish[A]". The reference pattern
    #   (?:final\s+answer|answer|finish|option|choice)\s*(?:is|:|=|\[)?\s*[\(\[\*\s]*((?-i:[A-D]))\b
    # lets three whitespace parts share a long run of spaces (cubic backtracking before a non-letter);
    # this is the same language with each part possessive and the "[" left to the bracket class.
    re.compile(r"(?:final\s++answer|answer|finish|option|choice)(?:\s*+(?:is|:|=))?[\(\[\*\s]*+((?-i:[A-D]))\b", re.I),
    re.compile(r"^\s*[\(\[\*]*([A-D])(?:[\)\]\.\:\*]+|\s*$)"),  # "B", "(B) ...", "B. ...", "**B**"
    re.compile(r"[\(\[]([A-D])[\)\]]"),  # "... (C) ..."
]


def extract_choice_letter(text: str | None, choices: Sequence[str] | None = None) -> str | None:
    """The option letter A-D given in free text, or None if there is none (never raises; linear time).

    Tries, in order: an "answer/finish/option ... X" phrase (the last one wins), a leading letter,
    a bracketed letter, and, when ``choices`` are given, the text of exactly one option appearing in
    the reply (after `normalize_answer`).
    """
    if not text:
        return None
    hits = _LETTER_PATTERNS[0].findall(text)
    if hits:
        return hits[-1].upper()
    for pat in _LETTER_PATTERNS[1:]:
        m = pat.search(text)
        if m:
            return m.group(1).upper()
    if choices:
        norm = f" {normalize_answer(text)} "
        found = [i for i, c in enumerate(choices) if normalize_answer(c) and f" {normalize_answer(c)} " in norm]
        if len(found) == 1:
            return "ABCD"[found[0]]
    return None


def choice_accuracy(pred_letter: str | None, gold_letter: str) -> float:
    """1.0 when the predicted option letter equals the gold one (case and spaces ignored), else 0.0."""
    if pred_letter is None:
        return 0.0
    return float(pred_letter.strip().upper() == gold_letter.strip().upper())


# --------------------------------------------------------------------------- cost normalisation


@dataclass(frozen=True)
class CostNormalizer:
    """Min-max cost normalisation (paper Eq. 13), fitted once on training costs and then frozen.

    ``transform(c) = clip((c - c_min) / (c_max - c_min), 0, 1)``. When all training costs are equal
    (``c_max == c_min``) a cost at or below that value maps to 0 and any higher cost to 1 (the limit of
    the clipped formula). The object is immutable: build it with ``CostNormalizer.fit(train_costs)``;
    validation and test costs only go through `transform`.
    """

    c_min: float
    c_max: float

    def __post_init__(self) -> None:
        for name in ("c_min", "c_max"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v):
                raise ConfigError(f"CostNormalizer.{name} must be a finite number, got {v!r}")
        if self.c_max < self.c_min:
            raise ConfigError(f"CostNormalizer needs c_min <= c_max, got c_min={self.c_min}, c_max={self.c_max}")

    @classmethod
    def fit(cls, costs: Iterable[float]) -> CostNormalizer:
        """Fit on training-split costs (USD per episode); returns a new frozen normaliser."""
        vals = [float(c) for c in costs]
        if not vals:
            raise DataError("CostNormalizer.fit got no costs; fit it on the training split's episode costs")
        bad = [c for c in vals if not math.isfinite(c)]
        if bad:
            raise DataError(f"CostNormalizer.fit got non-finite costs {bad[:3]}; costs must be finite numbers")
        return cls(min(vals), max(vals))

    def _one(self, c: float) -> float:
        span = self.c_max - self.c_min
        if span <= 0:
            return 0.0 if c <= self.c_min else 1.0
        return min(1.0, max(0.0, (float(c) - self.c_min) / span))

    @overload
    def transform(self, cost: float) -> float: ...
    @overload
    def transform(self, cost: Sequence[float]) -> list[float]: ...

    def transform(self, cost):
        """Normalised cost(s) in [0, 1]; a sequence gives a list."""
        if isinstance(cost, Sequence) and not isinstance(cost, str):
            return [self._one(c) for c in cost]
        return self._one(cost)

    __call__ = transform

    def to_dict(self) -> dict[str, float]:
        return {"c_min": self.c_min, "c_max": self.c_max}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostNormalizer:
        missing = {"c_min", "c_max"} - set(d)
        if missing:
            raise ConfigError(f"CostNormalizer.from_dict: missing keys {sorted(missing)}; expected c_min and c_max")
        return cls(float(d["c_min"]), float(d["c_max"]))


# --------------------------------------------------------------------------- rewards


def tradeoff_reward(perf: float, cost_norm: float, alpha: float, beta: float) -> float:
    """Performance-cost reward of paper Eq. 14: ``alpha * perf - beta * cost_norm``."""
    return alpha * perf - beta * cost_norm


def shaped_reward(score: float) -> float:
    """Paper Appendix D shaping: -1 when the task score is 0, else the score itself."""
    return -1.0 if score == 0 else float(score)


class RewardConfig(BaseModel):
    """How an episode's task score (and cost) becomes the scalar reward used for training.

    Paper regimes for ``tradeoff``: performance-first (alpha=0.8, beta=0.2), balanced (0.5, 0.5),
    cost-first (0.2, 0.8).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["score", "shaped", "tradeoff"] = Field(
        default="score",
        description="`score`: the task metric (F1 or accuracy); `shaped`: -1 if the score is 0 else the score "
        "(paper App. D); `tradeoff`: alpha * score - beta * normalised cost (paper Eq. 14).",
    )
    alpha: float = Field(default=1.0, description="tradeoff: weight of the performance term.")
    beta: float = Field(default=0.0, ge=0, description="tradeoff: weight of the normalised cost term.")

    @model_validator(mode="after")
    def _ignored(self) -> RewardConfig:
        if self.kind != "tradeoff" and {"alpha", "beta"} & self.model_fields_set:
            warnings.warn(f"RewardConfig: alpha/beta are only used with kind='tradeoff'; they are ignored for "
                          f"kind={self.kind!r}", UserWarning, stacklevel=2)
        return self

    def compute(self, score: float, cost: float = 0.0, normalizer: CostNormalizer | None = None) -> float:
        """The reward of one episode with task ``score`` and raw USD ``cost``."""
        if self.kind == "score":
            return float(score)
        if self.kind == "shaped":
            return shaped_reward(score)
        if normalizer is None:
            raise ConfigError("RewardConfig(kind='tradeoff') needs a CostNormalizer fitted on the training "
                              "costs: pass normalizer=CostNormalizer.fit(train_costs)")
        return tradeoff_reward(score, normalizer.transform(cost), self.alpha, self.beta)
