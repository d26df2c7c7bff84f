"""Routing prompt, router registry, high-level router on a tiny random backbone, SFT, checkpoints,
evaluation by lookup."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from haps.errors import ConfigError
from haps.evaluate import ActionTable, lookup_report, router_policies, standard_policies
from haps.routers import get_router
from haps.routing.base import ROUTERS
from haps.routing.high_level import (
    HighLevelRouter,
    HighLevelRouterConfig,
    RouterLoraConfig,
    candidate_scores,
    load_router,
    reference_scores,
)
from haps.routing.prompt import (
    RoutingPrompt,
    assignment_json,
    build_routing_prompt,
    build_system_prompt,
    parse_assignment_json,
)
from haps.routing.space import AssignmentSpace
from haps.train.sft import Example, SFTConfig, SFTRecipe, ValidationSet

SPACE = AssignmentSpace.of(["teacher", "student"], ["small", "big"])


class ToyWorkflow:
    name = "toy"
    roles = ("teacher", "student")
    task_description = "Solve arithmetic questions."
    role_definitions = {"student": "Writes the answer.", "teacher": "Checks the answer."}

    def problem_text(self, problem):
        return problem.question


def toy_pool():
    return [SimpleNamespace(name="small", description="a small model"), SimpleNamespace(name="big", description="")]


WORDS = ["apple", "river", "tiger", "piano", "candle", "rocket", "garden", "window", "silver", "forest",
         "bottle", "castle", "pencil", "thunder", "mirror", "jacket", "planet", "coffee", "dragon", "summer"]


def short_prompts(n: int, space=SPACE) -> list[RoutingPrompt]:
    sys = build_system_prompt(space.roles)
    return [RoutingPrompt(f"p{i}", sys, f"Question about the {WORDS[i % len(WORDS)]}.", space) for i in range(n)]


def tiny_backbone(tok, seed=0, layers=2, init=0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=init, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg)


@pytest.fixture()
def router(smol_tokenizer):
    return HighLevelRouter(tiny_backbone(smol_tokenizer), smol_tokenizer, SPACE, HighLevelRouterConfig(batch_size=4))


# ------------------------------------------------------------------------------------------- prompt
def test_routing_prompt_has_four_parts_from_workflow_and_pool():
    p = build_routing_prompt(ToyWorkflow(), toy_pool(), SimpleNamespace(id="x1", question="What is 2+2?"))
    assert p.problem_id == "x1" and p.space == SPACE
    assert '{ "teacher": <id>, "student": <id> }' in p.system
    u = p.user
    for part in ("Solve arithmetic questions.", "Student Agent Introduction\n\nWrites the answer.",
                 "Teacher Agent Introduction\n\nChecks the answer.", "What is 2+2?", "0: small - a small model",
                 "1: big", "0 or 1"):
        assert part in u
    assert u.index("Dataset Background") < u.index("Agent Introduction") < u.index("What is 2+2?") < u.index("Candidates")
    assert [m["role"] for m in p.messages] == ["system", "user"]


def test_assignment_json_and_parse():
    assert assignment_json([0, 1], SPACE.roles) == '{"teacher": 0, "student": 1}'
    assert assignment_json({"student": 1, "teacher": 0}, SPACE.roles) == '{"teacher": 0, "student": 1}'
    assert parse_assignment_json('blah {"teacher": 1, "student": 0} tail', SPACE) == (1, 0)
    assert parse_assignment_json('{"student": 1, "teacher": 1}', SPACE) == (1, 1)
    for bad in ('{"teacher": 2, "student": 0}', '{"teacher": "0", "student": 0}', '{"teacher": 0}',
                '{"teacher": true, "student": 0}', "teacher 0 student 1", '{"teacher": 0, "student": 1, "x": 0}'):
        assert parse_assignment_json(bad, SPACE) is None


def test_space_index_roundtrip():
    sp = AssignmentSpace.of(["a", "b", "c"], ["x", "y", "z"])
    assert [sp.index(z) for z in sp.assignments()] == list(range(27))
    assert all(sp.at(sp.index(z)) == z for z in sp.assignments())
    assert sp.from_key(sp.key((2, 0, 1))) == (2, 0, 1)
    with pytest.raises(ConfigError, match="unknown model"):
        sp.from_names({"a": "x", "b": "w", "c": "x"})


# ------------------------------------------------------------------------------------------- registry
def test_registry_fixed_and_random():
    assert {"fixed", "random", "high_level"} <= set(ROUTERS)
    with pytest.raises(ConfigError, match="known routers"):
        get_router("nope", space=SPACE)
    ps = short_prompts(5)
    fixed = get_router("fixed:teacher=big,student=small", space=SPACE)
    assert fixed.route(ps) == [(1, 0)] * 5
    assert get_router("fixed:0,1", space=SPACE).route(ps) == [(0, 1)] * 5
    with pytest.raises(ConfigError, match="needs an assignment"):
        get_router("fixed", space=SPACE)
    rnd = get_router("random", space=SPACE, seed=3)
    picks = rnd.route(short_prompts(40))
    assert all(z in SPACE.assignments() for z in picks) and len(set(picks)) == 4
    assert torch.allclose(rnd.probs(ps), torch.full((5, 4), 0.25))
    big = AssignmentSpace.of(["a", "b", "c", "d"], [f"m{i}" for i in range(5)])  # 625 > 64: role by role
    zs = get_router("random", space=big).route(short_prompts(10, big))
    assert all(len(z) == 4 and all(0 <= v < 5 for v in z) for z in zs)


# ------------------------------------------------------------------------------------------- high-level
def test_fast_scores_equal_reference(router):
    ps = short_prompts(5)
    zs = SPACE.assignments()
    with torch.no_grad():
        fast = router.scores(ps)
        slow = router.scores(ps, fast=False)
    assert fast.shape == (5, 4)
    assert torch.allclose(fast, slow, atol=1e-4), (fast - slow).abs().max()
    # mixed answer lengths per row (different candidate sets) also match
    pids = [router.prompt_ids(p) for p in ps[:2]]
    cands = [[router.answer_ids(zs[0]), [5, 6]], [[7], router.answer_ids(zs[3])]]
    with torch.no_grad():
        a, n = candidate_scores(router.model, pids, cands, router.pad_id)
        b = reference_scores(router.model, pids, cands)
    assert torch.allclose(a, b, atol=1e-4) and n.tolist() == [[len(cands[0][0]), 2], [1, len(cands[1][1])]]


def test_answer_tokens_are_the_canonical_json(router, smol_tokenizer):
    for z in SPACE.assignments():
        ids = router.answer_ids(z)
        assert ids[-1] == smol_tokenizer.eos_token_id
        assert smol_tokenizer.decode(ids[:-1]) == assignment_json(z, SPACE.roles)


def test_random_backbone_always_routes_validly(router):
    ps = short_prompts(6)
    zs = router.route(ps)
    assert all(z in SPACE.assignments() for z in zs)
    p = router.probs(ps)
    assert torch.allclose(p.sum(1), torch.ones(6), atol=1e-5)
    assert [SPACE.at(int(i)) for i in p.argmax(1)] == zs
    sampled = router.route(ps, decision="sample")
    assert all(z in SPACE.assignments() for z in sampled)
    # log-prob with gradient (for RL)
    router.train_mode(True)
    lp = router.log_prob(ps[:2], [(0, 1), (1, 1)])
    lp.sum().backward()
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in router.parameters())
    router.train_mode(False)
    # free-form answers of a random model do not parse: reported, never replaced by a default
    rep = router.free_form_parse_rate(ps[:2], max_new_tokens=4)
    assert rep["n"] == 2 and 0.0 <= rep["rate"] <= 1.0 and len(rep["assignments"]) == 2


def test_factorised_routing_for_large_spaces(smol_tokenizer):
    big = AssignmentSpace.of(["teacher", "student", "critic"], [f"m{i}" for i in range(12)])  # 1728
    r = HighLevelRouter(tiny_backbone(smol_tokenizer), smol_tokenizer, big, HighLevelRouterConfig(max_enumerate=64))
    ps = short_prompts(3, big)
    zs = r.route(ps)
    assert all(len(z) == 3 and all(0 <= v < 12 for v in z) for z in zs)
    with pytest.raises(ConfigError, match="max_enumerate"):
        r.log_probs(ps)
    lp = r.log_prob(ps, zs)
    assert lp.shape == (3,) and bool((lp <= 0).all())


# ------------------------------------------------------------------------------------------- SFT + lookup
def _overfit_data(n=16):
    # short prompts: a one-line system prompt and the distinguishing word 16 times (it dominates attention averages)
    ps = [RoutingPrompt(f"p{i}", "Route.", " ".join([WORDS[i]] * 16), SPACE) for i in range(n)]
    targets = [SPACE.at((i * 7 + i // 4) % 4) for i in range(n)]
    recs = []
    for p, t in zip(ps, targets, strict=False):
        for z in SPACE.assignments():
            r = 1.0 if z == t else 0.0
            recs.append({"problem_id": p.problem_id, "split": "valid", "key": SPACE.key(z),
                         "assignment": SPACE.to_names(z), "reward": r, "score": r, "cost": 0.1 * (1 + sum(z))})
    table = ActionTable.from_records(recs, SPACE)
    return [Example(p, t) for p, t in zip(ps, targets, strict=False)], ValidationSet(ps, table)


def test_sft_overfits_16_examples_to_full_lookup_accuracy(smol_tokenizer):
    # init std 0.2: at the usual 0.02 a random 2-layer model attends uniformly and ignores the prompt
    # for hundreds of steps; with 0.2, full batches and beta2 0.95 it memorises the 16 labels in ~50 steps
    router = HighLevelRouter(tiny_backbone(smol_tokenizer, init=0.2), smol_tokenizer, SPACE,
                             HighLevelRouterConfig(batch_size=16))
    train, valid = _overfit_data()
    cfg = SFTConfig(epochs=50, lr=1e-2, batch_size=16, warmup_ratio=0.0, max_grad_norm=None, betas=(0.9, 0.95))
    rec = SFTRecipe(cfg)
    rec.setup(router, train, valid)
    saved = []
    hist = rec.train(progress=False, on_best=lambda r: saved.append(r.best["epoch"]))
    assert hist[-1].loss < hist[1].loss
    assert rec.best["best_rate"] == 1.0 and rec.best["reward"] == 1.0, [h.valid.get("best_rate") for h in hist]
    assert saved and saved[-1] == rec.best["epoch"]
    # lookup evaluation against the baselines
    pols = {**standard_policies(valid.table), **router_policies(router, valid.table, valid.prompts)}
    rep = lookup_report(valid.table, pols)["policies"]
    assert rep["oracle"]["reward"] == 1.0 and rep["random"]["reward"] == pytest.approx(0.25)
    assert rep["router"]["reward"] == 1.0
    assert max(v["reward"] for k, v in rep.items() if k.startswith("fixed:")) < 1.0
    assert math.isclose(sum(rep["router"]["selection"].values()), 1.0)


def test_validation_ties_are_broken_by_expected_reward(smol_tokenizer):
    """The best epoch is the highest lookup reward, then the highest E_{z~P(z|p)}[R]: epochs whose argmax
    picks tie (common on a few validation problems) are told apart by the router's distribution."""
    from haps.train.sft import _rank

    router = HighLevelRouter(tiny_backbone(smol_tokenizer, seed=3), smol_tokenizer, SPACE)
    train, valid = _overfit_data(8)
    rec = SFTRecipe(SFTConfig(epochs=1, batch_size=4))
    rec.setup(router, train, valid)
    v = rec.validate()
    assert 0.0 <= v["expected_reward"] <= 1.0
    assert _rank({"reward": 0.5, "expected_reward": 0.3}) > _rank({"reward": 0.5, "expected_reward": 0.2})
    assert _rank({"reward": 0.6, "expected_reward": 0.0}) > _rank({"reward": 0.5, "expected_reward": 0.9})
    assert _rank({"reward": 0.5, "expected_reward": 0.0}) > _rank({"reward": 0.5})


