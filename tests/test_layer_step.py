"""The one-token decoder-layer steps (`haps.models.layer_step`) equal the layer modules' own forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from haps.config import LoraTarget
from haps.models.decode import LeanDecode, StaticKVCache, _module_step
from haps.models.layer_step import LAYER_STEPS, project, step_supported
from haps.models.lora import PerRequestLoRALinear


@pytest.fixture(params=["tiny_llama", "tiny_gemma3"])
def tiny(request):
    return request.getfixturevalue(request.param)


def _cache(cfg, b: int, past: int, capacity: int, seed: int) -> StaticKVCache:
    g = torch.Generator().manual_seed(seed)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (b, cfg.num_key_value_heads, capacity, hd)
    keys = [torch.randn(shape, generator=g) for _ in range(cfg.num_hidden_layers)]
    values = [torch.randn(shape, generator=g) for _ in range(cfg.num_hidden_layers)]
    return StaticKVCache(keys, values, past)


def _clone(c: StaticKVCache) -> StaticKVCache:
    return StaticKVCache([k.clone() for k in c.keys], [v.clone() for v in c.values], c.length)


@pytest.mark.parametrize("adapters", ["none", "mixed", "row_loop"])
@torch.no_grad()
def test_layer_step_equals_the_layer_forward(tiny, adapters):
    model, cfg = tiny.model, tiny.model.config
    b, past = 5, 23  # past > Gemma's tiny sliding window (16): the sliding mask below is exercised
    decoder = model.get_decoder()
    target = LoraTarget(last_k_layers=2, rank=3)
    inj = tiny.injector(target)
    g = torch.Generator().manual_seed(0)
    if adapters != "none":
        stacked = [(torch.randn(b, o, 3, generator=g) * (torch.arange(b) % 2)[:, None, None],  # even rows: none
                    torch.randn(b, 3, i, generator=g)) for o, i in inj.shapes]
        inj.set(stacked)
        for w in inj.wrappers:
            w.row_loop = adapters == "row_loop"
    try:
        h = torch.randn(b, cfg.hidden_size, generator=g)
        pos = torch.arange(past, past + b)[:, None]  # (b, 1): rows at different positions
        pad = torch.zeros(b, past + 1)
        pad[0, :3] = torch.finfo(torch.float32).min  # row 0 has left padding
        types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
        cache_ref, cache_new = _cache(cfg, b, past, past + 4, 1), None
        cache_new = _clone(cache_ref)
        for li, layer in enumerate(decoder.layers):
            mask = pad[:, None, None, :].clone()
            if types[li] == "sliding_attention":
                mask[..., : past + 1 - cfg.sliding_window] = torch.finfo(torch.float32).min
            cos, sin = (decoder.rotary_emb(h[:, None], pos) if cfg.model_type == "llama"
                        else decoder.rotary_emb(h[:, None], pos, types[li]))
            ref = _module_step(layer, h, cos[:, 0], sin[:, 0], mask, cache_ref, li)
            new = LAYER_STEPS[cfg.model_type](layer, h, cos[:, 0], sin[:, 0], mask, cache_new, li)
            torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache_new.keys[li], cache_ref.keys[li], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache_new.values[li], cache_ref.values[li], rtol=1e-5, atol=1e-5)
            h = ref
    finally:
        inj.set(None)
        for w in inj.wrappers:
            w.row_loop = False


def test_lean_engine_uses_the_layer_steps(tiny):
    assert step_supported(tiny.model)
    assert LeanDecode(tiny.model, 4).layer_step is LAYER_STEPS[tiny.model.config.model_type]


def test_soft_capped_attention_keeps_the_module_forward(tiny_gemma3):
    cfg = tiny_gemma3.model.config
    saved, cfg.attn_logit_softcapping = cfg.attn_logit_softcapping, 50.0
    try:
        assert not step_supported(tiny_gemma3.model)
        assert LeanDecode(tiny_gemma3.model, 4).layer_step is _module_step
    finally:
        cfg.attn_logit_softcapping = saved


@torch.no_grad()
def test_project_equals_the_module():
    torch.manual_seed(0)
    x = torch.randn(6, 12)
    for lin in (nn.Linear(12, 7, bias=False), nn.Linear(12, 7)):
        torch.testing.assert_close(project(lin, x), lin(x), rtol=1e-5, atol=1e-6)
        wrapped = PerRequestLoRALinear(lin, alpha=2.0)
        assert torch.equal(project(wrapped, x), project(lin, x))  # no adapters: exactly the base path
        wrapped.set_adapters(torch.randn(6, 7, 2), torch.randn(6, 2, 12))
        torch.testing.assert_close(project(wrapped, x), wrapped(x[:, None])[:, 0], rtol=1e-5, atol=1e-5)
        wrapped.row_loop = True
        assert torch.equal(project(wrapped, x), wrapped(x[:, None])[:, 0])
