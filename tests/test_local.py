"""LocalModel on tiny random models: the batched decode loop with per-row adapters (fast path) equals
each row run alone on a deep copy whose weights have the adapter merged in (slow oracle)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from haps.config import LoraTarget, ModelSpec, PoolConfig
from haps.errors import ConfigError
from haps.models.local import LocalModel
from haps.models.lora import _decoder_layers, detach_lora, merged_weight
from haps.models.pool import ModelPool
from haps.models.types import GenRequest, RowAdapter

PROMPTS = [
    "The quick brown fox jumps over the lazy dog because it wants to reach the river before the sun sets",
    "Hi",
    "Question: what is two plus two?\nAnswer:",
    "Paris is the capital of France. Berlin is the capital of",
]


@pytest.fixture(params=["tiny_llama", "tiny_gemma3"])
def tiny(request) -> LocalModel:
    return request.getfixturevalue(request.param)


def _adapter(local: LocalModel, target: LoraTarget, seed: int, scale: float = 0.5) -> RowAdapter:
    shapes = local.lora_sites(target).shapes
    g = torch.Generator().manual_seed(seed)
    return RowAdapter(
        A=[torch.randn(d_out, target.rank, generator=g) * scale for d_out, _ in shapes],
        B=[torch.randn(target.rank, d_in, generator=g) * scale for _, d_in in shapes],
    )


def _merged_copy(local: LocalModel, target: LoraTarget, adapter: RowAdapter | None) -> LocalModel:
    """A deep copy of the model with W + alpha * A @ B written into the targeted layers, no wrappers."""
    model = copy.deepcopy(local.model)
    detach_lora(model)
    if adapter is not None:
        layers = _decoder_layers(model)
        for layer, A, B in zip(layers[len(layers) - target.last_k_layers:], adapter.A, adapter.B, strict=True):
            lin = functools.reduce(getattr, target.module_name.split("."), layer)
            assert isinstance(lin, torch.nn.Linear)
            lin.weight.copy_(merged_weight(lin, A, B, target.alpha))
    return LocalModel(local.spec, model, local.tokenizer)


@torch.no_grad()
def _naive_greedy(model: torch.nn.Module, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """The obviously-correct decoder: no batch, no padding, no cache; the whole sequence every step."""
    seq = list(prompt_ids)
    lps = []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()  # (V,)
        t = int(logits.argmax())
        lps.append((logits[t] - torch.logsumexp(logits, -1)).item())
        seq.append(t)
    return seq[len(prompt_ids):], lps


def _prompt_ids(local: LocalModel, req: GenRequest) -> list[int]:
    return local.encode(req)[1]


# ----------------------------------------------------------------------------- (1) fast path == oracle
def test_mixed_batch_equals_merged_oracle_row_by_row(tiny):
    target = LoraTarget(last_k_layers=2, rank=4, alpha=0.5)
    adapters = [_adapter(tiny, target, 1), None, _adapter(tiny, target, 2), _adapter(tiny, target, 3)]
    max_new = [12, 7, 15, 4]  # rows leave the batch at different steps
    reqs = [GenRequest(prompt=p, max_new_tokens=n, adapter=a) for p, n, a in zip(PROMPTS, max_new, adapters, strict=True)]
    fast = tiny.generate(reqs, target=target)
    base = tiny.generate([GenRequest(prompt=p, max_new_tokens=n) for p, n in zip(PROMPTS, max_new, strict=True)])
    changed = 0
    for i, (req, a) in enumerate(zip(reqs, adapters, strict=True)):
        oracle = _merged_copy(tiny, target, a)
        slow_ids, slow_lps = _naive_greedy(oracle.model, _prompt_ids(tiny, req), req.max_new_tokens)
        assert fast[i].token_ids == slow_ids, f"row {i}: batched adapter path != merged-weight oracle"
        assert fast[i].text == tiny.tokenizer.decode(slow_ids, skip_special_tokens=True)
        assert fast[i].logprobs == pytest.approx(slow_lps, abs=1e-4)
        assert len(fast[i].token_ids) == max_new[i]  # random models never pick the EOS here
        changed += a is not None and fast[i].token_ids != base[i].token_ids
        if a is None:
            assert fast[i].token_ids == base[i].token_ids
    assert changed >= 2, "adapters should change the greedy output (otherwise this test proves nothing)"


def test_large_mixed_batch_with_early_finishers_equals_oracle(tiny):
    """Ten rows (so a few finished rows may stay in the batch before it is compacted), half with adapters."""
    target = LoraTarget(last_k_layers=2, rank=4, alpha=0.5)
    n = 10
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(n)]
    adapters = [_adapter(tiny, target, 40 + i) if i % 2 else None for i in range(n)]
    max_new = [2 + (7 * i) % 11 for i in range(n)]
    reqs = [GenRequest(prompt=p, max_new_tokens=m, adapter=a) for p, m, a in zip(prompts, max_new, adapters, strict=True)]
    fast = tiny.generate(reqs, target=target)
    for i, r in enumerate(reqs):
        model = _merged_copy(tiny, target, r.adapter).model if r.adapter is not None else tiny.model
        want, _ = _naive_greedy(model, _prompt_ids(tiny, r), r.max_new_tokens)
        assert fast[i].token_ids == want, f"row {i} (max_new_tokens={r.max_new_tokens})"


def test_chat_requests_and_generation_fields(tiny):
    target = LoraTarget(last_k_layers=2, rank=4, alpha=0.5)
    a = _adapter(tiny, target, 9)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    reqs = [GenRequest(messages=msgs, max_new_tokens=5, adapter=a), GenRequest(prompt="Once upon", max_new_tokens=3)]
    out = tiny.generate(reqs, target=target)
    oracle_ids, _ = _naive_greedy(_merged_copy(tiny, target, a).model, _prompt_ids(tiny, reqs[0]), 5)
    assert out[0].token_ids == oracle_ids
    for g, r in zip(out, reqs, strict=True):
        text, ids = tiny.encode(r)
        assert g.model == tiny.spec.name
        assert g.prompt_text == text and g.prompt_tokens == len(ids)
        assert g.completion_tokens == len(g.token_ids) == len(g.logprobs) == r.max_new_tokens
        assert g.finish_reason == "length"
        assert g.cost == pytest.approx(tiny.spec.cost(len(ids), r.max_new_tokens))
        assert all(lp <= 0.0 for lp in g.logprobs)
    assert "Name a colour." in out[0].prompt_text


def test_chunked_batches_equal_one_batch(tiny):
    reqs = [GenRequest(prompt=p, max_new_tokens=6) for p in PROMPTS]
    one = tiny.generate(reqs)
    small = LocalModel(tiny.spec, tiny.model, tiny.tokenizer, max_batch_size=2).generate(reqs)
    assert [g.token_ids for g in one] == [g.token_ids for g in small]
    assert tiny.generate([]) == []


# ----------------------------------------------------------------------------- (2) score
def test_score_matches_merged_oracle_and_generation_logprobs(tiny):
    target = LoraTarget(last_k_layers=2, rank=4, alpha=0.5)
    adapters = [_adapter(tiny, target, 4), None, _adapter(tiny, target, 5)]
    reqs = [GenRequest(prompt=p, max_new_tokens=n, adapter=a) for p, n, a in zip(PROMPTS[:3], [8, 5, 10], adapters, strict=True)]
    gens = tiny.generate(reqs, target=target)
    prompts = [_prompt_ids(tiny, r) for r in reqs]
    comps = [g.token_ids for g in gens]
    with torch.no_grad():
        fast = tiny.score(prompts, comps, adapters, target)
    assert fast.shape == (3,)
    for i, a in enumerate(adapters):
        want_gen = sum(gens[i].logprobs)
        assert fast[i].item() == pytest.approx(want_gen, abs=1e-3)
        with torch.no_grad():
            slow = _merged_copy(tiny, target, a).score([prompts[i]], [comps[i]])
        assert fast[i].item() == pytest.approx(slow.item(), abs=1e-3)
    # without adapters the scores change for the adapted rows only
    with torch.no_grad():
        plain = tiny.score(prompts, comps)
    assert plain[1].item() == pytest.approx(fast[1].item(), abs=1e-4)
    assert abs(plain[0].item() - fast[0].item()) > 1e-2


def test_score_of_a_bf16_model_is_fp32_and_matches_the_fp32_twin(tiny):
    """A bf16 model (``dtype: auto`` on AMX/AVX512-BF16 CPUs) scores with fp32 adapters: fp32 log-probs with
    gradients to the adapters, equal to the fp32 model's within bf16 rounding."""
    target = LoraTarget(last_k_layers=1, rank=4, alpha=0.5)
    adapters = [_adapter(tiny, target, 4), None]
    prompts = [_prompt_ids(tiny, GenRequest(prompt=p)) for p in PROMPTS[:2]]
    comps = [[5, 9, 14], [7, 3]]
    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    detach_lora(model)
    half = LocalModel(tiny.spec, model, tiny.tokenizer)
    a = adapters[0].A[0].requires_grad_(True)
    got = half.score(prompts, comps, adapters, target)
    assert got.dtype == torch.float32
    got.sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    with torch.no_grad():
        want = tiny.score(prompts, comps, adapters, target)
    torch.testing.assert_close(got.detach(), want, rtol=0.05, atol=0.15)


