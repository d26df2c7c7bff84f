"""Per-request LoRA: the batched fast path equals the slow per-row merged-weight twin; adapters travel with
each call (`AdapterBatch`), never on the modules."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from haps.config import LoraTarget
from haps.errors import ConfigError, ShapeError
from haps.models.adapters import AdapterBatch, adapters_in_scope, scoped_adapters
from haps.models.lora import (
    PerRequestLoRALinear,
    _decoder_layers,
    detach_lora,
    inject,
    lora_sites,
    merged_weight,
    reference_lora_forward,
    wrappers,
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


def _batch(A: torch.Tensor, B: torch.Tensor, alpha: float, none_rows=(), layer: int = 0) -> AdapterBatch:
    """One slot per row (rows in ``none_rows``: slot -1) for one layer."""
    slot = torch.tensor([-1 if i in none_rows else i for i in range(A.shape[0])])
    return AdapterBatch((layer,), (A,), (B,), slot, alpha)


# rectangular shapes: Gemma-3-270M's o_proj is 1024 -> 640 (scaled down 8x), plus square and bias cases
SHAPES = [(64, 64, False), (128, 80, False), (80, 128, True)]


@pytest.mark.parametrize(("d_in", "d_out", "bias"), SHAPES)
@pytest.mark.parametrize("alpha", [0.01, 1.0])
def test_fast_path_equals_reference(d_in, d_out, bias, alpha):
    base = _linear(d_in, d_out, bias)
    b, T, r = 4, 5, 3
    A, B = _adapters(b, d_in, d_out, r, none_rows=(1,))
    x = torch.randn(b, T, d_in)
    layer = PerRequestLoRALinear(base, 0)
    got = layer(x, _batch(A, B, alpha, none_rows=(1,)))
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
    layer = PerRequestLoRALinear(base, 0)
    y = layer(x, _batch(A, B, 0.3, none_rows))
    torch.testing.assert_close(y, reference_lora_forward(x, base, A, B, 0.3), rtol=1e-4, atol=1e-4)
    base_out = base(x)
    for i in none_rows:
        assert torch.equal(y[i], base_out[i])


def test_each_row_equals_its_merged_weight():
    d_in, d_out, r, alpha = 128, 80, 4, 0.5
    base = _linear(d_in, d_out, bias=True)
    A, B = _adapters(3, d_in, d_out, r, seed=5)
    x = torch.randn(3, 7, d_in)
    layer = PerRequestLoRALinear(base, 0)
    y = layer(x, _batch(A, B, alpha))
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
    layer = PerRequestLoRALinear(base, 0)
    base_out = base(x)
    y = layer(x, _batch(A, B, 0.7, none_rows))
    for i in range(b):
        if i in none_rows:
            assert torch.equal(y[i], base_out[i]), f"row {i} without adapter differs from the base output"
        else:
            assert not torch.equal(y[i], base_out[i])
    assert torch.equal(layer(x), base_out)  # no batch in scope: the base layer


def test_no_adapter_rows_exact_through_from_rows():
    """A None row gets slot -1, zero matrices, and then the base output exactly (bfloat16 too)."""
    base = _linear(64, 48).to(torch.bfloat16)
    block = nn.Module()
    block.self_attn = nn.Module()
    block.self_attn.o_proj = base
    model = nn.Module()
    model.layers = nn.ModuleList([block])  # the smallest "decoder": one layer with self_attn.o_proj
    target = LoraTarget(last_k_layers=1, rank=4, alpha=0.3)
    sites = inject(model, target)
    layer = block.self_attn.o_proj
    assert isinstance(layer, PerRequestLoRALinear) and layer.base_layer is base and sites.layers == (0,)
    g = torch.Generator().manual_seed(3)
    ad = RowAdapter(A=[torch.randn(48, 4, generator=g)], B=[torch.randn(4, 64, generator=g)])
    batch = AdapterBatch.from_rows([None, ad, None], sites.layers, sites.shapes, target.alpha, target.rank,
                                   dtype=torch.bfloat16)
    assert batch.slot.tolist() == [-1, 0, -1] and batch.A[0].shape == (1, 48, 4)
    x = torch.randn(3, 4, 64, dtype=torch.bfloat16)
    with adapters_in_scope(batch):
        y = layer(x)
    assert scoped_adapters() is None  # the scope ends with the block
    assert torch.equal(y[0], base(x)[0]) and torch.equal(y[2], base(x)[2])
    assert not torch.equal(y[1], base(x)[1])


def test_rows_sharing_an_adapter_share_a_slot_and_its_gradient():
    d_in, d_out, r = 12, 10, 3
    g = torch.Generator().manual_seed(0)
    A = torch.randn(d_out, r, generator=g, requires_grad=True)
    B = torch.randn(r, d_in, generator=g, requires_grad=True)
    shared, other = RowAdapter(A=[A], B=[B]), RowAdapter(A=[torch.randn(d_out, r)], B=[torch.randn(r, d_in)])
    batch = AdapterBatch.from_rows([shared, other, shared, None], (5,), ((d_out, d_in),), 0.5, r)
    assert batch.slot.tolist() == [0, 1, 0, -1] and batch.A[0].shape[0] == 2
    base = _linear(d_in, d_out)
    layer = PerRequestLoRALinear(base, 5)
    x = torch.randn(4, 2, d_in)
    y = layer(x, batch)
    torch.testing.assert_close(y[0], x[0] @ merged_weight(base, A.detach(), B.detach(), 0.5).T, rtol=1e-5, atol=1e-5)
    (y[0].sum() + y[2].sum()).backward()  # both rows' terms reach the one shared A
    A2 = A.detach().clone().requires_grad_()
    ref = reference_lora_forward(x[[0, 2]], base, A2[None].expand(2, -1, -1), B.detach()[None].expand(2, -1, -1), 0.5)
    ref.sum().backward()
    torch.testing.assert_close(A.grad, A2.grad, rtol=1e-4, atol=1e-4)
    sub = batch.select([2, 3])
    assert sub.slot.tolist() == [0, -1] and sub.A[0] is batch.A[0]


def test_two_threads_with_different_adapters_get_their_own_outputs():
    """The scope is per thread: two threads running one wrapper with different batches at once each get the
    output of their own adapters, as one at a time."""
    base = _linear(32, 24)
    layer = PerRequestLoRALinear(base, 0)
    A1, B1 = _adapters(2, 32, 24, 4, seed=1)
    A2, B2 = _adapters(2, 32, 24, 4, seed=2)
    x = torch.randn(2, 3, 32)
    want = {1: layer(x, _batch(A1, B1, 0.5)), 2: layer(x, _batch(A2, B2, 0.5))}
    got: dict[int, list[torch.Tensor]] = {1: [], 2: []}
    barrier = threading.Barrier(2)

    def work(k, A, B):
        barrier.wait()
        for _ in range(200):
            with adapters_in_scope(_batch(A, B, 0.5)):
                got[k].append(layer(x))

    threads = [threading.Thread(target=work, args=(1, A1, B1)), threading.Thread(target=work, args=(2, A2, B2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not torch.allclose(want[1], want[2])
    for k in (1, 2):
        assert len(got[k]) == 200 and all(torch.equal(y, want[k]) for y in got[k])


@pytest.mark.parametrize(("d_in", "d_out", "bias"), SHAPES)
def test_gradients_reach_A_and_B_and_match_reference(d_in, d_out, bias):
    base = _linear(d_in, d_out, bias)
    b, T, r, alpha = 3, 4, 2, 0.5
    A0, B0 = _adapters(b, d_in, d_out, r, seed=7)
    x = torch.randn(b, T, d_in)
    w = torch.randn(b, T, d_out)  # a random linear read-out so every output element matters

    A1, B1 = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    layer = PerRequestLoRALinear(base, 0)
    (layer(x, _batch(A1, B1, alpha)) * w).sum().backward()

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
    layer = PerRequestLoRALinear(base, 0)
    x = torch.randn(2, 5, 16)
    y = layer(x, _batch(A, B, 1.0))
    assert torch.equal(y, base(x))
    y.pow(2).sum().backward()
    assert B.grad.abs().sum() > 0
    assert torch.equal(A.grad, torch.zeros_like(A))


# ----------------------------------------------------------------------------- shape errors
def test_shape_error_inconsistent_slots_rank_or_dims():
    for A, B in [
        (torch.zeros(2, 16, 4), torch.zeros(2, 5, 32)),  # rank mismatch
        (torch.zeros(3, 16, 4), torch.zeros(2, 4, 32)),  # slot count mismatch
        (torch.zeros(16, 4), torch.zeros(4, 32)),  # missing slot dim
    ]:
        with pytest.raises(ShapeError) as e:
            AdapterBatch((0,), (A,), (B,), torch.tensor([0]), 1.0)
        assert str(tuple(A.shape)) in str(e.value) and str(tuple(B.shape)) in str(e.value)
    with pytest.raises(ShapeError, match=r"\[-1, 2\)"):
        AdapterBatch((0,), (torch.zeros(2, 16, 4),), (torch.zeros(2, 4, 32),), torch.tensor([0, 2]), 1.0)


def test_shape_error_adapters_that_do_not_fit_the_layer():
    layer = PerRequestLoRALinear(_linear(128, 80), 3)
    with pytest.raises(ShapeError) as e:
        layer(torch.randn(2, 1, 128), AdapterBatch((3,), (torch.zeros(2, 64, 4),), (torch.zeros(2, 4, 128),),
                                                   torch.arange(2), 1.0))
    msg = str(e.value)
    assert "(s, 80, r)" in msg and "(s, r, 128)" in msg and "(2, 64, 4)" in msg


def test_shape_error_batch_rows_differ_from_adapter_rows():
    layer = PerRequestLoRALinear(_linear(32, 16), 0)
    batch = _batch(torch.zeros(2, 16, 4), torch.zeros(2, 4, 32), 1.0)
    with pytest.raises(ShapeError, match="3 rows.*2"):
        layer(torch.randn(3, 1, 32), batch)


def test_wrapping_a_non_linear_is_a_config_error():
    with pytest.raises(ConfigError, match="nn.Linear"):
        PerRequestLoRALinear(nn.Conv1d(3, 3, 1), 0)


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
def test_inject_wraps_last_k_o_proj(tiny, last_k):
    import copy

    model = copy.deepcopy(tiny.model)
    detach_lora(model)
    layers = _decoder_layers(model)
    target = LoraTarget(last_k_layers=last_k, rank=4, alpha=0.5)
    assert lora_sites(model, target) == inject(model, target)  # reading the sites wraps nothing; both agree
    sites = inject(model, target)
    assert sites.layers == tuple(range(len(layers) - last_k, len(layers)))
    for i in sites.layers:
        w = layers[i].self_attn.o_proj
        assert isinstance(w, PerRequestLoRALinear) and w.layer_idx == i
    assert len(wrappers(model)) == last_k
    cfg = model.config
    d_in = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    assert sites.shapes == ((cfg.hidden_size, d_in),) * last_k
    # wrapping again reuses the wrappers (no wrapper inside a wrapper); a deeper target adds the missing ones
    before = wrappers(model)
    inject(model, target)
    assert wrappers(model) == before and not isinstance(before[0].base_layer, PerRequestLoRALinear)
    inject(model, LoraTarget(last_k_layers=last_k + 1))
    assert len(wrappers(model)) == last_k + 1 and all(w in wrappers(model) for w in before)


@pytest.mark.parametrize("last_k", [1, 2])
def test_mixed_batch_equals_per_row_runs(tiny, last_k):
    """Whole-model logits: a mixed batch equals each row run alone."""
    model = tiny.model
    target = LoraTarget(last_k_layers=last_k, rank=4, alpha=1.0)
    sites = inject(model, target)
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (3, 9))
    adapters = [_row_adapter(sites.shapes, 4, 11), None, _row_adapter(sites.shapes, 4, 12)]

    def batch(rows):
        return AdapterBatch.from_rows(rows, sites.layers, sites.shapes, target.alpha, target.rank)

    with torch.no_grad():
        base = model(input_ids=ids).logits
        with adapters_in_scope(batch(adapters)):
            mixed = model(input_ids=ids).logits
        for i, a in enumerate(adapters):
            with adapters_in_scope(batch([a])):
                alone = model(input_ids=ids[i:i + 1]).logits[0]
            torch.testing.assert_close(mixed[i], alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1], base[1], rtol=1e-5, atol=1e-5)
    assert (mixed[0] - base[0]).abs().max() > 1e-3
    assert (mixed[2] - base[2]).abs().max() > 1e-3


def test_from_rows_errors(tiny):
    target = LoraTarget(last_k_layers=2, rank=4)
    sites = lora_sites(tiny.model, target)

    def stack(rows):
        return AdapterBatch.from_rows(rows, sites.layers, sites.shapes, target.alpha, target.rank)

    good = _row_adapter(sites.shapes, 4, 1)
    one_layer = RowAdapter(A=good.A[:1], B=good.B[:1])
    with pytest.raises(ShapeError, match="1 layers.*2"):
        stack([good, one_layer])
    (d_out, d_in) = sites.shapes[0]
    bad = RowAdapter(A=[torch.zeros(d_out + 1, 4)] * 2, B=[torch.zeros(4, d_in)] * 2)
    with pytest.raises(ShapeError) as e:
        stack([bad])
    assert f"({d_out}, 4)" in str(e.value) and f"({d_out + 1}, 4)" in str(e.value)
    other_rank = _row_adapter(sites.shapes, 2, 2)
    with pytest.raises(ShapeError, match="row 1.*rank=4"):
        stack([good, other_rank])
    assert stack([None, None]) is None
    batch = stack([None, good, None])
    assert len(batch.A) == 2 and batch.layers == sites.layers
    A, B = batch.row_weights(sites.layers[0])
    assert A.shape == (3, d_out, 4) and B.shape == (3, 4, d_in)
    assert torch.equal(A[0], torch.zeros(d_out, 4)) and torch.equal(A[1], good.A[0])
    assert batch.row_weights(0) is None  # a layer the target does not cover


def test_inject_rejects_too_many_layers_and_bad_module(tiny):
    n = len(_decoder_layers(tiny.model))
    with pytest.raises(ConfigError, match=f"only {n}"):
        inject(tiny.model, LoraTarget(last_k_layers=n + 1))
    with pytest.raises(ConfigError, match="no submodule"):
        inject(tiny.model, LoraTarget(module_name="self_attn.nope"))
    with pytest.raises(ConfigError, match="no submodule"):
        inject(tiny.model, LoraTarget(module_name="attn.o_proj"))
    with pytest.raises(ConfigError, match="must be nn.Linear"):
        lora_sites(tiny.model, LoraTarget(module_name="self_attn"))


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
    inject(model, LoraTarget(last_k_layers=2))
    assert sum(isinstance(m, PerRequestLoRALinear) for m in model.modules()) == 2
    assert detach_lora(model) == 2
    assert [layer.self_attn.o_proj for layer in layers] == originals
    assert not any(isinstance(m, PerRequestLoRALinear) for m in model.modules())
    assert detach_lora(model) == 0
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
