"""HotpotQA Teacher/Student system (paper, Appendix B, Algorithm 1).

Per round t = 0..B (B = search budget, default 3):

1. Student: Thought + Action, Search[entity] or Finish[answer], seeing its summary (Context), the
   last search result with the Teacher's advice (Observation) and the Budget. Finish ends the
   episode with that answer. Search retrieves the top-k passages of the problem's own paragraphs.
   On the last round (t = B) the Budget says the Student must finish. Anything else: by default
   (``forced_answer="ask"``) the Student's model answers in one short reading call over the passages
   its searches found and the best passage for the question (ours: tiny models often stop after the
   thought or copy the format's placeholders); ``"null"`` ends with a null answer (official code);
   ``"take"`` takes the argument of the action given.
2. Student summary (``summaries=True``, the paper's default): the Student's model merges this round
   into its running summary (the Context prompt, Figure 9). One extra call.
3. Teacher: Thought (the advice) + Action [Continue] / [Rethink], seeing its own summary, its previous
   advice and the Student's action with the search result.
4. Teacher summary (``summaries=True``): as 2, with the Teacher's model (Figure 7).

Without summaries, each agent's Context is its raw memory (the last few actions and results),
which halves the calls. Parse failures are recorded on the turn; see `haps.workflows.parsing` for
what each one does to the episode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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
from haps.workflows.parsing import (
    StudentAction,
    TeacherAction,
    parse_short_answer,
    parse_student_action,
    parse_student_action_strict,
    parse_summary,
    parse_teacher_action,
    parse_teacher_action_strict,
)
from haps.workflows.prompts import (
    BUDGET_CLOSED,
    BUDGET_OPEN,
    FIRST_CONTEXT,
    HOTPOT_ANSWER,
    HOTPOT_STUDENT,
    HOTPOT_STUDENT_FINAL,
    HOTPOT_STUDENT_SUMMARY,
    HOTPOT_TEACHER,
    HOTPOT_TEACHER_SUMMARY,
    START_OBSERVATION,
)

INVALID_ACTION = "Invalid action: the output could not be parsed."
INVALID_ADVICE = "Invalid feedback: the Teacher's output could not be parsed."
SUMMARY_FAILED = "The summary update failed in the last round. The previous summary was: "
NO_RESULT = "No passage found."


class HotpotQAOptions(BaseModel):
    """Options of the HotpotQA workflow (`get_workflow("hotpotqa", **options)`)."""

    model_config = ConfigDict(extra="forbid")

    budget: int = Field(default=3, ge=0, description="Search budget B: rounds with Search allowed; "
                        "the Student must Finish on round B+1 (paper: 3).")
    top_k: int = Field(default=1, ge=1, description="Passages returned by each Search.")
    summaries: bool = Field(default=True, description="Update each agent's running summary with an extra "
                            "call of its model every round (paper: yes). Off: raw memory, half the calls.")
    forced_answer: Literal["ask", "null", "take"] = Field(
        default="ask", description="Last round without Finish: 'ask' has the Student's model answer in one "
        "short reading call over the passages found, 'null' answers nothing (official code), 'take' takes the "
        "argument of the action given.")
    answer_tokens: int = Field(default=24, ge=1, description="forced_answer='ask': tokens for the answer.")
    passage_chars: int | None = Field(default=None, ge=20, description="Cut each retrieved passage to this "
                                      "many characters (None: whole paragraph, as in the paper).")
    memory_items: int = Field(default=3, ge=1, description="summaries=False: how many past steps the raw "
                              "memory keeps.")
    parsing: Literal["lenient", "strict"] = Field(
        default="lenient", description="How the agents' actions are read: 'lenient' (other spellings, markdown, "
        "missing brackets; `haps.workflows.parsing`) or 'strict' (exactly Thought/Action with Search[X], Finish[X], "
        "[Continue], [Rethink], as the authors' code).")


@dataclass
class HotpotState(EpisodeState):
    phase: str = "student"  # student | student_answer | student_summary | teacher | teacher_summary
    student_ctx: str = FIRST_CONTEXT
    teacher_ctx: str = FIRST_CONTEXT
    student_last: tuple[str, str] | None = None  # (action, message) of the last Student round
    teacher_last: tuple[str, str] | None = None  # (action, advice) of the last Teacher round
    student_obs: str = START_OBSERVATION
    teacher_obs: str = ""
    student_act: StudentAction | None = None
    teacher_act: TeacherAction | None = None
    student_memory: list[str] = field(default_factory=list)
    teacher_memory: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)  # passages the Student's searches returned


@register_workflow("hotpotqa")
class HotpotQAWorkflow(Workflow):
    task_description = ("Multi-hop question answering (HotpotQA, distractor setting): a Student searches the "
                        "question's paragraphs and answers; a Teacher reviews each step. Scored by token F1.")
    role_definitions = {
        "teacher": "Teacher: reviews each Student step, gives advice and chooses [Continue] or [Rethink].",
        "student": "Student: reasons, searches for entities (Search[entity]) and gives the answer (Finish[answer]).",
    }

    metric = "F1"
    options_model = HotpotQAOptions
    demo_data = "haps.demo_data:demo_hotpotqa.jsonl"
    options: HotpotQAOptions

    def __init__(self, retriever=None, **options: Any) -> None:
        super().__init__(**options)
        self._retriever = retriever

    @classmethod
    def load_record(cls, rec: dict[str, Any]) -> Problem:
        """The original distractor layout ``{id, question, answer, type, level, supporting_facts: [[title,
        i]], context: [[title, [sentence, ...]]]}``; the Hugging Face column layout and ``_id`` too."""
        rec = _from_hf_layout(rec)
        pid = need(rec, "id", (str, int), "the question id")
        question = need_text(rec, "question", "the question text")
        answer = need(rec, "answer", str, "the gold answer text")
        ctx = need(rec, "context", list, "[[title, [sentence, ...]], ...] paragraphs")
        if not ctx:
            raise DataError("field 'context' is empty; a distractor item needs its paragraphs "
                            "[[title, [sentence, ...]], ...]")
        context: list[tuple[str, list[str]]] = []
        for j, para in enumerate(ctx):
            ok = (isinstance(para, list | tuple) and len(para) == 2 and isinstance(para[0], str)
                  and isinstance(para[1], list) and all(isinstance(s, str) for s in para[1]))
            if not ok:
                raise DataError(f"context[{j}] must be [title, [sentence, ...]], got {str(para)[:80]!r}")
            context.append((para[0], list(para[1])))
        sf = rec.get("supporting_facts", [])
        if not isinstance(sf, list) or not all(
            isinstance(x, list | tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], int)
            for x in sf
        ):
            raise DataError("field 'supporting_facts' must be [[title, sentence_index], ...]")
        titles = {t for t, _ in context}
        missing = sorted({t for t, _ in sf} - titles)
        if missing:
            raise DataError(f"supporting_facts name titles absent from the context: {missing}; "
                            "this is not a distractor-setting item (its gold paragraphs must be in 'context')")
        meta = {"type": rec.get("type"), "level": rec.get("level"), "supporting_facts": [(t, i) for t, i in sf]}
        return Problem(id=str(pid), task=cls.name, question=question, gold=answer, context=context, meta=meta)

    @classmethod
    def dump_record(cls, problem: Problem) -> dict[str, Any]:
        return {"id": problem.id, "question": problem.question, "answer": problem.gold,
                "type": problem.meta.get("type"), "level": problem.meta.get("level"),
                "supporting_facts": [list(x) for x in problem.meta.get("supporting_facts", [])],
                "context": [[t, list(s)] for t, s in (problem.context or [])]}

    def warm_up(self, problems) -> None:
        """Every paragraph embedded, no query embeddings cached: the same start for every timed run."""
        self.retriever.clear_cache()
        self.retriever.warm(problems)

    @property
    def retriever(self):
        """The passage retriever: given, or a `haps.retrieval.DenseRetriever` built on first use."""
        if self._retriever is None:
            from haps.retrieval import DenseRetriever

            self._retriever = DenseRetriever(top_k=self.options.top_k)
        return self._retriever

    # ------------------------------------------------------------------ interface
    def problem_text(self, problem) -> str:
        return str(problem.question)

    def gold(self, problem) -> str:
        return str(problem.gold)

    def score(self, problem, prediction: str | None) -> tuple[float, float]:
        from haps.metrics import exact_match, f1_score

        pred = prediction or ""
        return float(f1_score(pred, problem.gold)), float(exact_match(pred, problem.gold))

    def start(self, problem, styles: Mapping[str, Style] | None = None) -> HotpotState:
        state = HotpotState(problem=problem, styles=self._styles(styles))
        self._ask_student(state)
        return state

    def advance(self, state: HotpotState, role: str, generation: Generation) -> None:  # type: ignore[override]
        call = self._take(state, role)
        if state.phase == "student":
            self._on_student(state, call, generation)
        elif state.phase == "student_answer":
            self._on_forced_answer(state, call, generation)
        elif state.phase == "student_summary":
            state.student_ctx = self._on_summary(state, call, generation, state.student_ctx)
            self._ask_teacher(state)
        elif state.phase == "teacher":
            self._on_teacher(state, call, generation)
        elif state.phase == "teacher_summary":
            state.teacher_ctx = self._on_summary(state, call, generation, state.teacher_ctx)
            self._next_round(state)
        else:  # pragma: no cover - internal invariant
            raise AssertionError(f"unknown phase {state.phase!r}")

    # ------------------------------------------------------------------ steps
    def _last_round(self, state: HotpotState) -> bool:
        return state.round >= self.options.budget

    def _ask_student(self, state: HotpotState) -> None:
        state.phase = "student"
        final = self._last_round(state)
        if state.round > 0 and state.student_last and state.teacher_last:
            s_act, s_msg = state.student_last
            t_act, t_msg = state.teacher_last
            state.student_obs = f"Search Result: {s_act} {s_msg} Teacher's Advice: {t_act} {t_msg}"
        style = state.styles["student"]
        tpl = HOTPOT_STUDENT_FINAL if final and style == "completion" else HOTPOT_STUDENT
        values = {"context": state.student_ctx, "question": state.problem.question,
                  "observation": state.student_obs, "budget": BUDGET_CLOSED if final else BUDGET_OPEN}
        state.waiting = [PendingCall("student", tpl.request(style, values, tag=f"{state.problem.id}/student"))]

    def _on_student(self, state: HotpotState, call: PendingCall, gen: Generation) -> None:
        text = HOTPOT_STUDENT.full_output(state.styles["student"], generation_text(gen))
        act = (parse_student_action_strict if self.options.parsing == "strict" else parse_student_action)(text)
        error = act.error or generation_error(gen)
        state.student_act = act
        final = self._last_round(state)
        if act.kind == "finish":
            self._record(state, call, gen, text, action=act.action, parse_error=error)
            return self._finish(state, act.arg)
        if final:  # no budget left and no Finish: ask for the answer, or null, or the argument given
            err = error or f"no Finish on the last round (got {act.action or 'nothing'})"
            self._record(state, call, gen, text, action=act.action or None, parse_error=err)
            if self.options.forced_answer == "ask":
                return self._ask_answer(state)
            return self._finish(state, act.arg if self.options.forced_answer == "take" else "")
        retrieved = None
        if act.kind == "search":
            retrieved = self._search(state.problem, act.arg)
            state.student_last = (act.action, retrieved)
            if retrieved != NO_RESULT:
                state.evidence.append(retrieved)
        else:
            state.student_last = (INVALID_ACTION, f"Could not parse the action {act.raw_action!r}.")
        self._record(state, call, gen, text, action=act.action or None, retrieved=retrieved, parse_error=error)
        state.student_memory.append(f"{state.student_last[0]} {state.student_last[1]}")
        if self.options.summaries:
            state.phase = "student_summary"
            values = {"question": state.problem.question, "context": state.student_ctx,
                      "observation": state.student_obs, "thought": act.thought,
                      "action": f"{state.student_last[0]} Search Result: {state.student_last[1]}"
                      if act.kind == "search" else state.student_last[0]}
            style = state.styles["student"]
            state.waiting = [PendingCall("student", HOTPOT_STUDENT_SUMMARY.request(
                style, values, tag=f"{state.problem.id}/student/summary"), kind="summary")]
        else:
            state.student_ctx = _memory(state.student_memory, self.options.memory_items)
            self._ask_teacher(state)

    def _ask_answer(self, state: HotpotState) -> None:
        """One short reading call of the Student's model: the question and the passages found so far
        (plus the best passage for the question itself), answered in a few words."""
        found = list(dict.fromkeys(state.evidence))
        lookup = self._search(state.problem, state.problem.question)
        if lookup != NO_RESULT and lookup not in found:
            found.append(lookup)
        values = {"passages": " ".join(found[-3:]) or NO_RESULT, "question": state.problem.question}
        req = HOTPOT_ANSWER.request(state.styles["student"], values, tag=f"{state.problem.id}/student/answer")
        state.phase = "student_answer"
        state.waiting = [PendingCall("student", req, kind="answer", max_new_tokens=self.options.answer_tokens)]

    def _on_forced_answer(self, state: HotpotState, call: PendingCall, gen: Generation) -> None:
        text = HOTPOT_ANSWER.full_output(state.styles["student"], generation_text(gen))
        answer = parse_short_answer(text)
        error = generation_error(gen) or (None if answer else "empty answer")
        self._record(state, call, gen, text, action=f"Finish[{answer}]" if answer else None, parse_error=error)
        self._finish(state, answer)

    def _ask_teacher(self, state: HotpotState) -> None:
        state.phase = "teacher"
        s_act, s_msg = state.student_last or ("", "")
        student_msg = f"{s_act} {s_msg}".strip()
        if state.round == 0 or state.teacher_last is None:
            state.teacher_obs = f"Student's Action: {student_msg}"
        else:
            t_act, t_msg = state.teacher_last
            state.teacher_obs = f"Previous Advice: {t_act} {t_msg} Student's Action: {student_msg}"
        values = {"context": state.teacher_ctx, "question": state.problem.question, "observation": state.teacher_obs}
        state.waiting = [PendingCall("teacher", HOTPOT_TEACHER.request(
            state.styles["teacher"], values, tag=f"{state.problem.id}/teacher"))]

    def _on_teacher(self, state: HotpotState, call: PendingCall, gen: Generation) -> None:
        text = HOTPOT_TEACHER.full_output(state.styles["teacher"], generation_text(gen))
        act = (parse_teacher_action_strict if self.options.parsing == "strict" else parse_teacher_action)(text)
        state.teacher_act = act
        self._record(state, call, gen, text, action=act.action or None, parse_error=act.error or generation_error(gen))
        if act.verdict is None:
            state.teacher_last = (INVALID_ADVICE, "")
        else:
            state.teacher_last = (act.action, act.thought)
        state.teacher_memory.append(f"{state.teacher_last[0]} {state.teacher_last[1]}".strip())
        if self.options.summaries:
            state.phase = "teacher_summary"
            values = {"question": state.problem.question, "context": state.teacher_ctx,
                      "observation": state.teacher_obs, "thought": act.thought if act.verdict else "",
                      "action": state.teacher_last[0]}
            state.waiting = [PendingCall("teacher", HOTPOT_TEACHER_SUMMARY.request(
                state.styles["teacher"], values, tag=f"{state.problem.id}/teacher/summary"), kind="summary")]
        else:
            state.teacher_ctx = _memory(state.teacher_memory, self.options.memory_items)
            self._next_round(state)

    def _on_summary(self, state: HotpotState, call: PendingCall, gen: Generation, previous: str) -> str:
        text = HOTPOT_STUDENT_SUMMARY.full_output(state.styles[call.role], generation_text(gen))
        s = parse_summary(text)
        error = s.error or generation_error(gen)
        self._record(state, call, gen, text, action=None, parse_error=error)
        if s.error:
            return SUMMARY_FAILED + previous
        return s.text

    def _next_round(self, state: HotpotState) -> None:
        state.round += 1
        self._ask_student(state)

    def _finish(self, state: HotpotState, answer: str) -> None:
        state.prediction = answer
        state.finished = True
        state.waiting = []
        state.phase = "done"

    def _search(self, problem, entity: str) -> str:
        passages = self.retriever.search(entity, problem, self.options.top_k)
        if not passages:
            return NO_RESULT
        cut = self.options.passage_chars
        parts = []
        for p in passages[: self.options.top_k]:
            text = " ".join(str(p.text).split())
            if cut is not None and len(text) > cut:
                text = text[:cut].rsplit(" ", 1)[0] + " ..."
            parts.append(f"{p.title}: {text}" if getattr(p, "title", "") else text)
        return " ".join(parts)


def _from_hf_layout(rec: dict) -> dict:
    """Accept the Hugging Face column layout: context {title: [...], sentences: [[...]]}."""
    out = dict(rec)
    if "_id" in out and "id" not in out:
        out["id"] = out.pop("_id")
    ctx = out.get("context")
    if isinstance(ctx, dict) and "title" in ctx and "sentences" in ctx:
        out["context"] = [[t, s] for t, s in zip(ctx["title"], ctx["sentences"], strict=False)]
    sf = out.get("supporting_facts")
    if isinstance(sf, dict) and "title" in sf and "sent_id" in sf:
        out["supporting_facts"] = [[t, i] for t, i in zip(sf["title"], sf["sent_id"], strict=False)]
    return out


def _memory(items: list[str], n: int) -> str:
    if not items:
        return FIRST_CONTEXT
    return "Earlier steps: " + " | ".join(items[-n:])