def test_score_edge_cases(tiny):
    with torch.no_grad():
        out = tiny.score([[1, 2, 3], [4, 5]], [[], [6]])
    assert out[0].item() == 0.0 and out[1].item() < 0.0
    with pytest.raises(ConfigError, match="2 prompts but 1"):
        tiny.score([[1], [2]], [[3]])
    a = _adapter(tiny, LoraTarget(last_k_layers=1, rank=2), 1)
    with pytest.raises(ConfigError, match="LoraTarget"):
        tiny.score([[1, 2]], [[3]], [a])


# ----------------------------------------------------------------------------- (3) left padding
def test_left_padding_short_prompt_equals_alone(tiny):
    long_a = " ".join(f"word{i}" for i in range(30))  # longer than Gemma's tiny sliding window (16)
    long_b = "A long prompt " * 8
    short = "Hi"
    reqs = [GenRequest(prompt=p, max_new_tokens=20) for p in (long_a, short, long_b)]
    batched = tiny.generate(reqs)
    for i, r in enumerate(reqs):
        alone = tiny.generate([r])[0]
        assert batched[i].token_ids == alone.token_ids, f"row {i} differs when batched with padding"
        assert batched[i].logprobs == pytest.approx(alone.logprobs, abs=1e-4)


# ----------------------------------------------------------------------------- (4) finishing
def test_stop_strings_and_length(tiny):
    free = tiny.generate([GenRequest(prompt=PROMPTS[0], max_new_tokens=16)])[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 16
    # take a stop string from the middle of the unconstrained text
    text = free.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), f"degenerate generated text {text!r}"
    cut = text.find(stop)
    reqs = [
        GenRequest(prompt=PROMPTS[0], max_new_tokens=16, stop=[stop]),
        GenRequest(prompt=PROMPTS[2], max_new_tokens=5),
        GenRequest(prompt=PROMPTS[3], max_new_tokens=9, stop=["\x00never\x00"]),
    ]
    out = tiny.generate(reqs)
    assert out[0].finish_reason == "stop"
    assert out[0].text == text[:cut]
    assert stop not in out[0].text
    assert len(out[0].token_ids) < 16
    assert out[0].token_ids == free.token_ids[:len(out[0].token_ids)]
    assert [g.finish_reason for g in out[1:]] == ["length", "length"]
    assert [len(g.token_ids) for g in out[1:]] == [5, 9]
    for i, r in enumerate(reqs):  # rows finish independently: each equals its run alone
        assert out[i].token_ids == tiny.generate([r])[0].token_ids


