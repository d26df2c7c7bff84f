"""The slow twin of `haps.workflows.parsing` and `haps.metrics.extract_choice_letter`: the parsers as
they were before they were made linear-time (commit 92703e4), kept verbatim as the test oracle. The
fast parsers must return exactly what these return (tests/test_parsing_fuzz.py); these take quadratic
or worse time on some inputs (long whitespace runs, many labels), so tests feed them short texts only.
"""
# ruff: noqa

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

StudentKind = Literal["search", "finish"]
Verdict = Literal["continue", "rethink"]

_OPEN = "[({<"
_CLOSE = {"[": "]", "(": ")", "{": "}", "<": ">"}
# markdown emphasis, headings at line start, backticks, bullets
_MD = re.compile(r"\*\*|__|`|^\s{0,3}#{1,6}\s*|^\s*[-*>]\s+", re.MULTILINE)


def clean(text: object) -> str:
    """Text with markdown decorations removed and line ends normalised; never raises."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\uff1a", ":")
    return _MD.sub("", text)


def _label(name: str) -> re.Pattern[str]:
    # "Action:", "action :", "*Action*:" (single stars survive `clean`), "Final Action:"
    return re.compile(rf"(?<![A-Za-z])\*?{name}\*?\s*:\s*\*?", re.IGNORECASE)


def _sections(text: str, name: str, stops: tuple[str, ...]) -> list[str]:
    """Bodies of every ``name:`` label, each running to the next label in ``stops`` (or the end)."""
    out = []
    stop_re = re.compile(r"(?<![A-Za-z])\*?(?:" + "|".join(stops) + r")\*?\s*:", re.IGNORECASE) if stops else None
    for m in _label(name).finditer(text):
        body = text[m.end():]
        if stop_re is not None:
            s = stop_re.search(body)
            if s:
                body = body[:s.start()]
        out.append(body.strip())
    return out


def _first_section(text: str, name: str, stops: tuple[str, ...]) -> str | None:
    secs = _sections(text, name, stops)
    return secs[0] if secs else None


def _strip_quotes(s: str) -> str:
    s = s.strip()
    while len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'*_":
        s = s[1:-1].strip()
    for a, b in (("\u201c", "\u201d"), ("\u2018", "\u2019")):
        if s.startswith(a) and s.endswith(b):
            s = s[1:-1].strip()
    return s


# "the answer is", "final answer:", "it is" in front of an answer
_ANSWER_LEAD = re.compile(
    r"^(?:(?:with\s+)?(?:the\s+)?(?:final\s+)?answer\s*(?:is|:|=)|(?:it|this)\s+is)\s*[:\-]?\s*",
    re.IGNORECASE,
)


def _bracketed(s: str) -> str | None:
    """Content of the first bracket group at the start of ``s`` (nested same brackets collapse)."""
    s = s.lstrip()
    if not s or s[0] not in _OPEN:
        return None
    o, c = s[0], _CLOSE[s[0]]
    depth, start = 0, 0
    while start < len(s) and s[start] == o:  # [[X]] -> X
        start += 1
        depth += 1
    end = s.find(c, start)
    if end == -1:  # unclosed: rest of the line
        return s[start:].split("\n", 1)[0]
    return s[start:end]


def _bare_argument(s: str) -> str:
    """Argument written without brackets: the rest of the line, minus lead-ins and final period."""
    line = s.strip().split("\n", 1)[0].strip()
    line = line.lstrip(":-= ").strip()
    line = _ANSWER_LEAD.sub("", line).strip()
    if line.endswith(".") and not re.search(r"\b[A-Z]\.$", line):  # keep "Washington D.C."
        line = line[:-1]
    return line


def _clean_arg(arg: str) -> str:
    arg = " ".join(arg.split())
    arg = _strip_quotes(arg)
    arg = _ANSWER_LEAD.sub("", arg).strip()
    return _strip_quotes(arg).strip()


_VERB = re.compile(r"^(search|finish|lookup|look\s*up|answer|submit)\b\s*", re.IGNORECASE)
_VERB_KIND: dict[str, StudentKind] = {"search": "search", "lookup": "search", "look up": "search",
                                      "finish": "finish", "answer": "finish", "submit": "finish"}
_EXPLICIT = re.compile(r"(?<![A-Za-z])(search|finish)\s*\[([^\]\n]*)\]", re.IGNORECASE)


def _parse_action_text(a: str) -> tuple[StudentKind, str] | None:
    """``Search[X]`` / ``Finish[X]`` and lenient spellings at the start of an action body."""
    a = a.strip().lstrip("\"'").strip()
    m = _VERB.match(a)
    if m:
        verb = " ".join(m.group(1).lower().split())
        kind = _VERB_KIND[verb]
        rest = a[m.end():]
        inner = _bracketed(rest)
        arg = inner if inner is not None else _bare_argument(rest)
        arg = _clean_arg(arg)
        if arg:
            return kind, arg
        return None
    m = _EXPLICIT.search(a)  # "I will Search[X] now"
    if m:
        arg = _clean_arg(m.group(2))
        if arg:
            return _VERB_KIND[m.group(1).lower()], arg
    return None


@dataclass(frozen=True)
class StudentAction:
    """HotpotQA Student output: ``kind`` None means no valid action (see ``error``)."""

    thought: str
    kind: StudentKind | None
    arg: str
    error: str | None = None
    raw_action: str = ""

    @property
    def action(self) -> str:
        if self.kind is None:
            return ""
        return f"{self.kind.capitalize()}[{self.arg}]"


def parse_student_action(text: object) -> StudentAction:
    """Parse "Thought: ... / Action: Search[entity] | Finish[answer]"; never raises."""
    t = clean(text)
    thought = _first_section(t, "thought", ("action", "observation")) or ""
    bodies = _sections(t, "action", ("thought", "observation", "action"))
    for body in bodies:
        got = _parse_action_text(body)
        if got:
            if not thought:
                thought = t[:_label("action").search(t).start()].strip()  # type: ignore[union-attr]
            return StudentAction(thought, got[0], got[1], None, body.split("\n", 1)[0].strip())
    m = _EXPLICIT.search(t)  # no usable Action: label, but an explicit action somewhere
    if m and _clean_arg(m.group(2)):
        return StudentAction(thought or t[:m.start()].strip(), _VERB_KIND[m.group(1).lower()],
                             _clean_arg(m.group(2)), None, m.group(0))
    raw = bodies[0].split("\n", 1)[0].strip() if bodies else ""
    if bodies:
        err = f"action not understood: {raw[:80]!r}" if raw else "empty action"
    elif not t.strip():
        err = "empty output"
    else:
        err = "no 'Action:' found"
    return StudentAction(thought or t.strip(), None, "", err, raw)


_VERDICT = re.compile(r"(?<![A-Za-z])(continue|rethink)(?![A-Za-z])", re.IGNORECASE)
_VERDICT_BRACKETED = re.compile(r"[\[(<{]\s*(continue|rethink)\s*[\])>}]", re.IGNORECASE)


@dataclass(frozen=True)
class TeacherAction:
    """HotpotQA Teacher output: advice (the thought) and a [Continue] / [Rethink] verdict."""

    thought: str
    verdict: Verdict | None
    error: str | None = None

    @property
    def action(self) -> str:
        return f"[{self.verdict.capitalize()}]" if self.verdict else ""


def parse_teacher_action(text: object) -> TeacherAction:
    """Parse "Thought: ... / Action: [Continue] | [Rethink]"; never raises."""
    t = clean(text)
    thought = _first_section(t, "thought", ("action",)) or ""
    for body in _sections(t, "action", ("thought", "action", "observation")):
        m = _VERDICT_BRACKETED.search(body) or _VERDICT.match(body.lstrip("\"' ")) or _VERDICT.search(body)
        if m:
            if not thought:
                thought = t[:_label("action").search(t).start()].strip()  # type: ignore[union-attr]
            return TeacherAction(thought, m.group(1).lower(), None)  # type: ignore[arg-type]
    m = _VERDICT_BRACKETED.search(t)
    if m:
        return TeacherAction(thought or t[:m.start()].strip(), m.group(1).lower(), None)  # type: ignore[arg-type]
    err = "empty output" if not t.strip() else "no [Continue] or [Rethink] found"
    return TeacherAction(thought or t.strip(), None, err)


@dataclass(frozen=True)
class Summary:
    text: str
    error: str | None = None


def parse_summary(text: object) -> Summary:
    """Parse "Summary: ..." (up to the next ``Label:`` line). Text without the label is refused, as in
    the official code (small models often answer the context prompt with unrelated text)."""
    t = clean(text)
    m = _label("summary").search(t)
    if not m:
        return Summary("", "empty output" if not t.strip() else "no 'Summary:' found")
    body = t[m.end():]
    nxt = re.search(r"\n\s*[A-Z][A-Za-z ]{0,20}:", body)
    if nxt:
        body = body[:nxt.start()]
    body = body.strip()
    if not body:
        return Summary("", "empty summary")
    return Summary(body)


_LETTER = r"([A-Da-d])"
_CHOICE_BODY = re.compile(r"^[\s\"'(\[]*(?:option|choice|answer)?\s*[(\[]?\s*" + _LETTER + r"(?![A-Za-z0-9])",
                          re.IGNORECASE)
_ANSWER_IS = re.compile(
    r"(?:answer|choice|option)\s+(?:is|would be|should be|=)\s*:?\s*[(\[\"']?\s*(?:option\s+)?" + _LETTER
    + r"(?![A-Za-z0-9])", re.IGNORECASE)


@dataclass(frozen=True)
class StudentChoice:
    """MMLU Student output: rationale and a choice letter (None: no readable choice)."""

    rationale: str
    choice: str | None
    error: str | None = None


def _letter_ok(m: re.Match[str], body: str) -> bool:
    # a lowercase "a" is an article unless it stands alone: "a)", "a.", "(a)", "a" at the end
    if m.group(1).isupper():
        return True
    after = body[m.end():].lstrip(" ")
    return not after or after[0] in ").]:,\n"


def parse_choice(text: object, choices: list[str] | None = None) -> StudentChoice:
    """Parse "Rationale: ... / Choice: A-D"; also "Choice: (B)", "The answer is C", an option's text."""
    t = clean(text)
    rationale = _first_section(t, "rationale", ("choice", "final answer", "answer")) or ""
    for name in ("choice", "final answer", "answer"):
        for body in _sections(t, name, ("rationale", "choice", "feedback")):
            m = _CHOICE_BODY.match(body)
            if m and _letter_ok(m, body):
                return StudentChoice(rationale or t[:_label(name).search(t).start()].strip(),  # type: ignore[union-attr]
                                     m.group(1).upper())
            if choices:
                line = _strip_quotes(body.split("\n", 1)[0].strip().rstrip("."))
                for i, c in enumerate(choices[:4]):
                    if line and line.lower() == str(c).strip().lower():
                        return StudentChoice(rationale, "ABCD"[i])
    found = list(_ANSWER_IS.finditer(t))
    m = found[-1] if found else None  # the last "the answer is X" is the conclusion
    if m is not None and _letter_ok(m, t):
        return StudentChoice(rationale or t[:m.start()].strip(), m.group(1).upper())
    err = "empty output" if not t.strip() else "no choice A-D found"
    return StudentChoice(rationale or t.strip(), None, err)


