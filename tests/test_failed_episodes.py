"""A failed call is a failed episode, never a score (issue 16, item 1): the runner's rule, the episode
record and log, `summarize`; and the readers of action-level data (warm-up, SFT, evaluation by lookup),
which skip and count failed records."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest

from haps.config import ModelSpec, PoolConfig
from haps.data import Problem
from haps.models.types import Generation
from haps.workflows import EpisodeJob, EpisodeResult, get_workflow, run_episodes, summarize
from haps.workflows.base import EpisodeState, PendingCall, Workflow


@dataclass
class Passage:
    title: str
    text: str


class FirstParagraph:
    def search(self, query, problem, k=1):
        return [Passage(t, "".join(s)) for t, s in problem.context[:k]]


def hotpot(pid: str) -> Problem:
    return Problem(id=pid, task="hotpotqa", question="Where was Holst born?", gold="Cheltenham",
                   context=[("Gustav Holst", ["Gustav Holst was born in Cheltenham."])])


def mmlu(pid: str) -> Problem:
    return Problem(id=pid, task="mmlu", question="Most of the air is?", gold="B", subject="physics",
                   choices=["Oxygen", "Nitrogen", "Carbon dioxide", "Argon"])


def reply(kind: str, n: int) -> str:
    if kind.endswith("summary"):
        return f"Summary: summary {n}"
    if kind == "teacher":
        return "Feedback: good\nSubmit: 0" if n < 9 else ""
    if kind == "student":
        return f"Thought: t\nAction: Search[Holst {n}]" if n < 1 else "Thought: t\nAction: Finish[Cheltenham]"
    return "Answer: Cheltenham"


class FailingPool:
    """Scripted models; ``fail(model, episode, kind, n)`` says which calls come back as error rows (an API
    call that failed after its retries: empty text, finish_reason "error", the error message)."""

    def __init__(self, fail=lambda model, ep, kind, n: False, script=reply) -> None:
        self.config = PoolConfig(models=[ModelSpec(name="local", source="x", price_in=1.0, price_out=1.0),
                                         ModelSpec(name="remote", backend="api", open_weights=False,
                                                   base_url="http://127.0.0.1:9/v1", price_in=2.0, price_out=2.0)])
        self.fail, self.script = fail, script
        self.counts: dict[tuple[str, str], int] = {}
        self.requests: list[tuple[str, str]] = []  # (model, tag) of every request sent
        self.batches: list[int] = []

    @property
    def names(self):
        return self.config.names

    def spec(self, name):
        return self.config.get(name)

    def generate(self, name, requests, seed=None):
        self.batches.append(len(requests))
        out = []
        for r in requests:
            self.requests.append((name, r.tag))
            ep, kind = r.tag.split("/", 1)
            n = self.counts.get((ep, kind), 0)
            self.counts[(ep, kind)] = n + 1
            if self.fail(name, ep, kind, n):
                out.append(Generation(text="", model=name, finish_reason="error",
                                      error=f"APIConnectionError (after 2 attempts): Connection refused ({ep})"))
            else:
                out.append(Generation(text=self.script(kind, n), model=name, prompt_tokens=10, completion_tokens=3,
                                      finish_reason="stop", cost=self.spec(name).cost(10, 3)))
        return out


def test_a_failed_call_ends_its_episode_as_failed_with_no_score(tmp_path):
    wf = get_workflow("hotpotqa", retriever=FirstParagraph(), budget=2)
    jobs = [EpisodeJob(hotpot(f"h{i}"), {"teacher": "remote" if i == 1 else "local", "student": "local"})
            for i in range(3)]
    pool = FailingPool(fail=lambda model, ep, kind, n: model == "remote")  # h1's teacher: its endpoint is down
    log = tmp_path / "episodes.jsonl"
    res = run_episodes(pool, wf, jobs, progress=False, log_path=log)
    good, bad = res[0], res[1]
    assert not good.failed and good.score == 1.0 and good.error is None and good.failed_call is None
    assert bad.failed and bad.score is None and bad.em is None and bad.prediction is None
    assert "Connection refused (h1)" in bad.error
    assert bad.failed_call == {"role": "teacher", "model": "remote", "round": 0, "kind": "act"}
    last = bad.turns[-1]
    assert (last.role, last.model, last.finish_reason, last.error) == ("teacher", "remote", "error", bad.error)
    assert last.parse_error is None  # not a parse failure: the call failed
    # the episode stopped at the failed call: nothing more was asked for it
    assert [tag for _, tag in pool.requests if tag.startswith("h1/")] == ["h1/student", "h1/student/summary",
                                                                         "h1/teacher"]
    assert bad.tokens_in == 20 and bad.cost == pytest.approx(2 * 13 / 1e6)  # what was spent is counted
    # the other episodes are exactly what they are without the failure
    alone = run_episodes(FailingPool(), wf, [jobs[0], jobs[2]], progress=False)
    assert [r.to_dict() for r in alone] == [res[0].to_dict(), res[2].to_dict()]
    rows = {r["id"]: r for r in map(json.loads, log.read_text().splitlines())}
    assert rows["h1"]["failed"] is True and rows["h1"]["score"] is None and rows["h1"]["turns"][-1]["error"]
    assert rows["h0"]["failed"] is False and rows["h0"]["score"] == 1.0
    back = EpisodeResult.from_dict(rows["h1"])
    assert back.failed and back.score is None and back.failed_call["model"] == "remote"


def test_mmlu_failure_in_a_later_round_and_summary():
    wf = get_workflow("mmlu", rounds=3)
    jobs = [EpisodeJob(mmlu(f"q{i}"), {"teacher": "local", "student": "remote" if i else "local"}) for i in range(3)]
    # the remote Student answers round 1 and fails in round 2
    pool = FailingPool(fail=lambda model, ep, kind, n: model == "remote" and kind == "student" and n == 1,
                       script=lambda kind, n: "Rationale: r\nChoice: B" if kind == "student" else "Feedback: f\nSubmit: 0")
    res = run_episodes(pool, wf, jobs, progress=False)
    assert [r.failed for r in res] == [False, True, True]
    assert res[0].score == 1.0 and res[0].prediction == "B"
    assert res[1].failed_call == {"role": "student", "model": "remote", "round": 2, "kind": "act"}
    assert res[1].prediction is None  # round 1's choice is not an answer: the episode did not finish
    s = summarize(res)
    assert s["episodes"] == 3 and s["failed"] == 2 and s["failed_by_model"] == {"remote": 2}
    assert s["score"] == 1.0 and s["em"] == 1.0  # over the episodes that did not fail
    assert "Connection refused (q1)" in s["first_error"]
    assert s["null_predictions"] == 0
    every = summarize([res[1], res[2]])
    assert every["score"] is None and every["failed"] == 2
    none = summarize([res[0]])
    assert none["failed"] == 0 and none["failed_by_model"] == {} and none["first_error"] is None


def test_calls_of_an_episode_after_its_failure_in_the_same_step_are_not_sent():
    """A workflow with two calls per step (one per model): the first model's call fails, so the second
    model's call of that step is dropped and the episode ends."""

    class Both(Workflow):
        name = "both"
        roles = ("a", "b")
        task_description = "two agents at once"
        role_definitions = {"a": "A.", "b": "B."}
        seen: list[str] = []

        def problem_text(self, problem):
            return problem.question

        def gold(self, problem):
            return problem.gold

        def score(self, problem, prediction):
            return float(prediction == problem.gold), float(prediction == problem.gold)

        def start(self, problem, styles=None):
            from haps.models.types import GenRequest

            st = EpisodeState(problem=problem, styles=self._styles(styles))
            st.waiting = [PendingCall(r, GenRequest(prompt="x", tag=f"{problem.id}/{r}")) for r in self.roles]
            return st

        def advance(self, state, role, generation):
            type(self).seen.append(generation.text)  # a workflow never sees a failed generation
            call = self._take(state, role)
            self._record(state, call, generation, generation.text)
            if not state.waiting:
                state.prediction, state.finished = generation.text, True

    wf = Both()
    jobs = [EpisodeJob(Problem(id=f"p{i}", task="both", question="q", gold="Answer: Cheltenham"),
                       {"a": "remote" if i == 0 else "local", "b": "local"}) for i in range(2)]
    pool = FailingPool(fail=lambda model, ep, kind, n: model == "remote", script=lambda kind, n: "Answer: Cheltenham")
    res = run_episodes(pool, wf, jobs, progress=False)
    assert res[0].failed and [t.role for t in res[0].turns] == ["a"]
    assert not res[1].failed and res[1].score == 1.0
    assert ("local", "p0/b") not in pool.requests  # dropped after p0/a failed in the same step
    assert "" not in Both.seen