def test_eos_finishes_a_row_and_is_not_in_the_text(tiny):
    free = tiny.generate([GenRequest(prompt=PROMPTS[3], max_new_tokens=8)])[0]
    eos_tok = free.token_ids[3]
    first = free.token_ids.index(eos_tok)
    lm = LocalModel(tiny.spec, tiny.model, tiny.tokenizer)
    lm.eos_ids = {eos_tok}  # pretend this token is the end of sequence
    out = lm.generate([GenRequest(prompt=PROMPTS[3], max_new_tokens=8),
                       GenRequest(prompt=PROMPTS[2], max_new_tokens=8)])
    assert out[0].finish_reason == "eos"
    assert out[0].token_ids == free.token_ids[:first + 1]
    assert out[0].text == tiny.tokenizer.decode(free.token_ids[:first], skip_special_tokens=True)
    alone = lm.generate([GenRequest(prompt=PROMPTS[2], max_new_tokens=8)])[0]
    assert out[1].token_ids == alone.token_ids and out[1].finish_reason == alone.finish_reason


# ----------------------------------------------------------------------------- (5) sampling
def test_sampling_is_reproducible_with_a_seed(tiny):
    reqs = [GenRequest(prompt=p, max_new_tokens=8, temperature=1.0) for p in PROMPTS[:3]]
    a = tiny.generate(reqs, seed=123)
    b = tiny.generate(reqs, seed=123)
    c = tiny.generate(reqs, seed=124)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    # sampled tokens carry their temperature-1 log-prob under the model: score agrees
    with torch.no_grad():
        s = tiny.score([_prompt_ids(tiny, r) for r in reqs], [g.token_ids for g in a])
    for g, v in zip(a, s, strict=True):
        assert v.item() == pytest.approx(sum(g.logprobs), abs=1e-3)


