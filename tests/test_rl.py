"""Joint RL: the loss on hand-made rewards, which parameters an update touches, that a planted assignment and
adapter direction are learnt, and that a run killed with SIGKILL resumes to the very same next step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from haps.errors import ConfigError
from haps.metrics import RewardConfig
from haps.models.types import GenRequest
from haps.routing.low_level import LowLevelConfig
from haps.train.rl import RLConfig, RLRecipe
from haps.train.rl_loss import advantages, baselines, policy_loss, token_weights
from rl_toy import GOOD_TEACHER, toy_pool, toy_problems, toy_router, toy_workflow

TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------- the loss
def test_baselines_on_hand_made_rewards():
    r = [1.0, -1.0, 0.5, 0.0]
    assert baselines(r, [0, 0, 1, 1], "none") == [0.0] * 4
    assert baselines(r, [0, 0, 1, 1], "mean", running_mean=0.25) == [0.25] * 4
    assert baselines(r, [0, 0, 1, 1], "mean", running_mean=None) == [0.0] * 4
    assert baselines(r, [0, 0, 1, 1], "group") == [-1.0, 1.0, 0.0, 0.5]  # leave-one-out within each problem
    assert baselines([1.0, 2.0, 3.0], [0, 0, 0], "group") == [2.5, 2.0, 1.5]
    with pytest.raises(ConfigError, match="at least 2 episodes per problem"):
        baselines([1.0, 2.0], [0, 1], "group")
    assert advantages([3.0, -4.0, 0.5], [0.0, 0.0, 1.0], max_advantage=2.0) == [2.0, -2.0, -0.5]
    assert advantages([3.0], [1.0], None) == [2.0]


def test_shaped_reward_and_loss_sign():
    shaped = RewardConfig(kind="shaped")
    assert [shaped.compute(s) for s in (0.0, 0.4, 1.0)] == [-1.0, 0.4, 1.0]
    w = [1.0, -1.0]  # a rewarded and a punished episode
    route = torch.tensor([-0.5, -1.5], requires_grad=True)
    tokens = torch.tensor([-10.0, -20.0], requires_grad=True)
    loss = policy_loss(w, route, tokens, [5, 10], routing_term=True, token_norm="sum")
    assert float(loss.detach()) == pytest.approx(-(1 * (-0.5 - 10) + (-1) * (-1.5 - 20)) / 2)  # = -5.5
    loss.backward()
    # descending the loss raises the rewarded episode's log-probs and lowers the punished one's
    assert route.grad.tolist() == [-0.5, 0.5] and tokens.grad.tolist() == [-0.5, 0.5]
    no_route = policy_loss(w, None, tokens.detach(), [5, 10], routing_term=False)
    assert float(no_route) == pytest.approx(-(1 * -10 + (-1) * -20) / 2)
    mean = policy_loss(w, route.detach(), tokens.detach(), [5, 10], routing_term=True, token_norm="mean")
    assert float(mean) == pytest.approx(-(1 * (-0.5 - 10 / 5) + (-1) * (-1.5 - 20 / 10)) / 2)
    assert token_weights([2.0, 2.0], [4, 0], "mean") == [0.5, 0.0]
    with pytest.raises(ConfigError, match="no log P"):
        policy_loss(w, None, tokens, [5, 10], routing_term=True)


# ---------------------------------------------------------------------------------------------- the recipe
def _config(**kw) -> RLConfig:
    base = dict(task="toy-rl", batch_size=4, train_limit=None, valid_limit=4, test_limit=4, max_new_tokens=4,
                temperature=1.0, top_p=1.0, reward=RewardConfig(kind="score"), lr_backbone=1e-3, lr_heads=1e-2,
                validate_every=100, save_every=1, low_level_config=LowLevelConfig(init="xavier"))
    base.update(kw)
    return RLConfig(**base)


def _recipe(tmp_path, smol_tokenizer, tiny_llama, tiny_gemma3, *, closed=False, n=20, **kw) -> RLRecipe:
    cfg = _config(**kw)
    pool = toy_pool(tiny_llama, tiny_gemma3, closed=closed, sharpen=10.0)
    wf = toy_workflow(pool)
    rec = RLRecipe(cfg, tmp_path / "run", progress=False)
    rec.setup(pool=pool, workflow=wf, router=toy_router(smol_tokenizer, pool, wf, cfg.low_level_config),
              problems=toy_problems(n))
    return rec


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_unused_heads_get_no_gradient_and_no_step(tmp_path, smol_tokenizer, tiny_llama, tiny_gemma3):
    rec = _recipe(tmp_path, smol_tokenizer, tiny_llama, tiny_gemma3, high_level="fixed",
                  fixed_assignment="teacher=tiny-llama,student=tiny-llama", reward=RewardConfig(kind="shaped"))
    used, unused = rec.router.generators["tiny-llama"], rec.router.generators["tiny-gemma3"]
    before_used, before_unused = _snapshot(used), _snapshot(unused)
    backbone0 = [p.detach().clone() for p in rec.router.parameters("backbone")]
    out = rec.step(0)
    assert out.assignments == {"teacher=tiny-llama,student=tiny-llama": 4}
    assert all(torch.equal(v, before_unused[k]) for k, v in unused.state_dict().items())
    assert not rec.optimizer.state.get(unused.out_A.weight)  # no AdamW state: it never took a step
    assert any(not torch.equal(v, before_used[k]) for k, v in used.state_dict().items())
    # no high-level router: the backbone moves only through the heads' shared representation
    assert any(not torch.equal(p, q) for p, q in zip(rec.router.parameters("backbone"), backbone0, strict=True))


def test_closed_model_turns_add_no_token_term(tmp_path, smol_tokenizer, tiny_llama, tiny_gemma3, monkeypatch):
    rec = _recipe(tmp_path, smol_tokenizer, tiny_llama, tiny_gemma3, closed=True, high_level="fixed",
                  fixed_assignment="teacher=tiny-gemma3,student=tiny-llama")
    scored: list[str] = []
    for name in ("tiny-llama", "tiny-gemma3"):
        backend = rec.pool.backend(name)
        orig = backend.score

        def spy(*a, _orig=orig, _name=name, **k):
            scored.append(_name)
            return _orig(*a, **k)

        monkeypatch.setattr(backend, "score", spy)
    rec.step(0)
    assert scored and set(scored) == {"tiny-llama"}  # the closed teacher's turns are never re-scored


def test_failed_episodes_are_no_rewards_in_training_or_validation(tmp_path, smol_tokenizer, tiny_llama, tiny_gemma3,
                                                                 monkeypatch):
    """The closed teacher's call fails for 2 of the 4 problems (an API error after retries): those episodes are
    counted as failed and dropped; the step's reward and score are the other 2 episodes' (score 0.5 each: the
    good teacher, and the student's planted share); validation skips them the same way."""
    from haps.models.types import Generation

    rec = _recipe(tmp_path, smol_tokenizer, tiny_llama, tiny_gemma3, closed=True, high_level="fixed",
                  fixed_assignment="teacher=tiny-gemma3,student=tiny-llama", low_level=True)
    backend = rec.pool.backend("tiny-gemma3")
    orig = backend.generate
    problems = rec.batch_of(0)  # step 0's problems
    bad = {f"about the {p.question}:" for p in problems[:2]}

    def flaky(requests, *a, **k):
        out = orig(requests, *a, **k)
        return [Generation(text="", model="tiny-gemma3", finish_reason="error", error="APIConnectionError: refused")
                if any(b in r.prompt for b in bad) else g for r, g in zip(requests, out, strict=True)]

    monkeypatch.setattr(backend, "generate", flaky)
    rollout = rec._rollout(problems, 0)
    assert rollout["failed"] == 2 and len(rollout["results"]) == 2
    assert [r.id for r in rollout["results"]] == [p.id for p in problems[2:]]
    assert all(not r.failed and r.score is not None for r in rollout["results"])
    assert rollout["rewards"] == [r.score for r in rollout["results"]]  # reward kind "score": the kept episodes'
    record = rec.step(0)  # the same problems: the step trains on the 2 kept episodes
    assert record.failed == 2 and record.score_mean == pytest.approx(sum(rollout["rewards"]) / 2)
    summary, results = rec.evaluate(problems)
    ok = [r for r in results if not r.failed]
    assert summary["failed"] == 2 and [r.id for r in ok] == [p.id for p in problems[2:]]
    assert summary["score"] == pytest.approx(sum(r.score for r in ok) / 2)


def test_routing_term_alone_trains_the_backbone_without_adapters(tmp_path, smol_tokenizer, tiny_llama, tiny_gemma3):
    rec = _recipe(tmp_path, smol_tokenizer, tiny_llama, tiny_gemma3, low_level=False)
    heads0 = _snapshot(rec.router.generators)
    backbone0 = [p.detach().clone() for p in rec.router.parameters("backbone")]
    rec.step(0)
    assert all(torch.equal(v, heads0[k]) for k, v in rec.router.generators.state_dict().items())
    assert any(not torch.equal(p, q) for p, q in zip(rec.router.parameters("backbone"), backbone0, strict=True))
    with pytest.raises(ConfigError, match="nothing to train"):
        _recipe(tmp_path / "x", smol_tokenizer, tiny_llama, tiny_gemma3, low_level=False, routing_term=False)


def test_planted_assignment_and_adapter_direction_are_learnt(tmp_path, smol_tokenizer, tiny_llama, tiny_gemma3):
    """Reward = 0.5 [teacher on tiny-gemma3] + 0.5 share of the student's tokens in a planted half of the
    vocabulary (one embedding direction). With a fixed seed: P(good teacher | p) rises, the probability mass the
    student puts on the planted tokens under its generated adapter rises, and so does the reward."""
    rec = _recipe(tmp_path, smol_tokenizer, tiny_llama, tiny_gemma3, n=40, epochs=2, baseline="mean",
                  token_norm="mean", max_new_tokens=6)
    good = rec.router.space.models.index(GOOD_TEACHER)
    probe = rec.data.train[:8]
    before = _probe(rec, probe, good)
    records = [rec.step(k) for k in range(20)]
    after = _probe(rec, probe, good)
    first, last = records[:4], records[-4:]
    assert after["p_good"] > before["p_good"] + 0.2, (before, after)
    # tiny-gemma3's one adapter also serves the (unrewarded) teacher role, so its share moves less
    assert after["tiny-llama"] > before["tiny-llama"] + 0.1, (before, after)
    mean = lambda d: (d["tiny-llama"] + d["tiny-gemma3"]) / 2  # noqa: E731
    assert mean(after) > mean(before) + 0.05, (before, after)
    assert sum(r.reward_mean for r in last) / 4 > sum(r.reward_mean for r in first) / 4 + 0.1


def _probe(rec: RLRecipe, problems, good: int) -> dict[str, float]:
    """P(teacher = good | p), and per student model the mass its next-token distribution puts on the planted
    tokens right after the student prompt, under the adapter generated for it (averaged over ``problems``)."""
    from haps.models.adapters import adapters_in_scope
    from haps.routing.prompt import build_routing_prompt

    space, target = rec.router.space, rec.pool.config.lora
    prompts = [build_routing_prompt(rec.workflow, rec.pool.config, p) for p in problems]
    out = {}
    with torch.no_grad():
        decs = rec.router.decide(prompts, "argmax")
        out["p_good"] = sum(sum(float(d.probs[i]) for i, z in enumerate(space.assignments()) if z[0] == good)
                            for d in decs) / len(decs)
        for k, model in enumerate(space.models):
            backend = rec.pool.backend(model)
            planted = torch.tensor(sorted(rec.workflow.planted[model]))
            given = rec.router.decide(prompts, "given", assignments=[(good, k)] * len(prompts))
            mass = 0.0
            for p, d in zip(problems, given, strict=True):
                ids = torch.tensor([backend.encode(GenRequest(prompt=f"Student, about the {p.question}:"))[1]])
                with adapters_in_scope(backend.adapter_batch([d.adapters["student"]], target)):
                    logits = backend.model(input_ids=ids).logits[0, -1]
                mass += float(torch.softmax(logits.float(), -1)[planted].sum())
            out[model] = mass / len(problems)
    return out


# ---------------------------------------------------------------------------------------------- resume
RUNNER = """
import sys, json, torch
sys.path.insert(0, {tests!r})
import conftest, rl_toy
from transformers import AutoTokenizer
from haps.models.sources import resolve
from haps.config import load_pool
from haps.train.rl import RLRecipe, RLConfig
tok = AutoTokenizer.from_pretrained(resolve(load_pool("tiny").get("smollm2-135m")).path)
llama = conftest.build_tiny_llama(tok)
gemma = conftest.build_tiny_gemma3(tok)
cfg = RLConfig.model_validate_json({cfg!r})
pool = rl_toy.toy_pool(llama, gemma, sharpen=10.0)
wf = rl_toy.toy_workflow(pool)
rec = RLRecipe(cfg, {out!r}, progress=False)
rec.setup(pool=pool, workflow=wf, router=rl_toy.toy_router(tok, pool, wf, cfg.low_level_config),
          problems=rl_toy.toy_problems(20))
rec.train({steps})
"""


def _run(out: Path, cfg: RLConfig, steps: int) -> subprocess.Popen:
    code = RUNNER.format(tests=str(TESTS), cfg=cfg.model_dump_json(), out=str(out), steps=steps)
    env = dict(os.environ, PYTHONPATH=str(TESTS), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _log(out: Path) -> list[dict]:
    p = out / "log.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def test_sigkill_and_resume_gives_the_uninterrupted_next_step(tmp_path):
    cfg = _config(validate_every=2, test_limit=2, epochs=2)
    ref = _run(tmp_path / "ref", cfg, 4)
    assert ref.wait(timeout=600) == 0, ref.stdout.read().decode()[-3000:]
    want = _log(tmp_path / "ref")
    assert [r["step"] for r in want] == [0, 1, 2, 3]
    proc = _run(tmp_path / "killed", cfg, 4)
    deadline = time.time() + 600
    while len(_log(tmp_path / "killed")) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # somewhere in step 2 (or while saving after step 1)
    proc.wait()
    assert not (tmp_path / "killed" / "summary.json").exists()  # it really was cut short
    latest = json.loads((tmp_path / "killed" / "state" / "latest.json").read_text())["step"]
    assert 1 <= latest <= 2
    again = _run(tmp_path / "killed", cfg, 4)
    assert again.wait(timeout=600) == 0, again.stdout.read().decode()[-3000:]
    got = _log(tmp_path / "killed")
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    for a, b in zip(got, want, strict=True):
        for key in ("reward_mean", "score_mean", "loss", "log_p_mean", "assignments", "adapter_norms", "tokens"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary == json.loads((tmp_path / "ref" / "summary.json").read_text())
