"""Workflow state machines with a scripted fake backend, the lockstep runner (buckets, logs), and
lockstep == one-by-one on a tiny random model with greedy decoding."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest

from haps.config import ModelSpec, PoolConfig
from haps.data import Problem
from haps.errors import ConfigError
from haps.models.pool import ModelPool
from haps.models.types import Generation
from haps.workflows import EpisodeJob, EpisodeResult, Sampling, get_workflow, run_episodes, summarize
from haps.workflows.hotpotqa import INVALID_ACTION, SUMMARY_FAILED


# ---------------------------------------------------------------------- fakes
@dataclass
class FakePassage:
    title: str
    text: str
    score: float = 1.0


class WordRetriever:
    """Stand-in retriever: the paragraph sharing most words with the query (tests only)."""

    def __init__(self) -> None:
        self.queries: list[str] = []

    def search(self, query, problem, k=1):
        self.queries.append(query)
        q = set(re.findall(r"\w+", query.lower()))
        ranked = sorted(problem.context, key=lambda p: -len(q & set(re.findall(r"\w+", (p[0] + "".join(p[1])).lower()))))
        return [FakePassage(t, "".join(s)) for t, s in ranked[:k]]


def _kind(req) -> str:
    """Which agent call a request is, from the tag the workflow puts on it."""
    return req.tag.split("/", 1)[1]


class ScriptedPool:
    """A pool whose models answer from a script: script(kind, request, n) -> text, where n counts the
    calls of that kind so far in the episode (tag prefix)."""

    def __init__(self, script, completion_models=()) -> None:
        self.config = PoolConfig(models=[
            ModelSpec(name="m1", source="x", price_in=1.0, price_out=2.0),
            ModelSpec(name="m2", source="x", price_in=3.0, price_out=4.0),
            ModelSpec(name="base", source="x", completion_style=True),
        ])
        self.script = script
        self.calls: list[tuple[str, int]] = []
        self.requests = []
        self.counts: dict[tuple[str, str], int] = {}

    @property
    def names(self):
        return self.config.names

    def spec(self, name):
        return self.config.get(name)

    def generate(self, name, requests, seed=None):
        self.calls.append((name, len(requests)))
        out = []
        for r in requests:
            self.requests.append((name, r))
            ep, kind = r.tag.split("/", 1)
            n = self.counts.get((ep, kind), 0)
            self.counts[(ep, kind)] = n + 1
            text = self.script(kind, r, n)
            spec = self.spec(name)
            out.append(Generation(text=text, model=name, token_ids=[1, 2, 3], logprobs=[-0.1, -0.2, -0.3],
                                  prompt_tokens=10, completion_tokens=3, finish_reason="stop",
                                  cost=spec.cost(10, 3), prompt_text="P"))
        return out


def hotpot_problem(pid="h1", gold="Cheltenham") -> Problem:
    return Problem(id=pid, task="hotpotqa", question='Where was the composer of "The Planets" born?', gold=gold,
                   context=[("The Planets", ["The Planets is a suite", " by Gustav Holst."]),
                            ("Gustav Holst", ["Gustav Holst was born in Cheltenham."]),
                            ("Mars", ["Mars is a planet."])])


def mmlu_problem(pid="q1", gold="B") -> Problem:
    return Problem(id=pid, task="mmlu", question="Most of the air is?", gold=gold, subject="physics",
                   choices=["Oxygen", "Nitrogen", "Carbon dioxide", "Argon"])


def searcher(kind, req, n):
    if kind.endswith("summary"):
        return f"Summary: summary {n}"
    if kind == "teacher":
        return "Thought: keep going\nAction: [Continue]"
    return f"Thought: look\nAction: Search[Gustav Holst {n}]"


def run_one(script, problem, wf, assignment=None, pool=None, **kw) -> tuple[EpisodeResult, ScriptedPool]:
    pool = pool or ScriptedPool(script)
    res = run_episodes(pool, wf, [EpisodeJob(problem, assignment or {"teacher": "m1", "student": "m2"})],
                       progress=False, **kw)
    return res[0], pool


# ---------------------------------------------------------------------- HotpotQA
def test_budget_is_enforced_and_null_answer_when_no_finish():
    ret = WordRetriever()
    res, _ = run_one(searcher, hotpot_problem(), get_workflow("hotpotqa", retriever=ret, budget=2,
                                                              forced_answer="null"))
    acts = [t for t in res.turns if t.kind == "act" and t.role == "student"]
    assert len(acts) == 3  # B + 1 student turns
    assert len(ret.queries) == 2  # the last round's Search is not executed
    assert res.prediction == "" and res.score == 0.0
    assert "no Finish" in acts[-1].parse_error
    assert [t.retrieved is not None for t in acts] == [True, True, False]
    # summaries on: student act, student summary, teacher act, teacher summary per searched round
    assert [(t.role, t.kind) for t in res.turns[:4]] == [("student", "act"), ("student", "summary"),
                                                         ("teacher", "act"), ("teacher", "summary")]
    assert len(res.turns) == 2 * 4 + 1


@pytest.mark.parametrize("style_model", ["m2", "base"])
def test_forced_answer_ask_reads_the_passages_found(style_model):
    def script(kind, req, n):
        if kind == "student/answer":
            return "Answer: Cheltenham.\nQuestion: more invented text" if style_model == "m2" else " Cheltenham"
        return searcher(kind, req, n)

    ret = WordRetriever()
    res, pool = run_one(script, hotpot_problem(), get_workflow("hotpotqa", retriever=ret, budget=1),
                        assignment={"teacher": "m1", "student": style_model}, sampling={"max_new_tokens": 64})
    assert res.prediction == "Cheltenham" and res.score == 1.0
    last = res.turns[-1]
    assert (last.kind, last.action, last.parse_error) == ("answer", "Finish[Cheltenham]", None)
    assert "no Finish" in res.turns[-2].parse_error  # the failed last act stays recorded
    name, req = pool.requests[-1]
    assert name == style_model and req.max_new_tokens == 24
    text = req.prompt if style_model == "base" else req.messages[-1]["content"]
    searched = next(t.retrieved for t in res.turns if t.retrieved)
    assert searched in text and hotpot_problem().question in text  # the passages found, then the question
    assert ret.queries[-1] == hotpot_problem().question  # one look-up with the question itself


def test_response_prefix_is_rendered_after_the_generation_prompt(tiny_llama):
    from haps.models.types import GenRequest

    req = GenRequest(messages=[{"role": "user", "content": "Say hi"}], response_prefix="Thought: hi\nAction: Finish[")
    plain = tiny_llama.render(GenRequest(messages=req.messages))
    assert tiny_llama.render(req) == plain + req.response_prefix
    assert tiny_llama.render(GenRequest(prompt="Q:", response_prefix=" A")) == "Q: A"


def test_forced_answer_take_uses_the_given_argument():
    res, _ = run_one(searcher, hotpot_problem(), get_workflow("hotpotqa", retriever=WordRetriever(), budget=1,
                                                              forced_answer="take"))
    assert res.prediction == "Gustav Holst 1"


def test_finish_ends_the_episode_and_scores_f1():
    def script(kind, req, n):
        if kind == "student" and n == 1:
            return "Thought: found it\nAction: Finish[Cheltenham, England]"
        return searcher(kind, req, n)

    res, _ = run_one(script, hotpot_problem(), get_workflow("hotpotqa", retriever=WordRetriever()))
    assert res.prediction == "Cheltenham, England"
    assert res.score == pytest.approx(2 / 3) and res.em == 0.0
    assert res.turns[-1].action == "Finish[Cheltenham, England]" and res.turns[-1].round == 1
    assert res.tokens_in == 10 * len(res.turns) and res.tokens_out == 3 * len(res.turns)
    assert res.cost == pytest.approx(sum(t.cost for t in res.turns)) and res.cost > 0


def test_teacher_verdict_and_advice_reach_the_student():
    def script(kind, req, n):
        if kind == "teacher":
            return "Thought: wrong entity, search Holst instead\nAction: [Rethink]"
        return searcher(kind, req, n)

    res, pool = run_one(script, hotpot_problem(), get_workflow("hotpotqa", retriever=WordRetriever(), budget=1))
    student_prompts = [r.messages[-1]["content"] for _, r in pool.requests if r.tag.endswith("/student")]
    assert "Start to answer the question." in student_prompts[0]
    assert "Teacher's Advice: [Rethink] wrong entity, search Holst instead" in student_prompts[1]
    assert "Search Result: Search[Gustav Holst 0] The Planets: The Planets is a suite by Gustav Holst." in student_prompts[1]
    teacher = [t for t in res.turns if t.role == "teacher" and t.kind == "act"]
    assert teacher[0].action == "[Rethink]"
    # the running summary is the Student's Context next round
    assert "Context: summary 0" in student_prompts[1]


def test_parse_failures_are_recorded_and_the_episode_goes_on():
    def script(kind, req, n):
        if kind == "student" and n == 0:
            return "I have no idea what to do."
        if kind == "teacher" and n == 0:
            return "Hmm."
        if kind == "student/summary" and n == 0:
            return ""
        if kind == "student":
            return "Thought: ok\nAction: Finish[Cheltenham]"
        return searcher(kind, req, n)

    res, pool = run_one(script, hotpot_problem(), get_workflow("hotpotqa", retriever=WordRetriever()))
    assert res.prediction == "Cheltenham" and res.em == 1.0
    errs = [(t.role, t.kind, t.round) for t in res.turns if t.parse_error]
    assert errs == [("student", "act", 0), ("student", "summary", 0), ("teacher", "act", 0)]
    assert res.parse_failures == 3
    teacher_prompt = next(r for _, r in pool.requests if r.tag.endswith("/teacher")).messages[-1]["content"]
    assert INVALID_ACTION in teacher_prompt
    student_2 = [r for _, r in pool.requests if r.tag.endswith("/student")][1].messages[-1]["content"]
    assert SUMMARY_FAILED in student_2 and "Invalid feedback" in student_2


def test_no_summaries_halves_the_calls_and_keeps_raw_memory():
    res, pool = run_one(searcher, hotpot_problem(),
                        get_workflow("hotpotqa", retriever=WordRetriever(), budget=2, summaries=False,
                                     forced_answer="null"))
    assert all(t.kind == "act" for t in res.turns) and len(res.turns) == 2 * 2 + 1
    last_student = [r for _, r in pool.requests if r.tag.endswith("/student")][-1].messages[-1]["content"]
    assert "Earlier steps: Search[Gustav Holst 0]" in last_student
    assert "You have no search budget left" in last_student


def test_completion_style_models_get_a_worked_example_and_stops():
    def script(kind, req, n):  # a base model continues after the answer prefix
        if kind.endswith("summary"):
            return " what happened" if req.prompt else "Summary: what happened"
        if kind == "teacher":
            return " fine\nAction: [Continue]" if req.prompt else "Thought: fine\nAction: [Continue]"
        return " I know it\nAction: Finish[Cheltenham]" if n else " look\nAction: Search[Holst]"

    res, pool = run_one(script, hotpot_problem(), get_workflow("hotpotqa", retriever=WordRetriever()),
                        assignment={"teacher": "m1", "student": "base"})
    student_reqs = [r for m, r in pool.requests if m == "base"]
    assert all(r.messages is None and r.prompt.endswith(("Thought:", "Summary:")) for r in student_reqs)
    assert "### Example" in student_reqs[0].prompt and "\n\n" in student_reqs[0].stop
    assert all(r.messages is not None for m, r in pool.requests if m == "m1")
    assert res.prediction == "Cheltenham" and res.parse_failures == 0
    assert res.turns[0].output.startswith("Thought: look")


# ---------------------------------------------------------------------- MMLU
def test_mmlu_submit_ends_the_episode():
    def script(kind, req, n):
        return "Rationale: air is mostly N2.\nChoice: B" if kind == "student" else "Feedback: right\nSubmit: 1"

    res, _ = run_one(script, mmlu_problem(), get_workflow("mmlu"))
    assert [(t.role, t.action) for t in res.turns] == [("student", "Choice: B"), ("teacher", "Submit: 1")]
    assert res.prediction == "B" and res.score == 1.0 and res.em == 1.0


def test_mmlu_k_rounds_limit_and_last_choice_wins():
    def script(kind, req, n):
        if kind == "student":
            return f"Rationale: try {n}\nChoice: {'ACD'[n]}"
        return f"Feedback: no, think again ({n})\nSubmit: 0"

    res, pool = run_one(script, mmlu_problem(), get_workflow("mmlu", rounds=3))
    assert len(res.turns) == 6 and res.prediction == "D" and res.score == 0.0
    second = [r for _, r in pool.requests if r.tag.endswith("/student")][1].messages[-1]["content"]
    assert "Choice: A" in second and "no, think again (0)" in second


def test_mmlu_unparsed_choice_keeps_the_previous_one_and_is_recorded():
    def script(kind, req, n):
        if kind == "student":
            return "Rationale: it is N2\nChoice: B" if n == 0 else "I am confused"
        return "Feedback: hmm" if n == 0 else "Feedback: ok\nSubmit: 1"

    res, _ = run_one(script, mmlu_problem(), get_workflow("mmlu"))
    assert res.prediction == "B" and res.score == 1.0
    assert [(t.role, bool(t.parse_error)) for t in res.turns] == [
        ("student", False), ("teacher", True), ("student", True), ("teacher", False)]


# ---------------------------------------------------------------------- runner
def test_lockstep_sends_one_batch_per_model_per_step():
    probs = [hotpot_problem(f"h{i}") for i in range(5)]
    pool = ScriptedPool(searcher)
    jobs = [EpisodeJob(p, {"teacher": "m1", "student": "m2"}) for p in probs[:3]]
    jobs += [EpisodeJob(p, {"teacher": "m2", "student": "m1"}) for p in probs[3:]]
    wf = get_workflow("hotpotqa", retriever=WordRetriever(), budget=1)
    res = run_episodes(pool, wf, jobs, progress=False)
    assert [r.id for r in res] == [p.id for p in probs]
    # every step: all 5 episodes wait for a call; 3 go to one model, 2 to the other
    assert sorted(n for _, n in pool.calls[:2]) == [2, 3]
    assert all(n in (2, 3) for _, n in pool.calls)
    # 6 steps (act, sum, act, sum, final act without Finish, forced answer) x 2 models
    assert len(pool.calls) == 2 * 6
    one_by_one = ScriptedPool(searcher)
    res1 = run_episodes(one_by_one, wf, jobs, progress=False, max_live=1)
    assert all(n == 1 for _, n in one_by_one.calls)
    assert [r.prediction for r in res1] == [r.prediction for r in res]


def test_logs_are_whole_json_lines_without_rl_fields(tmp_path):
    log = tmp_path / "sub" / "episodes.jsonl"
    probs = [mmlu_problem(f"q{i}") for i in range(3)]

    def script(kind, req, n):
        return "Rationale: x\nChoice: B" if kind == "student" else "Feedback: ok\nSubmit: 1"

    res = run_episodes(ScriptedPool(script), get_workflow("mmlu"),
                       [EpisodeJob(p, {"teacher": "m1", "student": "m1"}) for p in probs], progress=False,
                       log_path=log)
    lines = log.read_text().splitlines()
    assert len(lines) == 3
    rows = [json.loads(x) for x in lines]
    assert {r["id"] for r in rows} == {"q0", "q1", "q2"}
    turn = rows[0]["turns"][0]
    for key in ("role", "model", "prompt", "output", "action", "retrieved", "tokens_in", "tokens_out", "cost",
                "parse_error"):
        assert key in turn
    assert "token_ids" not in turn and "logprobs" not in turn
    assert EpisodeResult.from_dict(rows[0]).score == 1.0
    # in memory: RL fields dropped unless asked for
    assert res[0].turns[0].token_ids == []
    res2 = run_episodes(ScriptedPool(script), get_workflow("mmlu"),
                        [EpisodeJob(probs[0], {"teacher": "m1", "student": "m1"})], progress=False,
                        record_logprobs=True, log_path=log)
    assert res2[0].turns[0].token_ids == [1, 2, 3] and res2[0].turns[0].logprobs == [-0.1, -0.2, -0.3]
    assert res2[0].turns[0].prompt_text == "P"
    assert len(log.read_text().splitlines()) == 4  # appended
    s = summarize(res)
    assert s["episodes"] == 3 and s["score"] == 1.0 and s["parse_failure_rate"] == 0.0


def test_runner_and_registry_errors():
    pool = ScriptedPool(searcher)
    wf = get_workflow("mmlu")
    with pytest.raises(ConfigError, match="student"):
        run_episodes(pool, wf, [EpisodeJob(mmlu_problem(), {"teacher": "m1"})], progress=False)
    with pytest.raises(ConfigError, match="not in the pool"):
        run_episodes(pool, wf, [EpisodeJob(mmlu_problem(), {"teacher": "m1", "student": "gpt"})], progress=False)
    with pytest.raises(ConfigError, match="valid names.*hotpotqa.*mmlu"):
        get_workflow("gsm8k")
    with pytest.raises(ConfigError, match="budget"):
        get_workflow("hotpotqa", budgt=2)
    with pytest.raises(ConfigError, match="rounds"):
        get_workflow("mmlu", rounds=0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1)


def test_workflow_descriptions():
    for name in ("hotpotqa", "mmlu"):
        wf = get_workflow(name)
        assert wf.roles == ("teacher", "student")
        assert wf.task_description and set(wf.role_definitions) == {"teacher", "student"}
    assert "B. Nitrogen" in get_workflow("mmlu").problem_text(mmlu_problem())
    assert get_workflow("hotpotqa").problem_text(hotpot_problem()).startswith("Where was")


# ---------------------------------------------------------------------- real (random) model
def test_lockstep_equals_one_by_one_on_tiny_llama(tiny_llama, tiny_gemma3):
    """Greedy decoding on random weights: every episode runs to its budget on junk outputs, through
    batched and single-row calls; both must give the same turns."""
    specs = [tiny_llama.spec, tiny_gemma3.spec.model_copy(update={"completion_style": True})]
    pool = ModelPool(PoolConfig(models=specs), backends={"tiny-llama": tiny_llama, "tiny-gemma3": tiny_gemma3})
    probs = [hotpot_problem(f"h{i}") for i in range(3)]
    jobs = [EpisodeJob(p, {"teacher": "tiny-llama", "student": "tiny-gemma3"}) for p in probs[:2]]
    jobs.append(EpisodeJob(probs[2], {"teacher": "tiny-gemma3", "student": "tiny-llama"}))
    wf = get_workflow("hotpotqa", retriever=WordRetriever(), budget=1, summaries=False, forced_answer="take")
    sampling = Sampling(max_new_tokens=6)
    lock = run_episodes(pool, wf, jobs, sampling=sampling, progress=False, record_logprobs=True)
    single = run_episodes(pool, wf, jobs, sampling=sampling, progress=False, record_logprobs=True, max_live=1)
    for a, b in zip(lock, single, strict=True):
        assert a.prediction == b.prediction
        assert [t.output for t in a.turns] == [t.output for t in b.turns]
        assert [t.token_ids for t in a.turns] == [t.token_ids for t in b.turns]
        assert (a.tokens_in, a.tokens_out) == (b.tokens_in, b.tokens_out)
    assert all(t.tokens_out > 0 and t.logprobs for r in lock for t in r.turns)
    mm = get_workflow("mmlu", rounds=2)
    mjobs = [EpisodeJob(mmlu_problem(f"q{i}"), {"teacher": "tiny-gemma3", "student": "tiny-llama"}) for i in range(2)]
    a = run_episodes(pool, mm, mjobs, sampling=sampling, progress=False)
    b = run_episodes(pool, mm, mjobs, sampling=sampling, progress=False, max_live=1)
    assert [[t.output for t in r.turns] for r in a] == [[t.output for t in r.turns] for r in b]