def test_tiny_top_p_is_greedy_and_mixes_with_greedy_rows(tiny):
    greedy = tiny.generate([GenRequest(prompt=p, max_new_tokens=8) for p in PROMPTS[:3]])
    nucleus = tiny.generate([GenRequest(prompt=p, max_new_tokens=8, temperature=1.0, top_p=1e-6)
                             for p in PROMPTS[:3]], seed=7)
    assert [g.token_ids for g in nucleus] == [g.token_ids for g in greedy]
    mixed = tiny.generate([GenRequest(prompt=PROMPTS[0], max_new_tokens=8, temperature=1.0),
                           GenRequest(prompt=PROMPTS[1], max_new_tokens=8)], seed=7)
    assert mixed[1].token_ids == greedy[1].token_ids


# ----------------------------------------------------------------------------- (6) chunked score + grads
def test_score_chunking_and_backward_reach_adapters(tiny):
    target = LoraTarget(last_k_layers=2, rank=4, alpha=0.5)
    torch.manual_seed(0)
    prompts = [torch.randint(5, 2000, (n,)).tolist() for n in (6, 3, 9)]
    comps = [torch.randint(5, 2000, (n,)).tolist() for n in (5, 8, 2)]
    V = tiny.model.get_output_embeddings().weight.shape[0]

    def run(chunk_bytes):
        adapters = [_adapter(tiny, target, 20 + i) for i in range(3)]
        for a in adapters:
            for t in a.A + a.B:
                t.requires_grad_(True)
        adapters[1] = None
        s = tiny.score(prompts, comps, adapters, target, chunk_bytes=chunk_bytes)
        (s * torch.tensor([1.0, 2.0, -0.5])).sum().backward()
        return s.detach(), adapters

    s_small, ad_small = run(V * 8)  # one token per chunk
    s_big, ad_big = run(2**30)
    torch.testing.assert_close(s_small, s_big, rtol=1e-5, atol=1e-4)
    for a_s, a_b in [(ad_small[0], ad_big[0]), (ad_small[2], ad_big[2])]:
        for t_s, t_b in zip(a_s.A + a_s.B, a_b.A + a_b.B, strict=True):
            assert t_s.grad is not None and t_s.grad.abs().sum() > 0
            torch.testing.assert_close(t_s.grad, t_b.grad, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in tiny.model.parameters())


