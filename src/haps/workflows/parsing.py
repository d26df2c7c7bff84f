"""Robust parsers of agent outputs. None of them raises: a failure comes back as ``error`` (a short
reason) on the result, and the workflow records it on the turn (``Turn.parse_error``) and goes on.

What each workflow does with a failure (mirrors the paper's released HotpotQA code):

* HotpotQA Student, a round with search budget left: the action counts as invalid, no retrieval
  happens, the round is spent, and the Teacher sees "could not parse the action" as the Student's
  action (the official code does the same with its "Invalid output format" marker).
* HotpotQA Student, the last round (no budget): anything but ``Finish[...]`` leads, by default, to one
  short answer call (``parse_short_answer``); with ``forced_answer="null"`` it ends the episode with a
  null answer ("" scores 0), as the official code does; ``forced_answer="take"`` takes the argument of
  whatever action was given.
* HotpotQA Teacher: no verdict; the Student sees an "invalid feedback" notice as the advice.
* Summaries (context prompts): a reply without "Summary:" fails; the previous summary is kept,
  prefixed with a note that the update failed (as in the official code).
* MMLU Student: no choice this round; the episode's answer is the last choice that did parse.
* MMLU Teacher: an unreadable ``Submit`` counts as 0 (keep revising).

Leniency: labels are matched case-insensitively, with any spacing, markdown bold/italics/headings
and backticks ignored; actions may lack brackets or use (), {} or <>; extra text after an action is
dropped; "Action: finish the answer is X" gives Finish[X]; when no ``Action:`` label is present an
explicit ``Search[...]`` / ``Finish[...]`` anywhere in the text is taken. When a model writes several
``Action:`` lines (it hallucinated further rounds), the first one that parses wins.

Strict parsing (workflow option ``parsing: strict``, the ``paper`` profile): `parse_student_action_strict`,
`parse_teacher_action_strict`, `parse_choice_strict` and `parse_review_strict` accept only the exact
format the prompts ask for, as the authors' HotpotQA code does (see the section at the end); anything
else is a parse failure, with the consequences listed above.

Never invent, always finish: every answer a parser returns is a piece of the output (after `clean`,
with whitespace runs collapsed; a yes/no answer lower-cased) or a choice letter A-D, and every parser
runs in time linear in the output (up to the length of the MMLU options), so a 1 MB reply costs
milliseconds: no regular expression here can backtrack over a long run of text more than once.
Semantics are those of the plain regular-expression versions kept as the test oracle
(tests/parsing_reference.py); tests/test_parsing_fuzz.py holds the two equal and times both.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Literal

StudentKind = Literal["search", "finish"]
Verdict = Literal["continue", "rethink"]

_OPEN = "[({<"
_CLOSE = {"[": "]", "(": ")", "{": "}", "<": ">"}
# Markdown emphasis, headings at line start, backticks, bullets. The reference pattern is
#     \*\*|__|`|^\s{0,3}#{1,6}\s*|^\s*[-*>]\s+        (re.MULTILINE)
# whose bullet branch, tried at every line start inside a long run of blank lines, rescans the run each
# time (quadratic). Only the first line start of a whitespace run can begin a bullet match (a later one
# sees the same end of the run), so the bullet branch runs from the start of the run instead, keeping
# the whitespace before that first line start (group 1): at the string start, after a non-space, or,
# with no whitespace left, right at a line start (the run before it went to the previous match).
_MD = re.compile(r"\*\*|__|`|^\s{0,3}#{1,6}\s*|\A\s*+[-*>]\s+|^[-*>]\s+|(?<=\S)([^\S\n]*\n)\s*+[-*>]\s+",
                 re.MULTILINE)


def _md_keep(m: re.Match[str]) -> str:
    return m.group(1) or ""


def clean(text: object) -> str:
    """Text with markdown decorations removed and line ends normalised; never raises."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\uff1a", ":")
    return _MD.sub(_md_keep, text)


