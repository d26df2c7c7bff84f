"""Parsers of agent outputs: hand-written malformed outputs, and property tests (never raise,
recover what is recoverable)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haps.workflows.parsing import (
    parse_choice,
    parse_review,
    parse_short_answer,
    parse_student_action,
    parse_summary,
    parse_teacher_action,
)

# ------------------------------------------------------------------ HotpotQA Student
STUDENT_CASES = [
    ("Thought: I need Holst.\nAction: Search[Gustav Holst]", "search", "Gustav Holst"),
    ("thought: x\naction: search[Gustav Holst]", "search", "Gustav Holst"),
    ("THOUGHT:x\nACTION :  Finish[ Cheltenham ]", "finish", "Cheltenham"),
    ("**Thought:** hmm\n**Action:** Finish[Paris]", "finish", "Paris"),
    ("### Thought: hmm\n### Action: Search[Ed Wood]", "search", "Ed Wood"),
    ("Thought: ok\nAction: `Finish[yes]`", "finish", "yes"),
    ("Thought: ok\nAction: Finish[Paris] because the tower is there.", "finish", "Paris"),
    ("Thought: ok\nAction: Finish Paris", "finish", "Paris"),
    ("Thought: ok\nAction: Finish: Paris.", "finish", "Paris"),
    ("Thought: ok\nAction: finish the answer is Scott Derrickson", "finish", "Scott Derrickson"),
    ("Thought: ok\nAction: Finish[the answer is Chicago]", "finish", "Chicago"),
    ("Thought: ok\nAction: Finish[[Chicago]]", "finish", "Chicago"),
    ('Thought: ok\nAction: Finish["Chicago"]', "finish", "Chicago"),
    ("Thought: ok\nAction: Search(Ed Wood)", "search", "Ed Wood"),
    ("Thought: ok\nAction: Search[Ed Wood", "search", "Ed Wood"),
    ("Thought: ok\nAction: search Ed Wood film", "search", "Ed Wood film"),
    ("Thought: ok\nAction: Finish[Washington D.C.]", "finish", "Washington D.C."),
    ("Thought: ok\nAction: Finish: Washington D.C.", "finish", "Washington D.C."),
    ("Thought: ok\nAction:Search[Ed Wood]\nObservation: Ed Wood was ...\nThought: x\nAction: Finish[no]",
     "search", "Ed Wood"),
    ("Thought: I will look it up. Action: Search[Ed Wood]", "search", "Ed Wood"),
    ("I think I should Search[Ed Wood] first.", "search", "Ed Wood"),
    ("Thought: hmm\nAction: I will now Finish[1994]", "finish", "1994"),
    ("Thought: ok\nAction: Answer: 1994", "finish", "1994"),
    ("Thought: ok\n\nAction:\nFinish[no]", "finish", "no"),
    ("Thought\uff1a ok\nAction\uff1a Finish[no]", "finish", "no"),
]


@pytest.mark.parametrize("text,kind,arg", STUDENT_CASES)
def test_student_action_recovers(text, kind, arg):
    a = parse_student_action(text)
    assert a.error is None, a
    assert (a.kind, a.arg) == (kind, arg)
    assert a.action == f"{kind.capitalize()}[{arg}]"


@pytest.mark.parametrize("text", [
    "", "   ", "I do not know.", "Thought: hmm\nAction:", "Thought: hmm\nAction: []",
    "Thought: I am thinking very hard", "Thought: x\nAction: Lookup", "Thought: x\nAction: dance[now]", None,
])
def test_student_action_failures_are_reported(text):
    a = parse_student_action(text)
    assert a.kind is None and a.arg == "" and a.error
    assert a.action == ""


def test_student_thought_kept():
    a = parse_student_action("Thought: Holst composed it.\nAction: Search[Holst]")
    assert a.thought == "Holst composed it."
    b = parse_student_action("I need more.\nAction: Search[Holst]")
    assert b.thought == "I need more."


# ------------------------------------------------------------------ HotpotQA Teacher
@pytest.mark.parametrize("text,verdict", [
    ("Thought: good\nAction: [Continue]", "continue"),
    ("Thought: bad\nAction: [Rethink]", "rethink"),
    ("Thought: bad\nAction: Rethink", "rethink"),
    ("Thought: bad\naction: [rethink] - search the other film", "rethink"),
    ("**Thought:** fine\n**Action:** **[Continue]**", "continue"),
    ("Thought: fine\nAction: (Continue)", "continue"),
    ("Thought: fine\nAction: The student should continue.", "continue"),
    ("The student did well. [Continue]", "continue"),
    ("Thought: fine\nAction: [Continue]\nThought: again\nAction: [Rethink]", "continue"),
])
def test_teacher_action(text, verdict):
    t = parse_teacher_action(text)
    assert t.error is None and t.verdict == verdict
    assert t.action == f"[{verdict.capitalize()}]"


def test_teacher_advice_is_the_thought():
    t = parse_teacher_action("Thought: Search Holst next.\nAction: [Continue]")
    assert t.thought == "Search Holst next."


@pytest.mark.parametrize("text", ["", "Thought: the student is fine", "Action: [Proceed]", "continue"])
def test_teacher_failures(text):
    t = parse_teacher_action(text)
    assert t.verdict is None and t.error


# ------------------------------------------------------------------ summaries
@pytest.mark.parametrize("text,expect", [
    ("Summary: Holst composed it.", "Holst composed it."),
    ("**Summary:** Holst composed it.\nQuestion: ignored", "Holst composed it."),
    ("summary:\nHolst composed it.\nHe was English.", "Holst composed it.\nHe was English."),
])
def test_summary(text, expect):
    s = parse_summary(text)
    assert s.error is None and s.text == expect


@pytest.mark.parametrize("text", ["", "Summary:", "Summary:   \n", "[INSTRUCTION] To get started, ask."])
def test_summary_failure(text):
    assert parse_summary(text).error


# ------------------------------------------------------------------ MMLU Student
CHOICES = ["Oxygen", "Nitrogen", "Carbon dioxide", "Argon"]


@pytest.mark.parametrize("text,letter", [
    ("Rationale: air is mostly N2.\nChoice: B", "B"),
    ("rationale: x\nchoice: b", "B"),
    ("Rationale: x\nChoice: (B)", "B"),
    ("Rationale: x\nChoice: B. Nitrogen", "B"),
    ("Rationale: x\nChoice: B) Nitrogen", "B"),
    ("Rationale: x\nChoice: **C**", "C"),
    ("Rationale: x\n**Choice:** D", "D"),
    ("Rationale: x\nChoice: Option A", "A"),
    ("Rationale: x\nChoice: [A]", "A"),
    ("Rationale: x\nChoice: a", "A"),
    ("Rationale: x\nChoice: Nitrogen", "B"),
    ("The answer is C", "C"),
    ("I think the answer is (D).", "D"),
    ("Rationale: x\nAnswer: B", "B"),
    ("Rationale: x\nFinal answer: C", "C"),
    ("Rationale: x\nChoice: B\nRationale: more\nChoice: C", "B"),
])
def test_choice(text, letter):
    c = parse_choice(text, CHOICES)
    assert c.error is None and c.choice == letter


@pytest.mark.parametrize("text", ["", "Rationale: I am unsure.", "Choice: a good one", "Choice: E", "Choice: none"])
def test_choice_failures(text):
    c = parse_choice(text, CHOICES)
    assert c.choice is None and c.error


def test_choice_rationale():
    assert parse_choice("Rationale: mostly N2.\nChoice: B").rationale == "mostly N2."


# ------------------------------------------------------------------ MMLU Teacher
@pytest.mark.parametrize("text,submit", [
    ("Feedback: right.\nSubmit: 1", True),
    ("Feedback: wrong.\nSubmit: 0", False),
    ("feedback: ok\nsubmit:1 (enough to submit)", True),
    ("**Feedback:** ok\n**Submit:** **1**", True),
    ("Feedback: ok\nSubmit: <1>", True),
    ("Feedback: ok\nSubmit: yes", True),
    ("Feedback: no\nSubmit: False", False),
    ("Feedback: ok\nSubmit: (0)", False),
])
def test_review(text, submit):
    r = parse_review(text)
    assert r.error is None and r.submit is submit


@pytest.mark.parametrize("text", ["", "Feedback: fine", "Submit: maybe", "Feedback: x\nSubmit: 2"])
def test_review_failures(text):
    r = parse_review(text)
    assert r.submit is None and r.error


def test_review_feedback():
    assert parse_review("Feedback: check units.\nSubmit: 0").feedback == "check units."


# ------------------------------------------------------------------ properties
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
ARG = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters=" -,'&."), min_size=1,
              max_size=40).map(lambda s: " ".join(s.split())).filter(
    lambda s: s and s[0].isalnum() and s[-1].isalnum())
LABEL_NOISE = st.sampled_from(["", "**", "### ", " "])  # before a label
AFTER_NOISE = st.sampled_from(["", "**", " "])  # right after a label's colon
CASE = st.sampled_from([str.lower, str.upper, str.title, lambda s: s])


@settings(max_examples=300, deadline=None)
@given(ANY_TEXT)
def test_parsers_never_raise(text):
    for fn in (parse_student_action, parse_teacher_action, parse_summary, parse_review):
        fn(text)
    parse_choice(text, CHOICES)
    parse_choice(text, None)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["Thought:", "Action:", "Search[", "Finish[", "]", "[Continue]", "Choice:", "(B)",
                                 "Submit:", "1", "Summary:", "\n", " ", "**", "answer is", "x", "A", "#"]),
                max_size=30))
def test_parsers_never_raise_on_label_soup(parts):
    text = "".join(parts)
    for fn in (parse_student_action, parse_teacher_action, parse_summary, parse_review):
        fn(text)
    parse_choice(text, CHOICES)


@settings(max_examples=200, deadline=None)
@given(ARG, st.sampled_from(["Search", "Finish"]), CASE, LABEL_NOISE, AFTER_NOISE, st.sampled_from(["\n", "\n\n"]),
       st.sampled_from(["", " and that is all.", "\nObservation: foo"]))
def test_student_recovers_well_formed_actions(arg, verb, case, noise, after, sep, tail):
    text = f"{noise}Thought:{after} thinking{sep}{noise}Action:{after} {case(verb)}[{arg}]{tail}"
    a = parse_student_action(text)
    assert a.error is None
    assert a.kind == verb.lower()
    assert a.arg == arg


@settings(max_examples=100, deadline=None)
@given(st.sampled_from("ABCD"), LABEL_NOISE, AFTER_NOISE,
       st.sampled_from(["{}", "({})", "{}.", "**{}**", "{})", "Option {}"]))
def test_choice_recovers_letters(letter, noise, after, fmt):
    c = parse_choice(f"Rationale: because.\n{noise}Choice:{after} {fmt.format(letter)}", CHOICES)
    assert c.choice == letter


@pytest.mark.parametrize("text,expected", [
    ("Answer: Cheltenham", "Cheltenham"), (" Cheltenham.", "Cheltenham"), ("answer is \"Paris\"\nmore", "Paris"),
    ("Yes, both are American.", "yes"), ("No.", "no"), ("Nobel Prize", "Nobel Prize"), ("Finish[Oslo] done", "Oslo"),
    ("", ""), ("   \n", ""), ("**Answer:** New York City", "New York City"), ("[Greenwich Village]", "Greenwich Village"),
])
def test_parse_short_answer(text, expected):
    assert parse_short_answer(text) == expected


@given(st.text(max_size=200))
def test_parse_short_answer_never_raises(text):
    assert isinstance(parse_short_answer(text), str)
