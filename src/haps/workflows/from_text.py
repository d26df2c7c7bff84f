"""A problem from plain text: what `haps serve` reads from a chat message and `haps.api` from a string.

Accepted formats (the README lists them too):

- ``mmlu``: the question, then its four options, one per line, lettered ``A.`` to ``D.`` (``A)``,
  ``(A)`` and ``A:`` work too); the question may span several lines::

      Which gas do plants absorb?
      A. Oxygen
      B. Carbon dioxide
      C. Nitrogen
      D. Helium

- ``hotpotqa``: the question, then a line ``Context:`` (or ``Passages:``) and one paragraph per line as
  ``Title: text`` (the Student searches these paragraphs; at least one is needed)::

      Which city is the capital of the country where the Nile ends?
      Context:
      Egypt: Egypt is a country ... Its capital is Cairo.
      Nile: The Nile flows north into the Mediterranean Sea in Egypt.

- any other workflow: its class's ``problem_from_text(text, problem_id)`` classmethod when it defines
  one, else the whole text is the question (``Problem(question=text, gold="")``).

The problem has no reference answer (``gold`` is empty): an answer from text is never scored.
A text that does not fit its format raises `DataError` saying which format is expected.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from haps.errors import DataError
from haps.problem import Problem

_OPTION = re.compile(r"^\s*\(?([A-Da-d])\s*[.):]\s*(.*\S)\s*$")
_CONTEXT = re.compile(r"^\s*(context|passages)\s*:\s*$", re.IGNORECASE)

MMLU_FORMAT = ("the question followed by its four options, one per line: 'A. ...', 'B. ...', 'C. ...', 'D. ...' "
               "(also 'A)', '(A)' or 'A:')")
HOTPOTQA_FORMAT = ("the question, then a line 'Context:' and one paragraph per line as 'Title: text' (at least "
                   "one paragraph: the Student searches them)")


def mmlu_from_text(text: str, problem_id: str = "request") -> Problem:
    """The question and its options A-D (the last four lines that are options A, B, C, D in order)."""
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    if len(lines) < 5:
        raise DataError(f"an MMLU question needs {MMLU_FORMAT}; got {len(lines)} non-empty line(s).")
    tail = lines[-4:]
    matches = [_OPTION.match(ln) for ln in tail]
    letters = [m.group(1).upper() if m else None for m in matches]
    if letters != ["A", "B", "C", "D"]:
        found = [ln.strip()[:40] for ln, m in zip(tail, matches, strict=True) if not m]
        raise DataError(f"an MMLU question needs {MMLU_FORMAT}; the last four lines are options "
                        f"{[x for x in letters if x] or 'none'}" + (f" (not options: {found})" if found else "") + ".")
    question = "\n".join(lines[:-4]).strip()
    choices = [m.group(2).strip() for m in matches if m]
    return Problem(id=problem_id, task="mmlu", question=question, gold="", choices=choices, subject=None,
                   meta={"source": "text"})


def hotpotqa_from_text(text: str, problem_id: str = "request") -> Problem:
    """The question and the paragraphs after its ``Context:`` line."""
    lines = str(text).strip().splitlines()
    at = next((i for i, ln in enumerate(lines) if _CONTEXT.match(ln)), None)
    if at is None:
        raise DataError(f"a HotpotQA question needs {HOTPOTQA_FORMAT}; no 'Context:' line found.")
    question = "\n".join(lines[:at]).strip()
    if not question:
        raise DataError(f"a HotpotQA question needs {HOTPOTQA_FORMAT}; the question before 'Context:' is empty.")
    context: list[tuple[str, list[str]]] = []
    for ln in lines[at + 1:]:
        if not ln.strip():
            continue
        title, sep, body = ln.partition(":")
        if not sep or not title.strip() or not body.strip():
            raise DataError(f"a HotpotQA paragraph must be 'Title: text', got {ln.strip()[:60]!r}.")
        context.append((title.strip(), [body.strip()]))
    if not context:
        raise DataError(f"a HotpotQA question needs {HOTPOTQA_FORMAT}; no paragraph after 'Context:'.")
    return Problem(id=problem_id, task="hotpotqa", question=question, gold="", context=context,
                   meta={"source": "text"})


#: workflow name -> parser of the built-in formats
TEXT_FORMATS: dict[str, Callable[[str, str], Problem]] = {"mmlu": mmlu_from_text, "hotpotqa": hotpotqa_from_text}
#: workflow name -> the format a message must have, as error messages and the README say it
FORMAT_HELP: dict[str, str] = {"mmlu": MMLU_FORMAT, "hotpotqa": HOTPOTQA_FORMAT}


def problem_from_text(workflow, text: str, problem_id: str = "request") -> Problem:
    """``text`` as a problem of ``workflow`` (an instance or class; see the module docstring)."""
    if not str(text).strip():
        raise DataError("the problem text is empty; send the question in the last user message.")
    name = getattr(workflow, "name", "")
    own = getattr(workflow, "problem_from_text", None)
    if callable(own):
        problem = own(text, problem_id)
    elif name in TEXT_FORMATS:
        problem = TEXT_FORMATS[name](text, problem_id)
    else:
        problem = Problem(id=problem_id, task=name, question=str(text).strip(), gold="", meta={"source": "text"})
    problem.task = name or problem.task
    return problem