def test_score_gradient_matches_finite_difference(tiny_llama):
    target = LoraTarget(last_k_layers=1, rank=2, alpha=1.0)
    a = _adapter(tiny_llama, target, 31, scale=0.3)
    a.A[0] = a.A[0].double().float().requires_grad_(True)
    prompts, comps = [[10, 20, 30, 40]], [[50, 60, 70]]
    s = tiny_llama.score(prompts, comps, [a], target, chunk_bytes=1)
    s.sum().backward()
    g = a.A[0].grad[0, 0].item()
    eps = 1e-2
    with torch.no_grad():
        vals = []
        for sign in (1, -1):
            A = a.A[0].detach().clone()
            A[0, 0] += sign * eps
            vals.append(tiny_llama.score(prompts, comps, [RowAdapter([A], a.B)], target).item())
    fd = (vals[0] - vals[1]) / (2 * eps)
    assert g == pytest.approx(fd, rel=5e-2, abs=1e-3)


# ----------------------------------------------------------------------------- (7) errors
def test_closed_model_refuses_adapters(tiny_llama):
    target = LoraTarget(last_k_layers=1, rank=2)
    a = _adapter(tiny_llama, target, 1)
    closed = LocalModel(tiny_llama.spec.model_copy(update={"open_weights": False}), tiny_llama.model,
                        tiny_llama.tokenizer)
    with pytest.raises(ConfigError, match="closed"):
        closed.generate([GenRequest(prompt="x", adapter=a)], target=target)
    with pytest.raises(ConfigError, match="LoraTarget"):
        tiny_llama.generate([GenRequest(prompt="x", adapter=a)])


def test_pool_refuses_adapters_for_api_models_and_unknown_names(tiny_llama):
    target = LoraTarget(last_k_layers=1, rank=2)
    a = _adapter(tiny_llama, target, 1)
    pool = ModelPool(PoolConfig(models=[
        ModelSpec(name="open", source="org/open"),
        ModelSpec(name="gpt", backend="api", source="gpt", open_weights=False, base_url="http://127.0.0.1:9/v1"),
    ]))
    with pytest.raises(ConfigError, match="closed"):
        pool.generate("gpt", [GenRequest(prompt="x", adapter=a)])
    with pytest.raises(ConfigError) as e:
        pool.generate("nope", [GenRequest(prompt="x")])
    assert "'open'" in str(e.value) and "'gpt'" in str(e.value)
    with pytest.raises(ConfigError, match="nope"):
        pool.backend("nope")


def test_empty_prompts_are_refused_not_misread(tiny_llama):
    # SmolLM2's tokenizer adds no BOS, so "" encodes to no tokens: nothing to condition on
    assert tiny_llama.encode(GenRequest(prompt=""))[1] == []
    with pytest.raises(ConfigError, match="empty prompt"):
        tiny_llama.generate([GenRequest(prompt="Hi", max_new_tokens=2), GenRequest(prompt="", max_new_tokens=2)])
    with pytest.raises(ConfigError, match="empty prompt"):
        tiny_llama.score([[]], [[5, 6]])
    with pytest.raises(ConfigError, match="row 1"):
        tiny_llama.score([[1, 2], []], [[3], [5, 6]])


def test_generate_without_seed_leaves_the_global_rng_alone(tiny_llama):
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    tiny_llama.generate([GenRequest(prompt="Hi", max_new_tokens=2, temperature=1.0)])
    assert torch.equal(torch.rand(3), want)