def test_first_losses_are_pinned(smol_tokenizer):
    """The loss is the mean answer-token NLL; two runs with one seed give the same first steps."""
    losses = []
    for _ in range(2):
        r = HighLevelRouter(tiny_backbone(smol_tokenizer, seed=5), smol_tokenizer, SPACE)
        train, _ = _overfit_data(8)
        rec = SFTRecipe(SFTConfig(epochs=2, lr=1e-3, batch_size=4, warmup_ratio=0.5))
        rec.setup(r, train, None)
        losses.append([h.loss for h in rec.train(progress=False)][1:])
    assert losses[0] == losses[1]
    assert 9.0 < losses[0][0] < 12.0  # ~ln(49152) = 10.8 for a random model


@pytest.mark.parametrize("lora", [False, True])
def test_checkpoint_roundtrip(smol_tokenizer, tmp_path, lora):
    cfg = HighLevelRouterConfig(lora=RouterLoraConfig(r=4) if lora else None)
    r = HighLevelRouter(tiny_backbone(smol_tokenizer, seed=2), smol_tokenizer, SPACE, cfg)
    if lora:  # move the adapter off its zero init so the round trip is not trivially equal
        with torch.no_grad():
            for n, p in r.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    ps = short_prompts(4)
    before = r.probs(ps)
    path = r.save(tmp_path / "ckpt", meta={"note": "test"})
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt")) and list(path.rglob("*.safetensors"))
    info = json.loads((path / "router.json").read_text())
    assert info["lora"] is lora and info["roles"] == list(SPACE.roles) and info["meta"]["note"] == "test"
    again = load_router(path)
    assert again.space == SPACE and again.config == r.config
    after = again.probs(ps)
    assert torch.allclose(before, after, atol=1e-6, rtol=0), (before - after).abs().max()
    assert again.route(ps) == r.route(ps)
    # a second save over the first replaces it atomically
    r.save(path)
    assert torch.allclose(load_router(path).probs(ps), before, atol=1e-6, rtol=0)