@dataclass(frozen=True)
class TeacherReview:
    """MMLU Teacher output: feedback and the Submit flag (None: unreadable, treated as 0)."""

    feedback: str
    submit: bool | None
    error: str | None = None


_SUBMIT = re.compile(r"^[\s\"'(\[<]*(1|0|yes|no|true|false)(?![A-Za-z0-9])", re.IGNORECASE)


def parse_review(text: object) -> TeacherReview:
    """Parse "Feedback: ... / Submit: 0|1" (also yes/no, true/false, "<1>"); never raises."""
    t = clean(text)
    feedback = _first_section(t, "feedback", ("submit",)) or ""
    for body in _sections(t, "submit", ("feedback", "submit")):
        m = _SUBMIT.match(body)
        if m:
            if not feedback:
                feedback = t[:_label("submit").search(t).start()].strip()  # type: ignore[union-attr]
            return TeacherReview(feedback, m.group(1).lower() in ("1", "yes", "true"))
    err = "empty output" if not t.strip() else "no 'Submit: 0|1' found"
    return TeacherReview(feedback or t.strip(), None, err)


_YES_NO = re.compile(r"^(yes|no)\b", re.IGNORECASE)
_ANSWER_LABEL = re.compile(r"^\s*(?:final\s+)?answer\s*(?:is)?\s*[:\-]?\s*", re.IGNORECASE)