def test_head_logits_equals_the_linear_head():
    """The W @ h^T head gives h @ W^T (up to float summation order) and leaves other heads alone."""
    from torch import nn

    from haps.models.picking import head_logits

    torch.manual_seed(0)
    head = nn.Linear(24, 300, bias=False)
    for b in (1, 2, 7, 13):  # 1, 7 and 13 are padded to 2, 8 and 16 columns
        h = torch.randn(b, 24)
        out = head_logits(head, h)
        assert out.shape == (b, 300) and out.is_contiguous()
        torch.testing.assert_close(out, head(h), rtol=1e-5, atol=1e-5)
        sliced = head_logits(head, h, chunk=64)  # 5 slices, the last one short
        torch.testing.assert_close(sliced, out, rtol=1e-6, atol=1e-6)
    biased = nn.Linear(24, 300)
    h = torch.randn(3, 24)
    assert torch.equal(head_logits(biased, h), biased(h))


def test_greedy_pick_equals_full_logits_pick():
    """Slice-wise greedy picking gives argmax's token (first of tied maxima, across slices too) and the
    same log-prob as logsumexp over the whole row; soft-capping as in the lean engine."""
    from torch import nn

    from haps.models.picking import greedy_pick, head_logits, pick_tokens

    torch.manual_seed(0)
    head = nn.Linear(16, 1000, bias=False)
    with torch.no_grad():
        head.weight[900] = head.weight[37] * 1.0  # exact tie between slices 0 and 14 (chunk 64)
        head.weight[37] *= 0.0
        head.weight[37] += 3.0  # large logits for rows with positive sums
        head.weight[900] = head.weight[37]
    h = torch.randn(11, 16)  # padded to 16 columns
    h[0] = 1.0  # row 0's maximum is the tied pair: argmax must say 37
    temps, top_ps = torch.zeros(11), torch.ones(11)
    for cap in (None, 5.0):
        logits = head_logits(head, h)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        want_t, want_lp = pick_tokens(logits, temps, top_ps, torch.Generator())
        got_t, got_lp = greedy_pick(head, h, cap, chunk=64)
        assert got_t == want_t and got_t[0] == 37
        torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(want_lp), rtol=1e-5, atol=1e-5)


def test_fill_holes_keeps_live_rows_and_moves_only_from_the_end():
    from haps.models.rows import fill_holes

    live = [True, False, True, True, False, True, True, False]  # slots 1, 4 and 7 finished
    keep = fill_holes(live)
    assert keep == [0, 5, 2, 3, 6]
    assert all(live[j] for j in keep) and sorted(keep) == [0, 2, 3, 5, 6]
    assert all(src >= j for j, src in enumerate(keep))
    assert fill_holes([True] * 3) == [0, 1, 2] and fill_holes([False, False]) == []


@pytest.mark.parametrize("keep", [[0, 6, 2, 3, 5], [0, 1, 2], [3, 1, 0]])
def test_static_cache_select_rows_equals_a_gather(keep):
    """In-place moves (every keep[j] >= j) and the gathering fallback give the rows asked for, filled part only."""
    from haps.models.decode import StaticKVCache

    torch.manual_seed(0)
    keys = [torch.randn(7, 2, 10, 3) for _ in range(2)]
    values = [torch.randn(7, 2, 10, 3) for _ in range(2)]
    want_k = [k[keep, :, :6].clone() for k in keys]
    want_v = [v[keep, :, :6].clone() for v in values]
    cache = StaticKVCache([k.clone() for k in keys], [v.clone() for v in values], length=6)
    cache.select_rows(torch.tensor(keep))
    for layer in range(2):
        assert cache.keys[layer].shape == (len(keep), 2, 10, 3)
        assert torch.equal(cache.keys[layer][:, :, :6], want_k[layer])
        assert torch.equal(cache.values[layer][:, :, :6], want_v[layer])