def _label(name: str) -> re.Pattern[str]:
    # "Action:", "action :", "*Action*:" (single stars survive `clean`), "Final Action:"
    return re.compile(rf"(?<![A-Za-z])\*?{name}\*?\s*:\s*\*?", re.IGNORECASE)


def _section_spans(text: str, name: str, stops: tuple[str, ...]) -> list[tuple[int, int]]:
    """(start, end) of the body of every ``name:`` label: from the label to the next label in ``stops``
    (or the end of the text), whitespace at both ends excluded (``text[start:end]`` is the body).

    Labels whose bodies run to the same stop share one search for it and one trailing-whitespace scan,
    so many labels before one stop cost a single pass (they were a pass each).
    """
    stop_re = re.compile(r"(?<![A-Za-z])\*?(?:" + "|".join(stops) + r")\*?\s*:", re.IGNORECASE) if stops else None
    n = len(text)
    out = []
    searched_from, stop_at = n + 1, n  # the last stop search: from where, and the stop it found (n: none)
    trimmed: dict[int, int] = {}  # end -> end with trailing whitespace excluded
    for m in _label(name).finditer(text):
        start = m.end()
        if stop_re is None:
            end = n
        else:
            if not searched_from <= start <= stop_at:
                s = stop_re.search(text, start)
                searched_from, stop_at = start, (s.start() if s else n)
            end = stop_at
        if end not in trimmed:
            e = end
            while e > 0 and text[e - 1].isspace():
                e -= 1
            trimmed[end] = e
        end = max(start, trimmed[end])
        while start < end and text[start].isspace():
            start += 1
        out.append((start, end))
    return out


def _sections(text: str, name: str, stops: tuple[str, ...]) -> list[str]:
    """Bodies of every ``name:`` label, each running to the next label in ``stops`` (or the end), stripped.
    Only for ``stops`` that include ``name`` (bodies do not overlap, so their total length is at most
    the text's); `parse_choice` works on `_section_spans` directly."""
    return [text[a:b] for a, b in _section_spans(text, name, stops)]


def _first_section(text: str, name: str, stops: tuple[str, ...]) -> str | None:
    m = _label(name).search(text)
    if m is None:
        return None
    body = text[m.end():]
    if stops:
        s = re.compile(r"(?<![A-Za-z])\*?(?:" + "|".join(stops) + r")\*?\s*:", re.IGNORECASE).search(body)
        if s:
            body = body[:s.start()]
    return body.strip()


def _strip_quotes(s: str) -> str:
    s = s.strip()
    i, j = 0, len(s)  # s[i:j] is the result so far (one copy at the end, not one per quote pair)
    while j - i >= 2 and s[i] == s[j - 1] and s[i] in "\"'*_":
        i, j = i + 1, j - 1
        while i < j and s[i].isspace():
            i += 1
        while j > i and s[j - 1].isspace():
            j -= 1
    s = s[i:j]
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
# An explicit action anywhere: (?<![A-Za-z])(search|finish)\s*\[([^\]\n]*)\]  (case-insensitive).
# As one pattern, every "Search[" before the same unclosed line rescans it; `_explicit` finds the
# openings with `_EXPLICIT_OPEN` and each closing bracket or line end once.
_EXPLICIT_OPEN = re.compile(r"(?<![A-Za-z])(search|finish)\s*+\[", re.IGNORECASE)
_ARG_END = re.compile(r"[\]\n]")


@dataclass(frozen=True)
class _Explicit:
    """The first explicit ``Search[...]`` / ``Finish[...]`` of a text: where it starts, its verb, its
    argument (up to the first ``]``, on one line) and the whole action text."""

    start: int
    verb: str
    arg: str
    whole: str


