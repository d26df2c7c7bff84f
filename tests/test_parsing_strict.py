"""Strict parsing (workflow option ``parsing: strict``, the paper profile): only the official format, held
equal to the authors' regular expressions where they accept a bracketed action, and linear in time."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haps.workflows.parsing import (
    parse_choice_strict,
    parse_review_strict,
    parse_student_action,
    parse_student_action_strict,
    parse_teacher_action_strict,
)


def official(s: str) -> tuple[str, str] | None:
    """zihangtian/HAPS HotpotQA/agent.py `_tNaparse` + the cut after the first "]" (the reference)."""
    s = s.strip()
    t = re.search(r"\bThought:\s*(.*?)(?=\n\s*Action:|\Z)", s, flags=re.DOTALL | re.IGNORECASE)
    a = re.search(r"\bAction:\s*(.*)", s, flags=re.DOTALL | re.IGNORECASE)
    if not t or not a:
        return None
    action = a.group(1).strip()
    end = action.find("]")
    return t.group(1).strip(), action[:end + 1] if end != -1 else action


@pytest.mark.parametrize("text,kind,arg", [
    ("Thought: I need Holst.\nAction: Search[Gustav Holst]", "search", "Gustav Holst"),
    ("thought: x\naction: Finish[Cheltenham] because", "finish", "Cheltenham"),
    ("Thought: a\n\n  Action: Finish[yes]", "finish", "yes"),
    ("Thought: ok\nAction: search[Ed Wood]", None, ""),  # verbs as written
    ("Thought: ok\nAction: Finish Paris", None, ""),  # brackets required
    ("**Thought:** hmm\n**Action:** Finish[Paris]", None, ""),  # no markdown removal
    ("Action: Finish[Paris]", None, ""),  # no thought
    ("Thought: Finish[Paris]", None, ""),  # no action label
    ("", None, ""),
])
def test_student_strict_cases(text, kind, arg):
    a = parse_student_action_strict(text)
    assert (a.kind, a.arg) == (kind, arg)
    assert (a.error is None) == (kind is not None)
    assert parse_student_action(text).kind is not None or not text or text.startswith("Thought: Finish")


@given(st.lists(st.sampled_from(list("ab \n\t:[]") + ["Thought:", "Action:", "Search[", "Finish[", "x]"]),
                max_size=30).map("".join))
@settings(max_examples=400, deadline=None)
def test_student_strict_matches_the_official_regexes(text):
    ref = official(text)
    got = parse_student_action_strict(text)
    if ref is None:
        assert got.kind is None
        return
    thought, action = ref
    assert got.thought == thought
    if action.startswith(("Search[", "Finish[")) and action.endswith("]"):
        assert got.kind == action[:6].lower() and got.arg == action[7:-1].strip()
    else:
        assert got.kind is None and got.error


@pytest.mark.parametrize("text,verdict", [
    ("Thought: good step.\nAction: [Continue]", "continue"),
    ("Thought: wrong entity.\nAction: [Rethink] and then", "rethink"),
    ("Thought: x\nAction: Continue", None),
    ("Thought: x\nAction: [continue]", None),
    ("[Continue]", None),
])
def test_teacher_strict_cases(text, verdict):
    a = parse_teacher_action_strict(text)
    assert a.verdict == verdict and (a.error is None) == (verdict is not None)
    if verdict:
        assert a.thought == text.split("\n")[0].removeprefix("Thought: ")


def test_mmlu_strict_cases():
    c = parse_choice_strict("Rationale: the heart pumps.\nChoice: B", ["a", "b", "c", "d"])
    assert (c.choice, c.rationale, c.error) == ("B", "the heart pumps.", None)
    assert parse_choice_strict("Choice: b").choice is None  # capital letters only
    assert parse_choice_strict("The answer is C").choice is None
    assert parse_choice_strict("Choice: Bee").choice is None
    r = parse_review_strict("Feedback: fine.\nSubmit: 1")
    assert (r.submit, r.feedback, r.error) == (True, "fine.", None)
    assert parse_review_strict("Feedback: no.\nSubmit: 0").submit is False
    assert parse_review_strict("Submit: yes").submit is None and parse_review_strict("Submit: yes").error


def test_strict_parsers_are_linear_in_the_output():
    big = "Thought: x" + " \n" * 100_000 + "Action: Finish[a]" + " \n" * 100_000
    t0 = time.perf_counter()
    for text in (big, "Thought:" + "\n " * 200_000, "Action:" * 50_000, "Choice:" + " " * 200_000):
        parse_student_action_strict(text)
        parse_teacher_action_strict(text)
        parse_choice_strict(text)
        parse_review_strict(text)
    assert time.perf_counter() - t0 < 2.0
    assert parse_student_action_strict(big).arg == "a"


def test_workflows_read_actions_strictly_when_asked():
    from haps.data import Problem
    from haps.models.types import Generation
    from haps.workflows.loader import get_workflow

    p = Problem(id="q", task="mmlu", question="Which?", gold="B", choices=["w", "x", "y", "z"], subject="s")
    for parsing, want in (("lenient", "B"), ("strict", None)):
        wf = get_workflow("mmlu", rounds=1, parsing=parsing)
        st_ = wf.start(p)
        wf.advance(st_, "student", Generation(text="Rationale: r\n**Choice:** (B)", model="m"))
        assert st_.prediction == want