def test_requests_without_logprobs_get_the_same_tokens_and_none(tiny):
    """logprobs=False skips the vocabulary log-sum-exp (greedy_pick's running maximum only, for >= 8 greedy
    rows): same tokens, no log-probs; rows that ask for them in the same batch still get them."""
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(9)]
    with_lp = tiny.generate([GenRequest(prompt=p, max_new_tokens=5) for p in prompts])
    mixed = tiny.generate([GenRequest(prompt=p, max_new_tokens=5, logprobs=i % 2 == 0) for i, p in enumerate(prompts)])
    none = tiny.generate([GenRequest(prompt=p, max_new_tokens=5, logprobs=False) for p in prompts])
    for i, (a, m, n) in enumerate(zip(with_lp, mixed, none, strict=True)):
        assert a.token_ids == m.token_ids == n.token_ids
        assert n.logprobs == [] and len(a.logprobs) == 5
        assert m.logprobs == (a.logprobs if i % 2 == 0 else [])
    sampled = tiny.generate([GenRequest(prompt=PROMPTS[0], max_new_tokens=4, temperature=0.8, logprobs=False)], seed=3)
    again = tiny.generate([GenRequest(prompt=PROMPTS[0], max_new_tokens=4, temperature=0.8)], seed=3)
    assert sampled[0].token_ids == again[0].token_ids and sampled[0].logprobs == []


def test_score_at_temperature_and_top_p_is_the_sampling_distribution(tiny_llama):
    """score(temperature, top_p) is log p of each token under softmax(logits / T) renormalised over the nucleus
    that `pick_tokens` keeps (computed here by hand from the full logits)."""
    torch.manual_seed(0)
    prompt, comp = [11, 22, 33, 44], [55, 66, 77]
    T, top_p = 0.7, 0.9
    with torch.no_grad():
        got = tiny_llama.score([prompt], [comp], temperature=T, top_p=top_p).item()
        logits = tiny_llama.model(input_ids=torch.tensor([prompt + comp])).logits[0].float() / T  # (L, V)
    want = 0.0
    for j, tok in enumerate(comp):
        p = torch.softmax(logits[len(prompt) - 1 + j], -1)
        sp, si = p.sort(descending=True)
        keep = si[(sp.cumsum(0) - sp) <= top_p].tolist()
        if tok not in keep:
            keep.append(tok)
        want += float(torch.log(p[tok] / p[keep].sum()))
    assert got == pytest.approx(want, abs=1e-4)
    with torch.no_grad():
        plain = tiny_llama.score([prompt], [comp], temperature=T).item()
    assert plain < got  # renormalising over a nucleus can only raise a kept token's log-prob


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999999, 1.0])
def test_nucleus_fast_path_equals_the_full_sort(top_p):
    """The partial-sort nucleus keeps exactly the tokens (and weights) the full sort keeps: peaked rows take the
    fast path, a flat row (nucleus larger than the candidates) the fallback."""
    from haps.models import picking

    torch.manual_seed(0)
    logits = torch.randn(5, 5000) * torch.tensor([8.0, 4.0, 2.0, 1.0, 0.01])[:, None]
    probs = torch.softmax(logits, -1)
    tp = torch.full((5,), top_p)
    for rows in ([0, 1, 2], [0, 1, 2, 3, 4]):  # only peaked rows / with a flat one
        fast_w, fast_i = picking.nucleus(probs[rows], tp[rows])
        ref_w, ref_i = picking.reference_nucleus(probs[rows], tp[rows])
        dense_fast = torch.zeros_like(probs[rows]).scatter_(1, fast_i, fast_w)
        dense_ref = torch.zeros_like(probs[rows]).scatter_(1, ref_i, ref_w)
        assert torch.equal(dense_fast, dense_ref)
    assert picking.NUCLEUS_CANDIDATES < 5000  # so the fast path is exercised here