# --------------------------------------------------------------------------- readers of action-level data
def _records(space, pids, failed: set[tuple[str, str]], split="train"):
    """Action records for every (problem, assignment); those in ``failed`` are failed records (as an old
    or hand-made file may hold): failed true and no reward."""
    out = []
    for i, pid in enumerate(pids):
        for j, z in enumerate(space.assignments()):
            key = space.key(z)
            rec = {"problem_id": pid, "split": split, "key": key, "assignment": space.to_names(z),
                   "assignment_ids": list(z), "reward": float((i + j) % 3 == 0), "score": float((i + j) % 3 == 0),
                   "em": 0.0, "tokens_in": 10, "tokens_out": 3, "cost": 1e-6 * (j + 1)}
            if (pid, key) in failed:
                rec.update(failed=True, reward=None, score=None, em=None, error="HTTP 500: down")
            out.append(rec)
    return out


@pytest.fixture()
def space():
    from haps.routing.space import AssignmentSpace

    return AssignmentSpace.of(["teacher", "student"], ["local", "remote"])


def test_warmup_skips_and_counts_failed_records(space):
    from haps.train.warmup import build_warmup

    keys = [space.key(z) for z in space.assignments()]
    # p0's only rewarded assignment (j=0) failed: its best among the rest has reward 1 at j=3
    failed = {("p0", keys[0]), ("p1", keys[1])}
    recs = _records(space, ["p0", "p1", "p2"], failed)
    ex, stats = build_warmup(recs, tie="first")
    clean, clean_stats = build_warmup([r for r in recs if not r.get("failed")], tie="first")
    assert ex == clean and stats.failed_records == 2 and clean_stats.failed_records == 0
    assert {e.problem_id: e.key for e in ex}["p0"] == keys[3]
    assert stats.failed_by_key == {keys[0]: 1, keys[1]: 1}
    # a record with failed true and a numeric reward (a hand-edited file) is skipped all the same
    odd = [dict(r, reward=1.0, score=1.0) if r.get("failed") else r for r in recs]
    assert build_warmup(odd, tie="first")[0] == clean
    # a failed record and a later successful retry of it: the retry counts, and is no duplicate
    retry = dict(next(r for r in recs if r.get("failed") and r["problem_id"] == "p1"), failed=False, reward=2.0,
                 score=1.0, error=None)
    ex2, stats2 = build_warmup([*recs, retry], tie="first")
    assert stats2.failed_records == 2 and {e.problem_id: e.key for e in ex2}["p1"] == keys[1]
    assert "failed (skipped)" in [c.header for c in stats.table().columns]


