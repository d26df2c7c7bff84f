"""A workflow of your own, loaded from this file: a Solver and a Verifier on arithmetic word problems.

    haps run --workflow examples/custom_workflow.py:ArithmeticWorkflow --data examples/custom_workflow.jsonl \
        --assign solver=smollm2-135m,verifier=gemma3-270m --out runs/arith/episodes.jsonl
    haps collect --workflow examples/custom_workflow.py:ArithmeticWorkflow --data examples/custom_workflow.jsonl \
        --out runs/arith/actions -o rounds=1

Per round t = 1..K (option ``rounds``, default 2):

1. Solver: Reasoning + ``Answer: <number>``, seeing the problem, its previous solution and the Verifier's
   feedback. The answer is the number after the last ``Answer:``.
2. Verifier: its own Check + ``Verdict: correct | wrong`` + Feedback. ``correct`` ends the episode;
   ``wrong`` (or no verdict) sends the feedback back to the Solver, until K rounds are done.

The prediction is the Solver's last parsed answer (the text as the model wrote it, e.g. ``1,200``);
the metric is exact numeric equality with the reference. The parsers never raise and never invent: an
output without ``Answer:`` gives no prediction and a parse error on the turn.

What a workflow declares (see `haps.workflows.base.Workflow`): its ``name`` and ``roles``, the text the
router sees (``task_description``, ``role_definitions``, ``problem_text``), its data format
(``load_record``), its ``metric``, what collection stratifies by (``stratify_by``), its options
(``options_model``), and the per-episode state machine (``start`` / ``advance``) that the lockstep
runner drives: the workflow never calls a model itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from haps.errors import DataError
from haps.problem import Problem, need, need_text
from haps.workflows import EpisodeState, PendingCall, Workflow
from haps.workflows.base import Style, generation_error, generation_text
from haps.workflows.prompts import PromptTemplate

FIRST = "None yet: this is the first attempt."

SOLVER = PromptTemplate(
    intro=("You are the Solver agent. You solve an arithmetic word problem step by step and give the result as "
           "one number. If the Verifier has reviewed your previous solution, use its feedback."),
    inputs=(("Problem", "problem"), ("Previous solution", "previous"), ("Verifier feedback", "feedback")),
    output_format="Reasoning: <the steps of the calculation>\nAnswer: <the result as one number>",
    completion_format=("Write the steps of the calculation after 'Reasoning:', then the result as one number "
                       "after 'Answer:'."),
    answer_prefix="Reasoning:",
    example={"problem": "A box holds 12 pencils. Tom buys 3 boxes and gives away 5 pencils. How many pencils "
                        "does he have left?",
             "previous": FIRST, "feedback": FIRST,
             "output": "3 boxes hold 3 * 12 = 36 pencils. After giving 5 away he has 36 - 5 = 31.\nAnswer: 31"},
    token_hint=128,
)

VERIFIER = PromptTemplate(
    intro=("You are the Verifier agent. You check the Solver's solution of an arithmetic word problem: redo the "
           "calculation yourself and say whether the Solver's answer is correct."),
    inputs=(("Problem", "problem"), ("Solution", "solution")),
    output_format="Check: <your own calculation>\nVerdict: correct | wrong\nFeedback: <what to fix, or none>",
    completion_format=("Redo the calculation after 'Check:', then write 'Verdict: correct' or 'Verdict: wrong', "
                       "then one line after 'Feedback:'."),
    answer_prefix="Check:",
    example={"problem": "A box holds 12 pencils. Tom buys 3 boxes and gives away 5 pencils. How many pencils "
                        "does he have left?",
             "solution": "3 boxes hold 36 pencils; 36 - 5 = 29. Answer: 29",
             "output": "3 * 12 = 36 and 36 - 5 = 31, not 29.\nVerdict: wrong\nFeedback: recompute 36 - 5."},
    token_hint=96,
)

_ANSWER = re.compile(r"answer\s*[:=]\s*\**\s*\$?\s*(-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+))",
                     re.IGNORECASE)
_VERDICT = re.compile(r"verdict\s*[:=]?\s*\**\s*(incorrect|wrong|correct|right)\b", re.IGNORECASE)


def parse_answer(text: str) -> tuple[str | None, str | None]:
    """(the number after the last ``Answer:``, as written; parse error or None). Never raises."""
    try:
        found = _ANSWER.findall(str(text))
    except Exception as e:  # noqa: BLE001 - a parser must not raise
        return None, f"unparsable output ({type(e).__name__})"
    if not found:
        return None, "no 'Answer: <number>' in the output"
    return found[-1], None


def parse_verdict(text: str) -> tuple[bool | None, str | None]:
    """(True for correct, False for wrong, None if absent; parse error or None). Never raises."""
    try:
        found = _VERDICT.findall(str(text))
    except Exception as e:  # noqa: BLE001 - a parser must not raise
        return None, f"unparsable output ({type(e).__name__})"
    if not found:
        return None, "no 'Verdict: correct | wrong' in the output"
    return found[-1].lower() in ("correct", "right"), None


def to_number(text: str | None) -> float | None:
    """``"1,200"`` -> 1200.0; None for anything that is not a finite number."""
    if text is None:
        return None
    try:
        v = float(str(text).replace(",", "").strip())
    except ValueError:
        return None
    return v if math.isfinite(v) else None


class ArithmeticOptions(BaseModel):
    """Options of the arithmetic workflow (``-o rounds=1``)."""

    model_config = ConfigDict(extra="forbid")
    rounds: int = Field(default=2, ge=1, description="K: at most this many Solver/Verifier rounds.")


@dataclass
class ArithmeticState(EpisodeState):
    previous: str = FIRST
    feedback: str = FIRST


class ArithmeticWorkflow(Workflow):
    name = "arithmetic"
    roles = ("solver", "verifier")
    task_description = ("Arithmetic word problems: a Solver computes the answer step by step; a Verifier redoes "
                        "the calculation and accepts it or sends it back. Scored by exact numeric match.")
    role_definitions = {
        "solver": "Solver: works out the calculation and answers with one number; revises it after feedback.",
        "verifier": "Verifier: redoes the calculation, says whether the answer is correct and what to fix.",
    }
    metric = "exact number"
    stratify_by = None
    options_model = ArithmeticOptions
    options: ArithmeticOptions

    # ------------------------------------------------------------------ the task's data
    @classmethod
    def load_record(cls, rec: dict[str, Any]) -> Problem:
        """``{"id": ..., "question": "...", "answer": 42, "topic": "..."?}`` (answer: a number or numeric text)."""
        pid = need(rec, "id", (str, int), "the problem id")
        question = need_text(rec, "question", "the word problem")
        answer = need(rec, "answer", (int, float, str), "the reference number")
        value = None if isinstance(answer, bool) else to_number(answer)
        if value is None:
            raise DataError(f"field 'answer' must be a number, got {answer!r}")
        gold = str(int(value)) if value.is_integer() else repr(value)
        topic = rec.get("topic")
        if topic is not None and not isinstance(topic, str):
            raise DataError(f"field 'topic' must be a string, got {type(topic).__name__}")
        return Problem(id=str(pid), task=cls.name, question=question, gold=gold, subject=topic)

    @classmethod
    def dump_record(cls, problem: Problem) -> dict[str, Any]:
        rec: dict[str, Any] = {"id": problem.id, "question": problem.question, "answer": to_number(problem.gold)}
        if problem.subject is not None:
            rec["topic"] = problem.subject
        return rec

    def problem_text(self, problem) -> str:
        return str(problem.question)

    def gold(self, problem) -> str:
        return str(problem.gold)

    def score(self, problem, prediction: str | None) -> tuple[float, float]:
        got, want = to_number(prediction), to_number(problem.gold)
        ok = float(got is not None and want is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want)))
        return ok, ok

    # ------------------------------------------------------------------ the episode
    def start(self, problem, styles: Mapping[str, Style] | None = None) -> ArithmeticState:
        state = ArithmeticState(problem=problem, styles=self._styles(styles), round=1)
        self._ask_solver(state)
        return state

    def advance(self, state: ArithmeticState, role: str, generation) -> None:  # type: ignore[override]
        call = self._take(state, role)
        if role == "solver":
            text = SOLVER.full_output(state.styles["solver"], generation_text(generation))
            answer, error = parse_answer(text)
            self._record(state, call, generation, text, action=f"Answer: {answer}" if answer else None,
                         parse_error=error or generation_error(generation))
            if answer is not None:
                state.prediction = answer
            state.previous = " ".join(text.split())[-600:] or "(empty)"
            values = {"problem": state.problem.question, "solution": state.previous}
            state.waiting = [PendingCall("verifier", VERIFIER.request(
                state.styles["verifier"], values, tag=f"{state.problem.id}/verifier"))]
            return
        text = VERIFIER.full_output(state.styles["verifier"], generation_text(generation))
        verdict, error = parse_verdict(text)
        self._record(state, call, generation, text,
                     action=None if verdict is None else f"Verdict: {'correct' if verdict else 'wrong'}",
                     parse_error=error or generation_error(generation))
        if verdict or state.round >= self.options.rounds:
            state.finished = True
            state.waiting = []
            return
        state.feedback = " ".join(text.split())[-400:] or "(no feedback)"
        state.round += 1
        self._ask_solver(state)

    def _ask_solver(self, state: ArithmeticState) -> None:
        values = {"problem": state.problem.question, "previous": state.previous, "feedback": state.feedback}
        state.waiting = [PendingCall("solver", SOLVER.request(state.styles["solver"], values,
                                                              tag=f"{state.problem.id}/solver"))]