def test_shared_prefix_pass_equals_the_plain_pass(router):
    """The batch's common prompt prefix runs once; scores, their gradients and the prompt states (what the
    low-level router pools) equal the plain left-padded pass."""
    from haps.routing.high_level import shared_prefix_len
    from haps.routing.low_level import pool_states

    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 3], [1, 2, 5, 6]], minimum=1) == 2
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3]], minimum=1) == 2  # each keeps a token of its own
    assert shared_prefix_len([[1, 2, 3]], minimum=1) == 0 and shared_prefix_len([[1, 2], [1, 3]], minimum=2) == 0
    ps = short_prompts(3)
    pids = [router.prompt_ids(p) for p in ps]
    assert shared_prefix_len(pids) > len(pids[0]) // 2  # the system prompt is most of a short prompt
    cands = [[router.answer_ids(z) for z in SPACE.assignments()]] * 3
    outs = []
    for share in (False, True):
        router.model.zero_grad()
        router.train_mode(True)
        sc, n, hidden, own = candidate_scores(router.model, pids, cands, router.pad_id, prompt_states=True,
                                              share_prefix=share)
        sc.sum().backward()
        grad = torch.cat([q.grad.flatten() for q in router.parameters()])
        outs.append((sc.detach(), n, pool_states(hidden, own, "mean").detach(),
                     pool_states(hidden, own, "last").detach(), int(own.sum()), grad))
        router.train_mode(False)
    (a, na, ma, la, oa, ga), (b, nb, mb, lb, ob, gb) = outs
    assert torch.allclose(a, b, atol=1e-4) and torch.equal(na, nb) and oa == ob == sum(len(p) for p in pids)
    assert torch.allclose(ma, mb, atol=1e-4) and torch.allclose(la, lb, atol=1e-4)
    assert torch.allclose(ga, gb, atol=1e-4, rtol=1e-3)


def test_candidate_scores_on_a_sliding_window_backbone(tiny_gemma3):
    """Prompts sharing a 36-token prefix on a Gemma 3 backbone whose sliding window (16) is shorter: the plain
    pass runs (padding between a shared prefix and the suffixes would shift the window), equal to the twin."""
    length = 40
    g = torch.Generator().manual_seed(length)
    head = torch.randint(5, 900, (length - 4,), generator=g).tolist()
    pids = [head + torch.randint(5, 900, (n,), generator=g).tolist() for n in (3, 4, 6)]
    cands = [[[7, 8], [7, 9, 10], [11]]] * 3
    with torch.no_grad():
        fast, _ = candidate_scores(tiny_gemma3.model, pids, cands, 0)
        slow = reference_scores(tiny_gemma3.model, pids, cands)
    assert torch.allclose(fast, slow, atol=1e-4), (fast - slow).abs().max()
