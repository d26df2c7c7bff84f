"""The `Workflow` interface, its registry, per-episode state and the records an episode leaves.

A workflow is a per-episode state machine driven from outside (by `haps.workflows.runner`):

    state = wf.start(problem, styles)          # styles: role -> "chat" | "completion"
    while not wf.done(state):
        for call in wf.pending(state):         # usually one call: PendingCall(role, GenRequest)
            gen = <the model assigned to call.role>.generate(call.request)
            wf.advance(state, call.role, gen)  # parses, acts (e.g. retrieves), records a Turn
    prediction = wf.result(state)

The workflow never calls a model itself, so a runner can gather the pending calls of many
episodes and send them to each model as one batch (paper, Appendix E.2).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ValidationError

from haps.errors import ConfigError, DataError
from haps.models.types import Generation, GenRequest
from haps.problem import Problem, need, need_text
from haps.registry import class_registrar

Style = Literal["chat", "completion"]
TurnKind = Literal["act", "summary", "answer"]


@dataclass
class PendingCall:
    """One generation an episode is waiting for. ``request`` carries the prompt and stop strings;
    the runner sets sampling, the adapter and the tag."""

    role: str
    request: GenRequest
    kind: TurnKind = "act"
    max_new_tokens: int | None = None  # a cap below the runner's per-call limit (e.g. a short answer)


@dataclass
class Turn:
    """One model call of an episode. The last three fields are for RL (re-scoring with adapters):
    they stay in memory and are written to logs only on request."""

    role: str
    model: str
    kind: TurnKind
    round: int
    prompt: str  # the user message (chat) or the raw completion prompt
    output: str  # the model's text (completion-style outputs get their answer prefix back)
    action: str | None = None  # parsed action: "Search[x]", "Finish[x]", "[Continue]", "Choice: B", ...
    retrieved: str | None = None  # the passage(s) a Search returned
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    parse_error: str | None = None
    error: str | None = None  # the call itself failed (`Generation.error`): the episode ended here, failed
    finish_reason: str = ""
    token_ids: list[int] = field(default_factory=list, repr=False)
    logprobs: list[float] = field(default_factory=list, repr=False)
    prompt_text: str = field(default="", repr=False)  # exactly what the model saw (templated)
    prompt_ids: list[int] = field(default_factory=list, repr=False)  # its token ids as fed (local models)
    adapter_norm: float | None = None  # ||alpha A B||_F of the generated adapter this call ran with (None: none)
    # the generation's kept hidden states (`Generation.states`, a tensor; in memory only, never logged)
    states: Any = field(default=None, repr=False, compare=False)
    states_layer: int | None = field(default=None, repr=False)

    RL_FIELDS: ClassVar[tuple[str, ...]] = ("token_ids", "logprobs", "prompt_text", "prompt_ids", "states_layer")

    def to_dict(self, include_rl: bool = False) -> dict[str, Any]:
        skip = {"states"} | (set() if include_rl else set(self.RL_FIELDS))
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in skip}

    def drop_rl(self) -> None:
        self.token_ids, self.logprobs, self.prompt_text, self.prompt_ids = [], [], "", []
        self.states, self.states_layer = None, None


@dataclass
class EpisodeResult:
    """One finished episode: its turns, prediction and score (F1 for HotpotQA, accuracy for MMLU).

    A failed episode (``failed``: one of its model calls ended in ``finish_reason == "error"``, e.g. an
    API call that still failed after the client's retries) stopped at that call. It has no prediction
    and no score: ``score`` and ``em`` are None, never 0, so nothing can average it as a reward;
    ``error`` is the call's error text and ``failed_call`` says which call it was ({"role", "model",
    "round", "kind"}); its last turn is that call, with the error. Tokens and cost count what was spent.
    """

    id: str
    task: str
    assignment: dict[str, str]
    turns: list[Turn]
    prediction: str | None
    gold: str
    score: float | None
    em: float | None
    tokens_in: int
    tokens_out: int
    cost: float
    failed: bool = False
    error: str | None = None
    failed_call: dict[str, Any] | None = None

    @property
    def parse_failures(self) -> int:
        return sum(1 for t in self.turns if t.parse_error)

    def to_dict(self, include_rl: bool = False) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "turns"}
        d["turns"] = [t.to_dict(include_rl) for t in self.turns]
        d["parse_failures"] = self.parse_failures
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EpisodeResult:
        names = {f.name for f in fields(cls)}
        turn_names = {f.name for f in fields(Turn)}
        kw = {k: v for k, v in d.items() if k in names and k != "turns"}
        turns = [Turn(**{k: v for k, v in t.items() if k in turn_names}) for t in d.get("turns", [])]
        return cls(turns=turns, **kw)


@dataclass
class EpisodeState:
    """What every workflow's state holds; workflows subclass it with their own fields."""

    problem: Any
    styles: dict[str, Style]
    turns: list[Turn] = field(default_factory=list)
    finished: bool = False
    prediction: str | None = None
    round: int = 0
    waiting: list[PendingCall] = field(default_factory=list)