def _explicit(text: str) -> _Explicit | None:
    searched_from, term = len(text) + 1, len(text)  # the last search for "]" or a line end
    for m in _EXPLICIT_OPEN.finditer(text):
        if not searched_from <= m.end() <= term:
            t = _ARG_END.search(text, m.end())
            searched_from, term = m.end(), (t.start() if t else len(text))
        if term < len(text) and text[term] == "]":
            return _Explicit(m.start(), m.group(1), text[m.end():term], text[m.start():term + 1])
    return None


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
    e = _explicit(a)  # "I will Search[X] now"
    if e:
        arg = _clean_arg(e.arg)
        if arg:
            return _VERB_KIND[e.verb.lower()], arg
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
    e = _explicit(t)  # no usable Action: label, but an explicit action somewhere
    if e and _clean_arg(e.arg):
        return StudentAction(thought or t[:e.start].strip(), _VERB_KIND[e.verb.lower()], _clean_arg(e.arg), None,
                             e.whole)
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


# The next "Label:" line after a summary. Reference: \n\s*[A-Z][A-Za-z ]{0,20}: (tried at every newline
# of a long blank run, rescanning it: quadratic). Only the run's first newline can match first, so the
# search starts at the start of the whitespace run; the body is cut there (the cut whitespace is
# stripped anyway).
_NEXT_LABEL = re.compile(r"(?<!\s)[^\S\n]*\n\s*+[A-Z][A-Za-z ]{0,20}:")


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
    nxt = _NEXT_LABEL.search(body)
    if nxt:
        body = body[:nxt.start()]
    body = body.strip()
    if not body:
        return Summary("", "empty summary")
    return Summary(body)


_LETTER = r"([A-Da-d])"
# Reference patterns (their optional whitespace parts overlap, so a long run of spaces before a
# non-letter backtracks cubically):
#   ^[\s"'(\[]*(?:option|choice|answer)?\s*[(\[]?\s*([A-Da-d])(?![A-Za-z0-9])
#   (?:answer|choice|option)\s+(?:is|would be|should be|=)\s*:?\s*[(\["']?\s*(?:option\s+)?([A-Da-d])(?![A-Za-z0-9])
# The same languages with possessive parts (none of them can give a character back to a later part and
# still match: the letter and the words are outside every whitespace/bracket class). Used with
# ``match(text, start, end)``, so no ``^``.
_CHOICE_BODY = re.compile(r"[\s\"'(\[]*+(?:(?:option|choice|answer)\s*+[(\[]?+\s*+)?" + _LETTER
                          + r"(?![A-Za-z0-9])", re.IGNORECASE)
_ANSWER_IS = re.compile(
    r"(?:answer|choice|option)\s++(?:is|would be|should be|=)\s*+:?+\s*+[(\[\"']?+\s*+(?:option\s++)?" + _LETTER
    + r"(?![A-Za-z0-9])", re.IGNORECASE)
# characters `parse_choice` may strip off the front / the back of an option's line
_LEAD_STRIPPED = frozenset("\"'*_\u201c\u2018")
_TRAIL_STRIPPED = frozenset("\"'*_.\u201d\u2019")


@dataclass(frozen=True)
class StudentChoice:
    """MMLU Student output: rationale and a choice letter (None: no readable choice)."""

    rationale: str
    choice: str | None
    error: str | None = None


def _letter_ok(m: re.Match[str], text: str, end: int) -> bool:
    # a lowercase "a" is an article unless it stands alone: "a)", "a.", "(a)", "a" at the end
    # (of ``text[:end]``, whose trailing whitespace the caller has excluded)
    if m.group(1).isupper():
        return True
    k = m.end()
    while k < end and text[k] == " ":
        k += 1
    return k >= end or text[k] in ").]:,\n"


def _option_line(t: str, start: int, end: int, newlines: list[int], longest: int,
                 kept_end: dict[int, int]) -> str | None:
    """The first line of the body ``t[start:end]`` as `parse_choice` compares it with the options, or
    None when it is too long to equal any: its part that no strip can remove is longer than the longest
    option (lower-casing never shortens a string). This keeps many labels on one long line from copying
    that line once each. ``kept_end`` caches, per line end, where its strippable tail begins."""
    i = bisect.bisect_left(newlines, start)
    stop = min(end, newlines[i]) if i < len(newlines) else end
    a = start
    while a < stop and (t[a] in _LEAD_STRIPPED or t[a].isspace()):
        a += 1
    if stop not in kept_end:
        line_start = newlines[i - 1] + 1 if i > 0 else 0
        b = stop
        while b > line_start and (t[b - 1] in _TRAIL_STRIPPED or t[b - 1].isspace()):
            b -= 1
        kept_end[stop] = b
    if kept_end[stop] - a > longest:
        return None
    return _strip_quotes(t[start:stop].strip().rstrip("."))


