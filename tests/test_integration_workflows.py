"""End-to-end episodes on the real tiny pool (SmolLM2-135M-Instruct + Gemma-3-270M base) with real
HotpotQA and MMLU problems. Tiny models are often wrong and sometimes off-format: these tests check
that episodes run to the end, are recorded and scored, not that the answers are right."""

from __future__ import annotations

import json

import pytest

from haps.data import load_problems
from haps.workflows import EpisodeJob, Sampling, get_workflow, run_episodes

pytestmark = pytest.mark.integration


def _check(results, jobs, log):
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(rows) == len(jobs) == len(results)
    for res, job in zip(results, jobs, strict=True):
        assert res.id == job.problem.id and res.assignment == job.assignment
        assert res.turns and all(t.tokens_in > 0 and t.tokens_out > 0 for t in res.turns)
        assert {t.model for t in res.turns} <= set(job.assignment.values())
        assert 0.0 <= res.score <= 1.0 and res.cost > 0
        assert res.tokens_out == sum(t.tokens_out for t in res.turns)
    return rows


def test_hotpotqa_episodes_on_real_models(real_pool, data_root, tmp_path):
    problems = load_problems("hotpotqa", data_root / "hotpotqa" / "dev_distractor.jsonl", limit=2)
    wf = get_workflow("hotpotqa", budget=1, summaries=True)
    jobs = [EpisodeJob(problems[0], {"teacher": "smollm2-135m", "student": "gemma3-270m"}),
            EpisodeJob(problems[1], {"teacher": "gemma3-270m", "student": "smollm2-135m"})]
    log = tmp_path / "hotpot.jsonl"
    results = run_episodes(real_pool, wf, jobs, sampling=Sampling(max_new_tokens=32), log_path=log,
                           progress=False, record_logprobs=True)
    _check(results, jobs, log)
    first = results[0].turns[0]
    assert first.role == "student" and first.model == "gemma3-270m"
    assert first.prompt.endswith("Thought:")  # base model: completion-style prompt
    assert len(first.token_ids) == len(first.logprobs) == first.tokens_out and first.prompt_text
    for res, prob in zip(results, problems, strict=True):
        titles = [title for title, _ in prob.context]
        for t in res.turns:
            if t.retrieved:  # a Search returns one of the problem's own paragraphs
                assert any(t.retrieved.startswith(f"{title}:") for title in titles)


def test_mmlu_episodes_on_real_models(real_pool, data_root, tmp_path):
    problems = load_problems("mmlu", data_root / "mmlu" / "val.jsonl", limit=2)
    wf = get_workflow("mmlu", rounds=2)
    jobs = [EpisodeJob(problems[0], {"teacher": "smollm2-135m", "student": "gemma3-270m"}),
            EpisodeJob(problems[1], {"teacher": "gemma3-270m", "student": "smollm2-135m"})]
    log = tmp_path / "mmlu.jsonl"
    results = run_episodes(real_pool, wf, jobs, sampling=Sampling(max_new_tokens=32), log_path=log, progress=False)
    _check(results, jobs, log)
    for res in results:
        assert res.prediction in (None, "A", "B", "C", "D")
        assert 2 <= len(res.turns) <= 4 and res.turns[0].role == "student"