class Workflow(ABC):
    """A multi-agent system as a per-episode state machine (see the module docstring), and the task it
    solves: its data format (`load_record` / `dump_record`), its metric, how collection stratifies its
    splits and its options. Built-in workflows register by name (`register_workflow`); any other loads
    from a file or a plugin (`haps.workflows.load_workflow_class`)."""

    name: ClassVar[str]
    roles: ClassVar[tuple[str, ...]] = ("teacher", "student")
    task_description: ClassVar[str]
    role_definitions: ClassVar[dict[str, str]]
    #: what `score` measures, as summaries print it ("F1", "accuracy")
    metric: ClassVar[str] = "score"
    #: a `Problem` attribute whose groups collection splits on their own (e.g. "subject"), or None
    stratify_by: ClassVar[str | None] = None
    #: the pydantic model of the workflow's options (None: it takes none); `__init__(**options)` checks them
    options_model: ClassVar[type[BaseModel] | None] = None
    #: an embedded demo set as "package:file.jsonl" (None: problems always come from a file)
    demo_data: ClassVar[str | None] = None

    def __init__(self, **options: Any) -> None:
        model = type(self).options_model
        if model is None:
            if options:
                raise ConfigError(f"workflow {self.name!r} takes no options, got {sorted(options)}.")
            self.options = None
        else:
            self.options = build_options(model, self.name, options)

    # ------------------------------------------------------------------ the task's data
    @classmethod
    def load_record(cls, rec: dict[str, Any]) -> Problem:
        """One decoded JSON record -> `Problem`; raise `DataError` saying what is wrong (the loader adds
        file and line). Default format: ``{"id", "question", "answer", "choices"?, "subject"?, "meta"?}``."""
        pid = need(rec, "id", (str, int), "the problem id")
        question = need_text(rec, "question", "the question text")
        answer = need(rec, "answer", (str, int, float), "the reference answer")
        choices = rec.get("choices")
        if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
            raise DataError(f"field 'choices' must be a list of strings, got {str(choices)[:80]!r}")
        subject = rec.get("subject")
        if subject is not None and not isinstance(subject, str):
            raise DataError(f"field 'subject' must be a string, got {type(subject).__name__}")
        meta = rec.get("meta", {})
        if not isinstance(meta, dict):
            raise DataError(f"field 'meta' must be an object, got {type(meta).__name__}")
        return Problem(id=str(pid), task=cls.name, question=question, gold=str(answer), choices=choices,
                       subject=subject, meta=dict(meta))

    @classmethod
    def dump_record(cls, problem: Problem) -> dict[str, Any]:
        """The record `load_record` reads back as ``problem``."""
        rec: dict[str, Any] = {"id": problem.id, "question": problem.question, "answer": problem.gold}
        if problem.choices is not None:
            rec["choices"] = list(problem.choices)
        if problem.subject is not None:
            rec["subject"] = problem.subject
        meta = {k: v for k, v in problem.meta.items() if k != "source"}
        if meta:
            rec["meta"] = meta
        return rec

    def warm_up(self, problems: Sequence[Problem]) -> None:  # noqa: B027 - an optional hook
        """Bring per-problem resources (e.g. a retrieval index) to the state a run starts from, outside
        any timing; the benchmarks call it before each timed mode. Default: nothing to do."""

    @abstractmethod
    def problem_text(self, problem) -> str:
        """The problem as shown to the router (the "problem" part of the routing prompt)."""

    @abstractmethod
    def start(self, problem, styles: Mapping[str, Style] | None = None) -> EpisodeState:
        """A fresh episode. ``styles`` says, per role, whether its model gets chat messages or a
        completion-style prompt with a worked example (base models); default chat."""

    def pending(self, state: EpisodeState) -> list[PendingCall]:
        """The calls the episode waits for (empty once done)."""
        return [] if state.finished else list(state.waiting)

    @abstractmethod
    def advance(self, state: EpisodeState, role: str, generation: Generation) -> None:
        """Consume the generation for the first pending call of ``role``; record a Turn."""

    def fail(self, state: EpisodeState, role: str, generation: Generation) -> Turn:
        """End the episode at a failed call (`generation_failed`): consume the first pending call of
        ``role``, record it as a Turn carrying the error, and stop (no more calls, no prediction). The
        runner calls this instead of `advance`, so no workflow reads a failed call's empty text as the
        model's answer; a workflow overriding it must still record the Turn and stop."""
        call = self._take(state, role)
        turn = self._record(state, call, generation, generation.text)
        turn.error = failure_text(generation)
        state.waiting = []
        state.finished = True
        return turn

    def done(self, state: EpisodeState) -> bool:
        return state.finished

    def result(self, state: EpisodeState) -> str | None:
        return state.prediction

    @abstractmethod
    def gold(self, problem) -> str:
        """The reference answer as logged."""

    @abstractmethod
    def score(self, problem, prediction: str | None) -> tuple[float, float]:
        """(score, exact match) of a prediction."""

    # ------------------------------------------------------------------ helpers for subclasses
    def _styles(self, styles: Mapping[str, Style] | None) -> dict[str, Style]:
        out: dict[str, Style] = {r: "chat" for r in self.roles}
        for role, style in (styles or {}).items():
            if role not in self.roles:
                raise ConfigError(f"workflow {self.name!r}: unknown role {role!r}; roles are {list(self.roles)}.")
            if style not in ("chat", "completion"):
                raise ConfigError(f"role {role!r}: style must be 'chat' or 'completion', got {style!r}.")
            out[role] = style
        return out

    @staticmethod
    def _take(state: EpisodeState, role: str) -> PendingCall:
        for i, call in enumerate(state.waiting):
            if call.role == role:
                return state.waiting.pop(i)
        raise ConfigError(f"advance: the episode is not waiting for a {role!r} call "
                          f"(waiting for {[c.role for c in state.waiting]}).")

    @staticmethod
    def _record(state: EpisodeState, call: PendingCall, gen: Generation, output: str, *,
                action: str | None = None, retrieved: str | None = None,
                parse_error: str | None = None) -> Turn:
        req = call.request
        turn = Turn(
            role=call.role, model=gen.model, kind=call.kind, round=state.round,
            prompt=req.prompt if req.prompt is not None else "\n\n".join(m["content"] for m in req.messages or []),
            output=output, action=action, retrieved=retrieved, tokens_in=gen.prompt_tokens,
            tokens_out=gen.completion_tokens, cost=gen.cost, parse_error=parse_error,
            finish_reason=gen.finish_reason, token_ids=list(gen.token_ids), logprobs=list(gen.logprobs),
            prompt_text=gen.prompt_text, prompt_ids=list(gen.prompt_ids), states=gen.states,
            states_layer=gen.states_layer,
        )
        state.turns.append(turn)
        return turn