def parse_choice(text: object, choices: list[str] | None = None) -> StudentChoice:
    """Parse "Rationale: ... / Choice: A-D"; also "Choice: (B)", "The answer is C", an option's text."""
    t = clean(text)
    rationale = _first_section(t, "rationale", ("choice", "final answer", "answer")) or ""
    options = [str(c).strip().lower() for c in (choices or [])[:4]]
    longest = max((len(o) for o in options), default=0)
    newlines: list[int] | None = None
    kept_end: dict[int, int] = {}
    for name in ("choice", "final answer", "answer"):
        # "final answer" and "answer" bodies may overlap (their stops do not include themselves): spans
        for start, end in _section_spans(t, name, ("rationale", "choice", "feedback")):
            m = _CHOICE_BODY.match(t, start, end)
            if m and _letter_ok(m, t, end):
                return StudentChoice(rationale or t[:_label(name).search(t).start()].strip(),  # type: ignore[union-attr]
                                     m.group(1).upper())
            if options:
                if newlines is None:
                    newlines = [nl.start() for nl in re.finditer("\n", t)]
                line = _option_line(t, start, end, newlines, longest, kept_end)
                for i, c in enumerate(options):
                    if line and line.lower() == c:
                        return StudentChoice(rationale, "ABCD"[i])
    found = list(_ANSWER_IS.finditer(t))
    m = found[-1] if found else None  # the last "the answer is X" is the conclusion
    if m is not None and _letter_ok(m, t, len(t)):
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
    e = _explicit(t)
    if e:
        t = e.arg
    t = t.strip().strip("[]()").strip()
    t = _strip_quotes(t).rstrip(".").strip()
    y = _YES_NO.match(t)
    if y and (len(t) == len(y.group(1)) or not t[len(y.group(1))].isalnum()):
        return y.group(1).lower()
    return t


# ------------------------------------------------------------------------ strict parsing (paper profile)
# The official HotpotQA code (zihangtian/HAPS, HotpotQA/agent.py) reads an agent's reply with
#     thought = re.search(r"\bThought:\s*(.*?)(?=\n\s*Action:|\Z)", s, re.DOTALL | re.IGNORECASE)
#     action  = re.search(r"\bAction:\s*(.*)", s, re.DOTALL | re.IGNORECASE)   # both required
# cuts the action after its first "]", and takes action[:6] == "Search" / "Finish" with the argument
# action[7:-1]. The strict parsers below accept exactly that format and nothing else: no markdown removal,
# no other spellings, brackets required (where the official slice would cut the last character off an
# unbracketed argument, they refuse the action). Same linear-time rule as above: the thought's end is found
# from the "Action:" labels, each scanning only the whitespace run before it.
_STRICT_LABELS = {name: re.compile(rf"\b{name}:", re.IGNORECASE)
                  for name in ("thought", "action", "rationale", "choice", "feedback", "submit")}


def _strict_pair(text: str, first: str, second: str) -> tuple[str, str] | None:
    """(body of the first ``first:`` up to a line starting with ``second:`` or the end, body of the first
    ``second:`` to the end), both stripped; None when either label is missing (the official `_tNaparse`)."""
    m1, m2 = _STRICT_LABELS[first].search(text), _STRICT_LABELS[second].search(text)
    if m1 is None or m2 is None:
        return None
    start = m1.end()
    while start < len(text) and text[start].isspace():
        start += 1
    end = len(text)
    for m in _STRICT_LABELS[second].finditer(text, start):
        k = m.start()
        first_nl = None
        while k > start and text[k - 1].isspace():  # the whitespace run before the label
            k -= 1
            if text[k] == "\n":
                first_nl = k
        if first_nl is not None:
            end = first_nl
            break
    return text[start:end].strip(), text[m2.end():].strip()


