"""The one-token decoder-layer steps (`haps.models.layer_step`) equal the layer modules' own forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from haps.config import LoraTarget
from haps.models.adapters import AdapterBatch
from haps.models.attention import SharedPrefix, StepMask
from haps.models.decode import LeanDecode, StaticKVCache
from haps.models.engines import make_engine
from haps.models.hf_decode import HFDecode
from haps.models.layer_step import LAYER_STEPS, module_step, project, step_supported
from haps.models.lora import PerRequestLoRALinear, inject


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
    sites = inject(model, target)
    g = torch.Generator().manual_seed(0)
    batch = None
    if adapters != "none":
        s = (b + 1) // 2  # odd rows have an adapter each, even rows none
        batch = AdapterBatch(sites.layers, tuple(torch.randn(s, o, 3, generator=g) for o, _ in sites.shapes),
                             tuple(torch.randn(s, 3, i, generator=g) for _, i in sites.shapes),
                             torch.tensor([r // 2 if r % 2 else -1 for r in range(b)]), target.alpha,
                             "row_loop" if adapters == "row_loop" else "bmm")
    h = torch.randn(b, cfg.hidden_size, generator=g)
    pos = torch.arange(past, past + b)[:, None]  # (b, 1): rows at different positions
    pad = torch.zeros(b, past + 1)
    pad[0, :3] = torch.finfo(torch.float32).min  # row 0 has left padding
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
    cache_ref, cache_new = _cache(cfg, b, past, past + 4, 1), None
    cache_new = _clone(cache_ref)
    for li, layer in enumerate(decoder.layers):
        mask = pad[:, None, None, :].clone()
        own = StepMask(mask)
        if types[li] == "sliding_attention":
            mask[..., : past + 1 - cfg.sliding_window] = torch.finfo(torch.float32).min
            own = StepMask(pad[:, None, None, past + 1 - cfg.sliding_window:])  # the step reads the window only
        cos, sin = (decoder.rotary_emb(h[:, None], pos) if cfg.model_type == "llama"
                    else decoder.rotary_emb(h[:, None], pos, types[li]))
        ref = module_step(layer, h, cos[:, 0], sin[:, 0], StepMask(mask), cache_ref, li, batch)
        new = LAYER_STEPS[cfg.model_type](layer, h, cos[:, 0], sin[:, 0], own, cache_new, li, batch)
        torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache_new.keys[li], cache_ref.keys[li], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache_new.values[li], cache_ref.values[li], rtol=1e-5, atol=1e-5)
        if batch is not None and li in sites.layers:  # the adapters change this layer's output
            plain = module_step(layer, h, cos[:, 0], sin[:, 0], StepMask(mask), _clone(cache_new), li)
            assert not torch.allclose(plain[1], ref[1])  # row 1 has an adapter, row 0 has none:
            if batch.strategy == "bmm":
                assert torch.equal(plain[0], ref[0])
            else:  # one matmul per row (merged weights) rounds differently from the batched one
                torch.testing.assert_close(plain[0], ref[0], rtol=1e-5, atol=1e-6)
        h = ref


@torch.no_grad()
def test_steps_over_a_shared_prefix_equal_steps_over_the_concatenated_cache(tiny):
    """Rows 1-3 share a prefix stored once (`SharedPrefix`); the engine's masks (`LeanDecode._masks`, sliding
    windows shorter than the prefix included) and the two-part attention give what the layer's own forward
    gives over a cache holding each row's prefix before its own positions (other rows: masked padding)."""
    model, cfg = tiny.model, tiny.model.config
    decoder = model.get_decoder()
    b, Lp, past = 5, 20, 8  # the prefix is longer than Gemma's tiny window (16) and partly inside it
    n = past + 1
    group = [1, 2, 3]
    g = torch.Generator().manual_seed(3)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    h_kv = cfg.num_key_value_heads
    own = _cache(cfg, b, past, past + 4, 4)
    prefix = SharedPrefix(rows=torch.tensor(group),
                          keys=[torch.randn(1, h_kv, Lp, hd, generator=g) for _ in decoder.layers],
                          values=[torch.randn(1, h_kv, Lp, hd, generator=g) for _ in decoder.layers])
    own.shared = [prefix]
    pads = [3, 0, 0, 5, 0]  # rows 0 and 3 start with padding in their own buffer
    pad_add = torch.zeros(b, past + 4)
    for r, k in enumerate(pads):
        pad_add[r, :k] = torch.finfo(torch.float32).min
    pos = torch.tensor([(Lp if r in group else 0) + n - pads[r] - 1 for r in range(b)])  # (b,) absolute
    engine = LeanDecode(model, 4)
    engine.cache, engine.pad_add, engine.next_pos = own, pad_add, pos.clone()
    masks = engine._masks(n)
    # the reference: [prefix or padding | own positions] in one buffer, masks written out per key position
    ref_keys, ref_values = [], []
    for li in range(len(decoder.layers)):
        for src, out in ((prefix.keys[li], ref_keys), (prefix.values[li], ref_values)):
            buf = torch.zeros(b, h_kv, Lp + past + 4, hd)
            buf[group, :, :Lp] = src[0]
            buf[:, :, Lp:] = (own.keys if out is ref_keys else own.values)[li]
            out.append(buf)
    ref_cache = StaticKVCache(ref_keys, ref_values, Lp + past)
    key_pos = torch.empty(b, Lp + n)
    hidden = torch.zeros(b, Lp + n, dtype=torch.bool)
    for r in range(b):
        key_pos[r, :Lp] = torch.arange(Lp)
        key_pos[r, Lp:] = pos[r] - torch.arange(n - 1, -1, -1)
        hidden[r, :Lp] = r not in group
        hidden[r, Lp:Lp + pads[r]] = True
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
    h = torch.randn(b, cfg.hidden_size, generator=g)
    assert any(m.shared and m.shared[0][2] is not None for m in masks.values()) or cfg.model_type == "llama"
    for li, layer in enumerate(decoder.layers):
        seen = ~hidden
        if types[li] == "sliding_attention":
            seen &= (pos[:, None] - key_pos) < cfg.sliding_window
        ref_mask = torch.zeros(b, Lp + n).masked_fill_(~seen, torch.finfo(torch.float32).min)[:, None, None, :]
        cos, sin = (decoder.rotary_emb(h[:, None], pos[:, None]) if cfg.model_type == "llama"
                    else decoder.rotary_emb(h[:, None], pos[:, None], types[li]))
        ref = module_step(layer, h, cos[:, 0], sin[:, 0], StepMask(ref_mask), ref_cache, li)
        new = LAYER_STEPS[cfg.model_type](layer, h, cos[:, 0], sin[:, 0], masks[types[li]], own, li)
        torch.testing.assert_close(new, ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(own.keys[li][:, :, past], ref_cache.keys[li][:, :, Lp + past])
        h = ref


def test_lean_engine_uses_the_layer_steps(tiny):
    assert step_supported(tiny.model)
    assert LeanDecode(tiny.model, 4).layer_step is LAYER_STEPS[tiny.model.config.model_type]


def test_soft_capped_attention_uses_the_reference_engine(tiny_gemma3):
    cfg = tiny_gemma3.model.config
    saved, cfg.attn_logit_softcapping = cfg.attn_logit_softcapping, 50.0
    try:
        assert not step_supported(tiny_gemma3.model) and not LeanDecode.supports(tiny_gemma3.model)
        assert isinstance(make_engine(tiny_gemma3.model, "auto", 4), HFDecode)
    finally:
        cfg.attn_logit_softcapping = saved


def test_gemm_rows_pads_to_cheap_counts_and_never_shrinks():
    from haps.models.padding import gemm_rows, pad_rows

    assert [gemm_rows(n) for n in range(1, 18)] == [1, 2, 4, 4, 5, 6, 8, 8] + [16] * 8 + [32]
    assert gemm_rows(33) == 48 and gemm_rows(64) == 64 and gemm_rows(1, min_rows=2) == 2
    for n in range(1, 70):
        assert gemm_rows(n) >= n
    x = torch.randn(13, 5)
    xp = pad_rows(x)
    assert xp.shape == (16, 5) and torch.equal(xp[:13], x) and not xp[13:].any()
    assert pad_rows(x[:4]).data_ptr() == x.data_ptr()  # no copy when none needed


@torch.no_grad()
@pytest.mark.parametrize("b", [1, 3, 6, 7, 13, 17])
def test_project_equals_the_module(b):
    torch.manual_seed(0)
    x = torch.randn(b, 12)
    for lin in (nn.Linear(12, 7, bias=False), nn.Linear(12, 7)):
        torch.testing.assert_close(project(lin, x), lin(x), rtol=1e-5, atol=1e-6)
        wrapped = PerRequestLoRALinear(lin, layer_idx=0)
        assert torch.equal(project(wrapped, x), project(lin, x))  # no adapters: exactly the base path
        batch = AdapterBatch((0,), (torch.randn(b, 7, 2),), (torch.randn(b, 2, 12),), torch.arange(b), 2.0)
        other_layer = AdapterBatch((1,), batch.A, batch.B, batch.slot, 2.0)
        assert torch.equal(project(wrapped, x, adapters=other_layer), project(lin, x))  # not this layer's
        got = project(wrapped, x, adapters=batch)
        torch.testing.assert_close(got, wrapped(x[:, None], batch)[:, 0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, project(lin, x))
        loop = AdapterBatch((0,), batch.A, batch.B, batch.slot, 2.0, "row_loop")
        assert torch.equal(project(wrapped, x, adapters=loop), wrapped(x[:, None], loop)[:, 0])
        torch.testing.assert_close(project(wrapped, x, adapters=loop), got, rtol=1e-5, atol=1e-5)
