"""Per-request LoRA: the batched fast path equals the slow per-row merged-weight twin."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from haps.config import LoraTarget
from haps.errors import ConfigError, ShapeError
from haps.models.lora import (
    LoRAInjector,
    PerRequestLoRALinear,
    _decoder_layers,
    detach_lora,
    merged_weight,
    reference_lora_forward,
)
from haps.models.types import RowAdapter


def _linear(d_in: int, d_out: int, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias)
    lin.requires_grad_(False)
    return lin


def _adapters(b: int, d_in: int, d_out: int, r: int, seed: int = 1, none_rows=()) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(b, d_out, r, generator=g)
    B = torch.randn(b, r, d_in, generator=g)
    for i in none_rows:
        A[i] = 0.0
        B[i] = 0.0
    return A, B


# rectangular shapes: Gemma-3-270M's o_proj is 1024 -> 640 (scaled down 8x), plus square and bias cases
SHAPES = [(64, 64, False), (128, 80, False), (80, 128, True)]


@pytest.mark.parametrize(("d_in", "d_out", "bias"), SHAPES)
@pytest.mark.parametrize("alpha", [0.01, 1.0])
def test_fast_path_equals_reference(d_in, d_out, bias, alpha):
    base = _linear(d_in, d_out, bias)
    b, T, r = 4, 5, 3
    A, B = _adapters(b, d_in, d_out, r, none_rows=(1,))
    x = torch.randn(b, T, d_in)
    layer = PerRequestLoRALinear(base, alpha)
    layer.set_adapters(A, B)
    got = layer(x)
    want = reference_lora_forward(x, base, A, B, alpha)
    assert got.shape == (b, T, d_out)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the update is not negligible, so the comparison above says something
    assert (got - base(x)).abs().max() > 1e-2 * alpha


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 5), T=st.integers(1, 4), d_in=st.integers(1, 24), d_out=st.integers(1, 24),
    r=st.integers(1, 6), bias=st.booleans(), seed=st.integers(0, 2**16), mask=st.integers(0, 31),
)
def test_property_fast_path_equals_reference(b, T, d_in, d_out, r, bias, seed, mask):
    base = _linear(d_in, d_out, bias, seed=seed)
    none_rows = [i for i in range(b) if mask >> i & 1]
    A, B = _adapters(b, d_in, d_out, r, seed=seed + 1, none_rows=none_rows)
    x = torch.randn(b, T, d_in, generator=torch.Generator().manual_seed(seed + 2))
    layer = PerRequestLoRALinear(base, 0.3)
    layer.set_adapters(A, B)
    y = layer(x)
    torch.testing.assert_close(y, reference_lora_forward(x, base, A, B, 0.3), rtol=1e-4, atol=1e-4)
    base_out = base(x)
    for i in none_rows:
        assert torch.equal(y[i], base_out[i])


def test_each_row_equals_its_merged_weight():
    d_in, d_out, r, alpha = 128, 80, 4, 0.5
    base = _linear(d_in, d_out, bias=True)
    A, B = _adapters(3, d_in, d_out, r, seed=5)
    x = torch.randn(3, 7, d_in)
    layer = PerRequestLoRALinear(base, alpha)
    layer.set_adapters(A, B)
    y = layer(x)
    for i in range(3):
        W = merged_weight(base, A[i], B[i], alpha)
        assert W.shape == (d_out, d_in)
        torch.testing.assert_close(y[i], x[i] @ W.T + base.bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("d_in", "d_out", "bias"), SHAPES)
def test_rows_without_adapter_are_exactly_base(d_in, d_out, bias):
    base = _linear(d_in, d_out, bias)
    b = 5
    none_rows = (0, 2, 4)
    A, B = _adapters(b, d_in, d_out, 8, none_rows=none_rows)
    x = torch.randn(b, 6, d_in)
    layer = PerRequestLoRALinear(base, 0.7)
    base_out = base(x)
    layer.set_adapters(A, B)
    y = layer(x)
    for i in range(b):
        if i in none_rows:
            assert torch.equal(y[i], base_out[i]), f"row {i} without adapter differs from the base output"
        else:
            assert not torch.equal(y[i], base_out[i])
    layer.set_adapters(None, None)
    assert torch.equal(layer(x), base_out)


def test_no_adapter_rows_exact_through_injector_stack():
    """A None row becomes zero matrices in `stack`, and then the base output exactly (bfloat16 too)."""
    base = _linear(64, 48).to(torch.bfloat16)
    block = nn.Module()
    block.self_attn = nn.Module()
    block.self_attn.o_proj = base
    model = nn.Module()
    model.layers = nn.ModuleList([block])  # the smallest "decoder": one layer with self_attn.o_proj
    inj = LoRAInjector(model, LoraTarget(last_k_layers=1, rank=4, alpha=0.3))
    layer = inj.wrappers[0]
    assert block.self_attn.o_proj is layer and layer.base_layer is base
    g = torch.Generator().manual_seed(3)
    ad = RowAdapter(A=[torch.randn(48, 4, generator=g)], B=[torch.randn(4, 64, generator=g)])
    x = torch.randn(3, 4, 64, dtype=torch.bfloat16)
    with inj.active([None, ad, None], dtype=torch.bfloat16):
        y = layer(x)
    assert layer.A is None  # cleared on exit
    assert torch.equal(y[0], base(x)[0]) and torch.equal(y[2], base(x)[2])
    assert not torch.equal(y[1], base(x)[1])


@pytest.mark.parametrize(("d_in", "d_out", "bias"), SHAPES)
def test_gradients_reach_A_and_B_and_match_reference(d_in, d_out, bias):
    base = _linear(d_in, d_out, bias)
    b, T, r, alpha = 3, 4, 2, 0.5
    A0, B0 = _adapters(b, d_in, d_out, r, seed=7)
    x = torch.randn(b, T, d_in)
    w = torch.randn(b, T, d_out)  # a random linear read-out so every output element matters

    A1, B1 = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    layer = PerRequestLoRALinear(base, alpha)
    layer.set_adapters(A1, B1)
    (layer(x) * w).sum().backward()

    A2, B2 = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    (reference_lora_forward(x, base, A2, B2, alpha) * w).sum().backward()

    assert A1.grad is not None and B1.grad is not None
    assert A1.grad.abs().sum() > 0 and B1.grad.abs().sum() > 0
    torch.testing.assert_close(A1.grad, A2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(B1.grad, B2.grad, rtol=1e-4, atol=1e-4)
    assert base.weight.grad is None  # the frozen base never gets a gradient


def test_gradient_is_zero_at_zero_B_but_reaches_B():
    """Standard LoRA init (A random, B = 0): the output equals the base, yet B gets a gradient."""
    base = _linear(16, 12)
    A = torch.randn(2, 12, 3, requires_grad=True)
    B = torch.zeros(2, 3, 16, requires_grad=True)
    layer = PerRequestLoRALinear(base, 1.0)
    layer.set_adapters(A, B)
    x = torch.randn(2, 5, 16)
    y = layer(x)
    assert torch.equal(y, base(x))
    y.pow(2).sum().backward()
    assert B.grad.abs().sum() > 0
    assert torch.equal(A.grad, torch.zeros_like(A))


# ----------------------------------------------------------------------------- shape errors
def test_shape_error_wrong_layer_dims():
    layer = PerRequestLoRALinear(_linear(128, 80), 1.0)
    A = torch.zeros(2, 64, 4)  # d_out should be 80
    B = torch.zeros(2, 4, 128)
    with pytest.raises(ShapeError) as e:
        layer.set_adapters(A, B)
    msg = str(e.value)
    assert "(b, 80, r)" in msg and "(b, r, 128)" in msg  # expected
    assert "(2, 64, 4)" in msg and "(2, 4, 128)" in msg  # given
    with pytest.raises(ShapeError) as e:
        layer.set_adapters(torch.zeros(2, 80, 4), torch.zeros(2, 4, 100))
    assert "(2, 4, 100)" in str(e.value) and "128" in str(e.value)


def test_shape_error_inconsistent_rank_or_batch_or_dims():
    layer = PerRequestLoRALinear(_linear(32, 16), 1.0)
    for A, B in [
        (torch.zeros(2, 16, 4), torch.zeros(2, 5, 32)),  # rank mismatch
        (torch.zeros(3, 16, 4), torch.zeros(2, 4, 32)),  # batch mismatch
        (torch.zeros(16, 4), torch.zeros(4, 32)),  # missing batch dim
    ]:
        with pytest.raises(ShapeError) as e:
            layer.set_adapters(A, B)
        assert str(tuple(A.shape)) in str(e.value) and str(tuple(B.shape)) in str(e.value)


def test_shape_error_batch_rows_differ_from_adapter_rows():
    layer = PerRequestLoRALinear(_linear(32, 16), 1.0)
    layer.set_adapters(torch.zeros(2, 16, 4), torch.zeros(2, 4, 32))
    with pytest.raises(ShapeError, match="3 rows.*2 rows"):
        layer(torch.randn(3, 1, 32))


def test_wrapping_a_non_linear_is_a_config_error():
    with pytest.raises(ConfigError, match="nn.Linear"):
        PerRequestLoRALinear(nn.Conv1d(3, 3, 1), 1.0)


# ----------------------------------------------------------------------------- injector on tiny models
def _row_adapter(shapes, r, seed, scale=0.1) -> RowAdapter:
    g = torch.Generator().manual_seed(seed)
    return RowAdapter(
        A=[torch.randn(d_out, r, generator=g) * scale for d_out, _ in shapes],
        B=[torch.randn(r, d_in, generator=g) * scale for _, d_in in shapes],
    )


@pytest.fixture(params=["tiny_llama", "tiny_gemma3"])
def tiny(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("last_k", [1, 2])
def test_injector_wraps_last_k_o_proj(tiny, last_k):
    model = tiny.model
    layers = _decoder_layers(model)
    target = LoraTarget(last_k_layers=last_k, rank=4, alpha=0.5)
    inj = LoRAInjector(model, target)
    assert len(inj.wrappers) == last_k
    for layer, w in zip(layers[len(layers) - last_k:], inj.wrappers, strict=True):
        assert layer.self_attn.o_proj is w
        assert isinstance(w, PerRequestLoRALinear) and w.alpha == 0.5
    cfg = model.config
    d_in = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    assert inj.shapes == [(cfg.hidden_size, d_in)] * last_k
    # wrapping again reuses the wrappers (no wrapper inside a wrapper)
    again = LoRAInjector(model, target)
    assert all(a is b for a, b in zip(inj.wrappers, again.wrappers, strict=True))
    assert not isinstance(again.wrappers[0].base_layer, PerRequestLoRALinear)


@pytest.mark.parametrize("last_k", [1, 2])
def test_injector_mixed_batch_equals_per_row_runs(tiny, last_k):
    """Whole-model logits: a mixed batch through the injector equals each row run alone."""
    model = tiny.model
    inj = LoRAInjector(model, LoraTarget(last_k_layers=last_k, rank=4, alpha=1.0))
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (3, 9))
    adapters = [_row_adapter(inj.shapes, 4, 11), None, _row_adapter(inj.shapes, 4, 12)]
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with inj.active(adapters):
            mixed = model(input_ids=ids).logits
        for i, a in enumerate(adapters):
            with inj.active([a]):
                alone = model(input_ids=ids[i:i + 1]).logits[0]
            torch.testing.assert_close(mixed[i], alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1], base[1], rtol=1e-5, atol=1e-5)
    assert (mixed[0] - base[0]).abs().max() > 1e-3
    assert (mixed[2] - base[2]).abs().max() > 1e-3
    assert all(w.A is None for w in inj.wrappers)  # `active` cleans up


def test_injector_stack_errors(tiny):
    inj = LoRAInjector(tiny.model, LoraTarget(last_k_layers=2, rank=4))
    good = _row_adapter(inj.shapes, 4, 1)
    one_layer = RowAdapter(A=good.A[:1], B=good.B[:1])
    with pytest.raises(ShapeError, match="1 layers.*2"):
        inj.stack([good, one_layer])
    (d_out, d_in) = inj.shapes[0]
    bad = RowAdapter(A=[torch.zeros(d_out + 1, 4)] * 2, B=[torch.zeros(4, d_in)] * 2)
    with pytest.raises(ShapeError) as e:
        inj.stack([bad])
    assert f"({d_out}, 4)" in str(e.value) and f"({d_out + 1}, 4)" in str(e.value)
    other_rank = _row_adapter(inj.shapes, 2, 2)
    with pytest.raises(ShapeError, match="row 1"):
        inj.stack([good, other_rank])
    assert inj.stack([None, None]) is None
    stacked = inj.stack([None, good, None])
    assert len(stacked) == 2
    A, B = stacked[0]
    assert A.shape == (3, d_out, 4) and B.shape == (3, 4, d_in)
    assert torch.equal(A[0], torch.zeros(d_out, 4)) and torch.equal(A[1], good.A[0])


def test_injector_rejects_too_many_layers_and_bad_module(tiny):
    n = len(_decoder_layers(tiny.model))
    with pytest.raises(ConfigError, match=f"only {n}"):
        LoRAInjector(tiny.model, LoraTarget(last_k_layers=n + 1))
    with pytest.raises(ConfigError, match="no submodule"):
        LoRAInjector(tiny.model, LoraTarget(module_name="self_attn.nope"))
    with pytest.raises(ConfigError, match="no submodule"):
        LoRAInjector(tiny.model, LoraTarget(module_name="attn.o_proj"))


def test_detach_lora_restores_modules(tiny_llama):
    import copy

    model = copy.deepcopy(tiny_llama.model)
    detach_lora(model)  # the session model may already carry wrappers from other tests
    layers = _decoder_layers(model)
    originals = [layer.self_attn.o_proj for layer in layers]
    assert all(type(m) is nn.Linear for m in originals)
    ids = torch.randint(5, 1000, (2, 6))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    LoRAInjector(model, LoraTarget(last_k_layers=2))
    assert sum(isinstance(m, PerRequestLoRALinear) for m in model.modules()) == 2
    assert detach_lora(model) == 2
    assert [layer.self_attn.o_proj for layer in layers] == originals
    assert not any(isinstance(m, PerRequestLoRALinear) for m in model.modules())
    assert detach_lora(model) == 0
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
