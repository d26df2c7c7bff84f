"""The low-level router: generators on the shared backbone, initialisation, sharing, closed models, per-role
adapters, checkpoints, PEFT export."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from haps.config import LoraTarget
from haps.errors import ConfigError
from haps.models.types import GenRequest
from haps.routing.checkpoints import load_hierarchical, load_router, save_hierarchical
from haps.routing.low_level import GENERATORS, LowLevelConfig, pool_states
from haps.routing.prompt import build_routing_prompt
from rl_toy import ToyRLWorkflow, toy_pool, toy_problems, toy_router

WF = ToyRLWorkflow()


def _prompts(pool, n=3):
    return [build_routing_prompt(WF, pool.config, p) for p in toy_problems(n)]


def _both(z_key):
    return [tuple(int(v) for v in z_key)]


def test_registry_and_rectangular_shapes(smol_tokenizer, tiny_llama, tiny_gemma3):
    assert "mlp" in GENERATORS
    pool = toy_pool(tiny_llama, tiny_gemma3, LoraTarget(last_k_layers=2, rank=4))
    router = toy_router(smol_tokenizer, pool, WF)
    d = router.decide(_prompts(pool, 1), "given", assignments=[(1, 1)])[0]
    a = d.adapters["student"]
    assert d.adapters["teacher"] is a  # one adapter per (problem, model) unless per_role
    assert [tuple(x.shape) for x in a.A] == [(80, 4), (80, 4)] and [tuple(x.shape) for x in a.B] == [(4, 128)] * 2
    d0 = router.decide(_prompts(pool, 1), "given", assignments=[(0, 0)])[0]
    assert tuple(d0.adapters["student"].A[0].shape) == (64, 4)  # tiny Llama: 64 -> 64
    with pytest.raises(ConfigError, match="unknown adapter generator 'nope'"):
        type(router).build(router.high, router.sites, router.target, LowLevelConfig(generator="nope"))


def test_first_update_is_exactly_zero_and_A_still_gets_gradient(smol_tokenizer, tiny_llama, tiny_gemma3):
    pool = toy_pool(tiny_llama, tiny_gemma3)
    router = toy_router(smol_tokenizer, pool, WF)
    router.train_mode(True)
    prompts = _prompts(pool)
    with torch.enable_grad():
        decs = router.decide(prompts, "given", assignments=[(0, 0)] * 3)
    a = decs[0].adapters["student"]
    assert all(torch.equal(x, torch.zeros_like(x)) for x in a.A) and decs[0].norms["student"] == 0.0
    assert all(x.abs().sum() > 0 for x in a.B)
    req = GenRequest(prompt="Once upon a time", max_new_tokens=5)
    ids = tiny_llama.encode(req)[1]
    plain = tiny_llama.generate([req])[0]
    adapted = tiny_llama.generate([GenRequest(prompt="Once upon a time", max_new_tokens=5, adapter=a)],
                                  target=pool.config.lora)[0]
    assert adapted.token_ids == plain.token_ids and adapted.logprobs == plain.logprobs  # exactly the base model
    with torch.enable_grad():
        lp = tiny_llama.score([ids], [plain.token_ids], [a], pool.config.lora)
        lp.sum().backward()
    gen = router.generators["tiny-llama"]
    assert gen.out_A.weight.grad is not None and gen.out_A.weight.grad.abs().sum() > 0  # A learns first
    assert gen.out_B.weight.grad is None or gen.out_B.weight.grad.abs().sum() == 0  # dL/dB = 0 while A = 0
    assert router.generators["tiny-gemma3"].out_A.weight.grad is None  # the unused head


def test_xavier_init_gives_a_random_update_from_step_zero(smol_tokenizer, tiny_llama, tiny_gemma3):
    pool = toy_pool(tiny_llama, tiny_gemma3)
    router = toy_router(smol_tokenizer, pool, WF, LowLevelConfig(init="xavier"))
    decs = router.decide(_prompts(pool), "given", assignments=[(0, 0)] * 3)
    norms = [d.norms["student"] for d in decs]
    assert all(n > 0 for n in norms) and len(set(norms)) == 3  # per-request: one adapter per prompt
    gen = router.generators["tiny-llama"]
    assert torch.equal(gen.out_A.bias, torch.zeros_like(gen.out_A.bias))


@pytest.mark.parametrize("share", [True, False])
def test_low_level_loss_reaches_the_backbone_only_when_shared(smol_tokenizer, tiny_llama, tiny_gemma3, share):
    pool = toy_pool(tiny_llama, tiny_gemma3)
    router = toy_router(smol_tokenizer, pool, WF, LowLevelConfig(init="xavier", share_backbone=share))
    router.train_mode(True)
    assert (router.heads_backbone is None) == share
    with torch.enable_grad():
        d = router.decide(_prompts(pool, 2), "given", assignments=[(0, 0)] * 2)
        req = GenRequest(prompt="Hello there", max_new_tokens=3)
        out = tiny_llama.generate([req])[0]
        lp = tiny_llama.score([tiny_llama.encode(req)[1]] * 2, [out.token_ids] * 2,
                              [d[0].adapters["student"], d[1].adapters["student"]], pool.config.lora)
        lp.sum().backward()  # the token term only: no log P(z|p)
    backbone = [p.grad for p in router.parameters("backbone")]
    reached = any(g is not None and g.abs().sum() > 0 for g in backbone)
    assert reached == share
    assert router.generators["tiny-llama"].trunk[0].weight.grad.abs().sum() > 0
    if not share:
        assert all(p.grad is None for p in router.heads_backbone.parameters())


def test_closed_models_get_no_generator_and_no_adapter(smol_tokenizer, tiny_llama, tiny_gemma3):
    pool = toy_pool(tiny_llama, tiny_gemma3, closed=True)
    router = toy_router(smol_tokenizer, pool, WF, LowLevelConfig(init="xavier"))
    assert set(router.generators) == {"tiny-llama"}
    d = router.decide(_prompts(pool, 1), "given", assignments=[(1, 0)])[0]
    assert d.adapters["teacher"] is None and d.norms["teacher"] is None
    assert d.adapters["student"] is not None and d.norms["student"] > 0


def test_per_role_adapters_differ_by_role(smol_tokenizer, tiny_llama, tiny_gemma3):
    pool = toy_pool(tiny_llama, tiny_gemma3)
    router = toy_router(smol_tokenizer, pool, WF, LowLevelConfig(init="xavier", per_role=True))
    d = router.decide(_prompts(pool, 1), "given", assignments=[(0, 0)])[0]
    t, s = d.adapters["teacher"], d.adapters["student"]
    assert t is not s and torch.equal(t.A[0], s.A[0])  # the role embedding starts at zero
    with torch.no_grad():
        router.generators["tiny-llama"].role_embedding.weight.normal_()
    d = router.decide(_prompts(pool, 1), "given", assignments=[(0, 0)])[0]
    assert not torch.allclose(d.adapters["teacher"].A[0], d.adapters["student"].A[0])


def test_share_across_layers_reuses_one_pair(smol_tokenizer, tiny_llama, tiny_gemma3):
    pool = toy_pool(tiny_llama, tiny_gemma3, LoraTarget(last_k_layers=2, rank=4))
    router = toy_router(smol_tokenizer, pool, WF, LowLevelConfig(init="xavier", share_across_layers=True))
    a = router.decide(_prompts(pool, 1), "given", assignments=[(0, 0)])[0].adapters["student"]
    assert torch.equal(a.A[0], a.A[1]) and torch.equal(a.B[0], a.B[1])
    assert router.generators["tiny-llama"].out_A.out_features == 64 * 4  # one pair, not two


def test_pooling_mean_and_last():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(pool_states(h, mask, "mean"), torch.stack([h[0, 1:3].mean(0), h[1].mean(0)]))
    torch.testing.assert_close(pool_states(h, mask, "last"), torch.stack([h[0, 2], h[1, 3]]))


def test_argmax_and_sampled_decisions_match_the_high_level_router(smol_tokenizer, tiny_llama, tiny_gemma3):
    pool = toy_pool(tiny_llama, tiny_gemma3)
    router = toy_router(smol_tokenizer, pool, WF)
    prompts = _prompts(pool, 4)
    decs = router.decide(prompts, "argmax")
    with torch.no_grad():
        lp = router.high.log_probs(prompts)
    assert [d.assignment for d in decs] == router.high.route(prompts)
    for d, row in zip(decs, lp, strict=True):
        torch.testing.assert_close(d.probs, row.exp(), rtol=1e-5, atol=1e-6)
        assert float(d.log_prob.detach()) == pytest.approx(float(row[router.space.index(d.assignment)]), abs=1e-5)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_bad_inputs(smol_tokenizer, tiny_llama, tiny_gemma3, tmp_path):
    pool = toy_pool(tiny_llama, tiny_gemma3)
    router = toy_router(smol_tokenizer, pool, WF, LowLevelConfig(init="xavier", share_backbone=False))
    save_hierarchical(router, tmp_path / "r", task="toy-rl")
    back = load_router(tmp_path / "r", pool.config, "toy-rl")
    prompts = _prompts(pool, 3)
    a, b = router.decide(prompts, "argmax"), back.decide(prompts, "argmax")
    for x, y in zip(a, b, strict=True):
        assert x.assignment == y.assignment and x.norms == pytest.approx(y.norms)
        for role in x.adapters:
            torch.testing.assert_close(x.adapters[role].A[0], y.adapters[role].A[0])
    info = json.loads((tmp_path / "r" / "router.json").read_text())
    assert info["format"] == "haps-hierarchical-router/1" and info["sites"]["tiny-gemma3"]["shapes"] == [[80, 128]]
    # another pool, another task, a corrupt file: one line naming the problem and the fix
    other = toy_pool(tiny_llama, tiny_gemma3, closed=True)
    with pytest.raises(ConfigError, match=r"trained for the pool \['tiny-llama', 'tiny-gemma3'\].*use the pool"):
        load_hierarchical(tmp_path / "r", other.config)
    with pytest.raises(ConfigError, match="trained for the task 'toy-rl', not 'mmlu'; pass --task toy-rl"):
        load_hierarchical(tmp_path / "r", pool.config, "mmlu")
    heads = tmp_path / "r" / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="does not match its recorded checksum.*restore"):
        load_hierarchical(tmp_path / "r", pool.config)
    with pytest.raises(ConfigError, match="not a router checkpoint"):
        load_hierarchical(tmp_path, pool.config)


def test_closed_model_given_an_adapter_is_refused(smol_tokenizer, tiny_llama, tiny_gemma3):
    from haps.workflows import EpisodeJob, run_episodes

    pool = toy_pool(tiny_llama, tiny_gemma3, closed=True)
    router = toy_router(smol_tokenizer, pool, WF, LowLevelConfig(init="xavier"))
    a = router.decide(_prompts(pool, 1), "given", assignments=[(0, 0)])[0].adapters["student"]
    job = EpisodeJob(toy_problems(1)[0], {"teacher": "tiny-gemma3", "student": "tiny-llama"}, {"teacher": a})
    with pytest.raises(ConfigError, match="closed model 'tiny-gemma3', which takes no adapter"):
        run_episodes(pool, WF, [job], progress=False)


def test_export_round_trips_through_peft(smol_tokenizer, tiny_llama, tiny_gemma3, tmp_path):
    """The exported folder loaded with PeftModel.from_pretrained onto the base model gives haps' logits."""
    from peft import PeftModel

    from haps.export import write_peft_adapter
    from haps.models.adapters import adapters_in_scope
    from haps.models.lora import detach_lora
    from haps.quiet import peft_deprecations

    target = LoraTarget(last_k_layers=2, rank=4, alpha=0.5)
    pool = toy_pool(tiny_llama, tiny_gemma3, target)
    router = toy_router(smol_tokenizer, pool, WF, LowLevelConfig(init="xavier"))
    d = router.decide(_prompts(pool, 1), "given", assignments=[(0, 0)])[0]
    a = d.adapters["student"]
    base = copy.deepcopy(tiny_llama.model)
    detach_lora(base)
    base.save_pretrained(tmp_path / "base")
    write_peft_adapter(a, router.sites["tiny-llama"], target, str(tmp_path / "base"), tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == pytest.approx(2.0) and cfg["layers_to_transform"] == [2, 3]
    with peft_deprecations():  # peft's own call of a deprecated transformers method
        peft_model = PeftModel.from_pretrained(base, tmp_path / "peft")
    ids = torch.tensor([tiny_llama.encode(GenRequest(prompt="The river flows to the sea"))[1]])
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
        with adapters_in_scope(tiny_llama.adapter_batch([a], target)):
            want = tiny_llama.model(input_ids=ids).logits
        plain = copy.deepcopy(tiny_llama.model)
        detach_lora(plain)
        unadapted = plain(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want - unadapted).abs().max() > 1e-3  # the adapter matters, so the match says something