def test_action_table_skips_failed_records_and_policies_count_them(space):
    from haps.evaluate import ActionTable, lookup_report, recompute_rewards, report_table, standard_policies
    from haps.metrics import RewardConfig

    keys = [space.key(z) for z in space.assignments()]
    recs = _records(space, ["p0", "p1"], {("p0", keys[0])}, split="test")
    table = ActionTable.from_records(recs, space, "test")
    assert table.failed_records == 1 and math.isnan(float(table.reward[0, 0]))
    assert bool(table.failed[0, 0]) and int(table.failed.sum()) == 1
    rep = lookup_report(table, standard_policies(table))
    assert rep["failed_records"] == 1
    fixed0 = rep["policies"][f"fixed:{keys[0]}"]
    # p0 has no reward for that assignment (it failed): not averaged, counted as failed, not as missing
    assert fixed0["failed"] == 1 and fixed0["missing"] == 0 and fixed0["problems"] == 1
    assert rep["policies"]["oracle"]["failed"] == 0 and rep["policies"]["random"]["failed"] == 0
    assert not math.isnan(rep["policies"]["random"]["reward"])
    assert "failed" in [c.header for c in report_table(rep).columns]
    # recomputing rewards leaves failed records without one
    again = recompute_rewards(recs, RewardConfig(kind="tradeoff", alpha=1.0, beta=0.5))
    assert [r["reward"] for r in again if r.get("failed")] == [None]
    assert ActionTable.from_records(again, space, "test").failed_records == 1


def test_sft_datasets_skip_failed_records(tmp_path):
    """`build_datasets` (what `haps sft` trains and validates on) never reads a failed record."""
    from haps.config import load_pool
    from haps.data import load_problems
    from haps.routing.space import AssignmentSpace
    from haps.train.collect import ACTIONS, MANIFEST, CollectConfig
    from haps.train.sft import SFTConfig, build_datasets

    pool = load_pool("tiny")
    space = AssignmentSpace.of(["teacher", "student"], pool.names)
    cfg = CollectConfig(task="mmlu", limit=6, pool="tiny")
    pids = [p.id for p in load_problems("mmlu", None, 6)]
    keys = [space.key(z) for z in space.assignments()]
    failed = {(pids[0], keys[0]), (pids[3], keys[2])}
    recs = _records(space, pids[:3], failed, "train") + _records(space, pids[3:], failed, "valid")
    (tmp_path / ACTIONS).write_text("".join(json.dumps(r) + "\n" for r in recs))
    manifest = {"format": "haps-actions/1", "config": cfg.model_dump(mode="json"), "pool": pool.model_dump(mode="json"),
                "roles": list(space.roles), "models": pool.names, "n_problems": 6, "runs": []}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    train, valid, stats, _ = build_datasets(tmp_path, SFTConfig(tie="first"))
    assert stats.failed_records == 1  # the train split's one
    assert {e.prompt.problem_id for e in train} == set(pids[:3])
    assert valid.table.failed_records == 1 and math.isnan(float(valid.table.reward[0, 2]))