def parse_short_answer(text: object) -> str:
    """The answer of a short-answer reply ("Answer: X"): first line, label, quotes, brackets and a
    trailing full stop removed; a reply opening with yes/no is that word. Returns "" for nothing."""
    t = clean(text).strip()
    t = _ANSWER_LABEL.sub("", t, count=1)
    t = t.split("\n", 1)[0].strip()
    m = _EXPLICIT.search(t)
    if m:
        t = m.group(2)
    t = t.strip().strip("[]()").strip()
    t = _strip_quotes(t).rstrip(".").strip()
    y = _YES_NO.match(t)
    if y and (len(t) == len(y.group(1)) or not t[len(y.group(1))].isalnum()):
        return y.group(1).lower()
    return t


# ------------------------------------------------------------------ haps.metrics.extract_choice_letter
from haps.metrics import normalize_answer  # noqa: E402

_LETTER_PATTERNS = [
    # "Answer: B", "answer is (C)", "final answer: **D**", "Finish[A]"
    re.compile(r"(?:final\s+answer|answer|finish|option|choice)\s*(?:is|:|=|\[)?\s*[\(\[\*\s]*((?-i:[A-D]))\b", re.I),
    re.compile(r"^\s*[\(\[\*]*([A-D])(?:[\)\]\.\:\*]+|\s*$)"),  # "B", "(B) ...", "B. ...", "**B**"
    re.compile(r"[\(\[]([A-D])[\)\]]"),  # "... (C) ..."
]


def extract_choice_letter(text, choices=None):
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