def build_options(cls: type[BaseModel], workflow: str, options: Mapping[str, Any]) -> BaseModel:
    """``cls(**options)``; a bad or unknown option raises ConfigError listing the valid ones."""
    try:
        return cls(**options)
    except ValidationError as e:
        valid = ", ".join(f"{k} (default {v.default!r})" for k, v in cls.model_fields.items())
        msgs = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
                         for err in e.errors())
        raise ConfigError(f"workflow {workflow!r}: invalid options: {msgs}. Valid options: {valid}.") from None


def generation_failed(gen: Generation) -> bool:
    """Whether a call failed (an API error after retries, a request the backend refused): the runner
    then ends the episode as failed (`Workflow.fail`) instead of handing the generation to the workflow."""
    return gen.error is not None or gen.finish_reason == "error"


def failure_text(gen: Generation) -> str:
    """The error of a failed generation, as recorded on its turn and its episode."""
    return gen.error or "the backend returned finish_reason 'error' without a message"


def generation_text(gen: Generation) -> str:
    """The text of a generation. The runner never passes a failed one to a workflow; a workflow driven by
    hand that gets one sees an empty output."""
    return gen.text if gen.error is None else ""


def generation_error(gen: Generation) -> str | None:
    return f"generation failed: {gen.error}" if gen.error else None


# ---------------------------------------------------------------------- registry
WORKFLOWS: dict[str, type[Workflow]] = {}


#: Class decorator: ``@register_workflow(name)`` makes a class available by name.
register_workflow = class_registrar(WORKFLOWS, "workflow")