def _strict_text(text: object) -> str:
    return ("" if text is None else str(text)).strip()


def parse_student_action_strict(text: object) -> StudentAction:
    """The official HotpotQA Student format only: ``Thought: ...`` then ``Action: Search[X]`` or
    ``Action: Finish[X]`` (verbs as written, brackets required); never raises."""
    t = _strict_text(text)
    pair = _strict_pair(t, "thought", "action")
    if pair is None:
        return StudentAction(t, None, "", "empty output" if not t else "no 'Thought:' and 'Action:' (strict)", "")
    thought, action = pair
    close = action.find("]")
    if close != -1:
        action = action[:close + 1]
    for verb, kind in (("Search[", "search"), ("Finish[", "finish")):
        if action.startswith(verb) and action.endswith("]"):
            return StudentAction(thought, kind, action[len(verb):-1].strip(), None, action)  # type: ignore[arg-type]
    return StudentAction(thought, None, "", f"action not in the official format: {action[:80]!r}", action)


def parse_teacher_action_strict(text: object) -> TeacherAction:
    """The official HotpotQA Teacher format only: ``Thought: ...`` then ``Action: [Continue]`` or
    ``Action: [Rethink]``; never raises."""
    t = _strict_text(text)
    pair = _strict_pair(t, "thought", "action")
    if pair is None:
        return TeacherAction(t, None, "empty output" if not t else "no 'Thought:' and 'Action:' (strict)")
    thought, action = pair
    close = action.find("]")
    action = action[:close + 1] if close != -1 else action
    verdict = {"[Continue]": "continue", "[Rethink]": "rethink"}.get(action)
    if verdict is None:
        return TeacherAction(thought, None, f"action not in the official format: {action[:80]!r}")
    return TeacherAction(thought, verdict, None)  # type: ignore[arg-type]


_STRICT_LETTER = re.compile(r"\s*([ABCD])(?![A-Za-z0-9])")
_STRICT_SUBMIT = re.compile(r"\s*([01])(?![A-Za-z0-9])")


def _strict_lead(t: str, label: str, until: re.Match[str]) -> str:
    """The body of the first ``label:`` before ``until`` (a later label), stripped; "" when there is none."""
    m = _STRICT_LABELS[label].search(t, 0, until.start())
    return t[m.end():until.start()].strip() if m else ""


def parse_choice_strict(text: object, choices: list[str] | None = None) -> StudentChoice:
    """MMLU Student in the prompt's format only: the first ``Choice:`` label followed by a capital A-D (the
    rationale: the ``Rationale:`` body before it); never raises. (The authors released no MMLU code; this is
    the format the prompt asks for.)"""
    t = _strict_text(text)
    m = _STRICT_LABELS["choice"].search(t)
    letter = _STRICT_LETTER.match(t, m.end()) if m else None
    if m is None or letter is None:
        err = "empty output" if not t else "no 'Choice: A-D' (strict)"
        return StudentChoice(t, None, err)
    return StudentChoice(_strict_lead(t, "rationale", m), letter.group(1))


def parse_review_strict(text: object) -> TeacherReview:
    """MMLU Teacher in the prompt's format only: the first ``Submit:`` label followed by 0 or 1 (the feedback:
    the ``Feedback:`` body before it); never raises."""
    t = _strict_text(text)
    m = _STRICT_LABELS["submit"].search(t)
    flag = _STRICT_SUBMIT.match(t, m.end()) if m else None
    if m is None or flag is None:
        return TeacherReview(t, None, "empty output" if not t else "no 'Submit: 0|1' (strict)")
    return TeacherReview(_strict_lead(t, "feedback", m), flag.group(1) == "1")
