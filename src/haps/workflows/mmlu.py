"""MMLU Teacher/Student system (paper, Appendix B, Algorithm 2).

Per round t = 1..K (default K = 3):

1. Student: Rationale + Choice (A-D), seeing the question, its own last choice and rationale, and
   the Teacher's last feedback.
2. Teacher: Feedback + Submit (0/1) on the Student's current solution. Submit 1 ends the episode.

After K rounds the episode ends anyway. The answer is the Student's last choice (the last one
that parsed, if the final round's did not). No retrieval, no summaries. Scored by accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from haps.errors import DataError
from haps.models.types import Generation
from haps.problem import Problem, need, need_text
from haps.workflows.base import (
    EpisodeState,
    PendingCall,
    Style,
    Workflow,
    generation_error,
    generation_text,
    register_workflow,
)
from haps.workflows.parsing import parse_choice, parse_choice_strict, parse_review, parse_review_strict
from haps.workflows.prompts import FIRST_ROUND, MMLU_STUDENT, MMLU_TEACHER

LETTERS = "ABCD"


class MMLUOptions(BaseModel):
    """Options of the MMLU workflow (`get_workflow("mmlu", **options)`)."""

    model_config = ConfigDict(extra="forbid")

    rounds: int = Field(default=3, ge=1, description="K: at most this many Student/Teacher rounds (paper: 3).")
    parsing: Literal["lenient", "strict"] = Field(
        default="lenient", description="How the agents' replies are read: 'lenient' (\"The answer is C\", an "
        "option's text, yes/no; `haps.workflows.parsing`) or 'strict' (exactly 'Choice: A-D' and 'Submit: 0|1').")


def format_question(problem) -> str:
    """The question followed by its options "A. ..." to "D. ..."."""
    choices = list(problem.choices or [])
    lines = [str(problem.question).strip()]
    lines += [f"{LETTERS[i]}. {str(c).strip()}" for i, c in enumerate(choices[:4])]
    return "\n".join(lines)


@dataclass
class MMLUState(EpisodeState):
    phase: str = "student"  # student | teacher
    last_solution: str = FIRST_ROUND
    last_feedback: str = FIRST_ROUND


@register_workflow("mmlu")
class MMLUWorkflow(Workflow):
    task_description = ("Multiple-choice questions over 57 subjects (MMLU): a Student answers with a rationale "
                        "and a choice A-D; a Teacher gives feedback and decides when to submit. Scored by accuracy.")
    role_definitions = {
        "teacher": "Teacher: reviews the Student's choice and rationale, gives feedback, decides to submit or not.",
        "student": "Student: analyses the question, picks one option A-D and revises it after feedback.",
    }

    metric = "accuracy"
    stratify_by = "subject"  # the paper stratifies MMLU's splits by subject
    options_model = MMLUOptions
    demo_data = "haps.demo_data:demo_mmlu.jsonl"
    options: MMLUOptions

    @classmethod
    def load_record(cls, rec: dict[str, Any]) -> Problem:
        """``{id, subject, question, choices: [4 strings], answer: "A".."D" or 0..3}``."""
        pid = need(rec, "id", (str, int), "the question id, e.g. 'anatomy/test/3'")
        question = need_text(rec, "question", "the question text")
        subject = need(rec, "subject", str, "the MMLU subject, e.g. 'anatomy'")
        choices = need(rec, "choices", list, "the 4 answer options")
        if len(choices) != 4 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"field 'choices' must hold exactly 4 strings (options A-D), got {len(choices)}: "
                            f"{str(choices)[:80]!r}")
        answer = rec.get("answer")
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < 4:
            answer = LETTERS[answer]  # Hugging Face / CSV style 0..3
        if not isinstance(answer, str) or answer.strip().upper() not in tuple(LETTERS):
            raise DataError(f"field 'answer' must be a letter A-D (or an index 0-3), got {answer!r}")
        return Problem(id=str(pid), task=cls.name, question=question, gold=answer.strip().upper(),
                       choices=list(choices), subject=subject, meta={})

    @classmethod
    def dump_record(cls, problem: Problem) -> dict[str, Any]:
        return {"id": problem.id, "subject": problem.subject, "question": problem.question,
                "choices": list(problem.choices or []), "answer": problem.gold}

    def problem_text(self, problem) -> str:
        return format_question(problem)

    def gold(self, problem) -> str:
        return str(problem.gold)

    def score(self, problem, prediction: str | None) -> tuple[float, float]:
        from haps.metrics import choice_accuracy

        acc = float(choice_accuracy(prediction or "", problem.gold))
        return acc, acc

    def start(self, problem, styles: Mapping[str, Style] | None = None) -> MMLUState:
        state = MMLUState(problem=problem, styles=self._styles(styles), round=1)
        self._ask_student(state)
        return state

    def advance(self, state: MMLUState, role: str, generation: Generation) -> None:  # type: ignore[override]
        call = self._take(state, role)
        if state.phase == "student":
            text = MMLU_STUDENT.full_output(state.styles["student"], generation_text(generation))
            parse = parse_choice_strict if self.options.parsing == "strict" else parse_choice
            sol = parse(text, list(state.problem.choices or []))
            self._record(state, call, generation, text, action=f"Choice: {sol.choice}" if sol.choice else None,
                         parse_error=sol.error or generation_error(generation))
            if sol.choice is not None:
                state.prediction = sol.choice
            rationale = sol.rationale or "(no rationale)"
            state.last_solution = f"Rationale: {rationale}\nChoice: {sol.choice or '(none)'}"
            state.phase = "teacher"
            values = {"question": format_question(state.problem), "current_solution": state.last_solution}
            state.waiting = [PendingCall("teacher", MMLU_TEACHER.request(
                state.styles["teacher"], values, tag=f"{state.problem.id}/teacher"))]
        else:
            text = MMLU_TEACHER.full_output(state.styles["teacher"], generation_text(generation))
            rev = (parse_review_strict if self.options.parsing == "strict" else parse_review)(text)
            self._record(state, call, generation, text,
                         action=None if rev.submit is None else f"Submit: {int(rev.submit)}",
                         parse_error=rev.error or generation_error(generation))
            if rev.submit or state.round >= self.options.rounds:
                state.finished = True
                state.waiting = []
                return
            state.last_feedback = rev.feedback or "(no feedback)"
            state.round += 1
            self._ask_student(state)

    def _ask_student(self, state: MMLUState) -> None:
        state.phase = "student"
        values = {"question": format_question(state.problem), "last_solution": state.last_solution,
                  "last_feedback": state.last_feedback}
        state.waiting = [PendingCall("student", MMLU_STUDENT.request(
            state.styles["student"], values, tag=f"{state.problem.id}/student"))]
