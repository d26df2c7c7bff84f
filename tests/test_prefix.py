"""Shared-prefix prefill: the plan (pure bookkeeping) and its execution in `LocalModel.generate`, which
must give what plain left-padded prefill gives (same tokens, same log-probs within float tolerance),
with mixed adapters, early finishers, sliding windows shorter than the prefix, and both engines."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from haps.config import LoraTarget
from haps.models.engine import DecodeOptions
from haps.models.local import LocalModel
from haps.models.prefix import plan_length_buckets, plan_prefix_groups
from haps.models.types import GenRequest, RowAdapter


# ----------------------------------------------------------------------------- the plan
def test_plan_groups_rows_by_common_prefix_and_leaves_a_suffix_token():
    a = list(range(100, 140))
    seqs = [a + [1, 2], a + [3], a[:20] + [9, 9, 9], [5, 6, 7], a + [1, 2, 8]]
    groups = plan_prefix_groups(seqs, min_prefix=8)
    assert len(groups) == 1
    g = groups[0]
    assert set(g.rows) == {0, 1, 4}  # row 2 shares only 20 tokens: grouping it would cut the saving
    assert g.tokens == tuple(a)  # row 1 has 41 tokens: its prefix leaves at least its last token
    for r in g.rows:
        assert list(seqs[r][:g.length]) == list(g.tokens) and len(seqs[r]) > g.length


def test_plan_respects_keys_min_and_max_prefix():
    a = list(range(50))
    seqs = [a + [1], a + [2], a + [3], a + [4]]
    by_key = plan_prefix_groups(seqs, keys=["x", "y", "x", None], min_prefix=8)
    assert sorted(g.rows for g in by_key) == [(0, 2)]
    assert plan_prefix_groups(seqs, min_prefix=60) == []
    capped = plan_prefix_groups(seqs, min_prefix=8, max_prefix=15)
    assert capped[0].length == 15 and capped[0].rows == (0, 1, 2, 3)
    assert plan_prefix_groups([a], min_prefix=1) == []
    with pytest.raises(ValueError, match="keys"):
        plan_prefix_groups(seqs, keys=[1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=0, max_size=9),
       st.integers(1, 4))
def test_plan_invariants_on_random_rows(seqs, min_prefix):
    groups = plan_prefix_groups(seqs, min_prefix=min_prefix)
    seen: set[int] = set()
    for g in groups:
        assert len(g.rows) >= 2 and g.length >= min_prefix
        assert not seen & set(g.rows)  # a row is in at most one group
        seen |= set(g.rows)
        for r in g.rows:
            assert tuple(seqs[r][:g.length]) == g.tokens and len(seqs[r]) > g.length


def _bucket_cost(lengths, buckets, overhead):
    return sum(len(b) * max(lengths[r] for r in b) + overhead for b in buckets)


def test_length_buckets_split_only_when_the_padding_saved_pays_for_a_call():
    lengths = [300, 290, 20, 0, 25, 310]
    assert plan_length_buckets(lengths, overhead_tokens=64) == [[5, 0, 1], [4, 2]]
    assert plan_length_buckets(lengths, overhead_tokens=10_000) == [[5, 0, 1, 4, 2]]  # one call is cheaper
    assert plan_length_buckets([0, 0]) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 400), min_size=0, max_size=20), st.integers(0, 200))
def test_length_buckets_cover_each_row_once_at_minimal_cost(lengths, overhead):
    buckets = plan_length_buckets(lengths, overhead)
    rows = [r for b in buckets for r in b]
    assert sorted(rows) == [r for r, n in enumerate(lengths) if n > 0]
    if rows:  # never worse than one bucket, nor than one bucket per distinct length
        assert _bucket_cost(lengths, buckets, overhead) <= _bucket_cost(lengths, [rows], overhead)
        by_len: dict[int, list[int]] = {}
        for r in rows:
            by_len.setdefault(lengths[r], []).append(r)
        assert _bucket_cost(lengths, buckets, overhead) <= _bucket_cost(lengths, list(by_len.values()), overhead)


# ----------------------------------------------------------------------------- execution == plain prefill
INSTRUCTIONS = ("You are the Student agent. Read the question and the passages, think step by step, then "
                "answer with one short phrase. Example: Question: who wrote Hamlet? Answer: Shakespeare.\n")
SUFFIXES = ["Question: what is the capital of France?\nAnswer:",
            "Question: who painted the Mona Lisa, and in which century did he live?\nAnswer:",
            "Question: 2+2?\nAnswer:",
            "Question: name a river in Egypt that flows north into the Mediterranean Sea, please.\nAnswer:",
            "Question: is the sky blue?\nAnswer:"]
OTHER = "A completely different prompt that shares nothing with the others beyond perhaps a token."


@pytest.fixture(params=["tiny_llama", "tiny_gemma3"])
def tiny(request) -> LocalModel:
    return request.getfixturevalue(request.param)


def _adapter(local: LocalModel, target: LoraTarget, seed: int) -> RowAdapter:
    shapes = local.lora_sites(target).shapes
    g = torch.Generator().manual_seed(seed)
    return RowAdapter(A=[torch.randn(o, target.rank, generator=g) * 0.5 for o, _ in shapes],
                      B=[torch.randn(target.rank, i, generator=g) * 0.5 for _, i in shapes])


def _run(local: LocalModel, reqs, target, share: bool, engine: str, overhead: int = 64):
    # short prompts: min_shared_prefix 4; the shared prefix is longer than tiny Gemma3's sliding window (16)
    options = DecodeOptions(engine=engine, share_prefix=share, min_shared_prefix=4, bucket_overhead_tokens=overhead)
    lm = LocalModel(local.spec, local.model, local.tokenizer, options=options)
    out = lm.generate(reqs, target=target, seed=0)
    return out, dict(lm.last_stats)


@pytest.mark.parametrize("engine", ["auto", "hf"])
@pytest.mark.parametrize("overhead", [1, 10_000])  # many buckets / one bucket for the bodies
@pytest.mark.parametrize("inline", [False, True])  # decode over the prefix copy / prefixes copied into the rows
def test_shared_prefix_generation_equals_plain_prefill(tiny, engine, overhead, inline, monkeypatch):
    import haps.models.decode as decode

    monkeypatch.setattr(decode, "CASCADE_MIN_BYTES", 1 << 40 if inline else 0)
    target = LoraTarget(last_k_layers=2, rank=4)
    shared = _adapter(tiny, target, 7)
    adapters = [None, shared, shared, _adapter(tiny, target, 8), None, None, None]
    prompts = [INSTRUCTIONS + s for s in SUFFIXES] + [OTHER, INSTRUCTIONS + SUFFIXES[0]]
    rng = random.Random(0)
    reqs = [GenRequest(prompt=p, max_new_tokens=rng.choice([3, 9, 14]), adapter=a)
            for p, a in zip(prompts, adapters, strict=True)]
    plain, plain_stats = _run(tiny, reqs, target, False, "hf")  # the reference: the model's own forward
    shared_out, stats = _run(tiny, reqs, target, True, engine, overhead)
    assert stats["prefix_groups"] > 0 and (stats["buckets"] > 1) == (overhead == 1)
    assert stats["inlined_prefixes"] == (stats["prefix_groups"] if inline and engine == "auto" else 0)
    if overhead == 1:  # one bucket is as wide as the longest row without a group: rows recompute prefixes
        assert stats["prefill_tokens"] < plain_stats["prefill_tokens"]
    for p, s in zip(plain, shared_out, strict=True):
        assert s.token_ids == p.token_ids
        assert s.logprobs == pytest.approx(p.logprobs, abs=1e-4)


def test_shared_prefix_with_sampling_records_the_models_log_probs(tiny_llama):
    """Sampling over shared prefixes: each recorded token log-prob is the model's own (teacher-forced) one.
    (Token equality with plain prefill is not expected: the shared-prefix attention rounds differently,
    and a random tiny model's near-uniform distribution re-sorts under 1e-7 changes.)"""
    reqs = [GenRequest(prompt=INSTRUCTIONS + s, max_new_tokens=8, temperature=0.9, top_p=0.95) for s in SUFFIXES]
    shared, stats = _run(tiny_llama, reqs, None, True, "auto")
    assert stats["prefix_groups"] == 1
    for g, r in zip(shared, reqs, strict=True):
        prompt = tiny_llama.encode(r)[1]
        for t in range(1, len(g.token_ids) + 1):
            want = tiny_llama.score([prompt], [g.token_ids[:t]]).item()
            assert sum(g.logprobs[:t]) == pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize("engine", ["auto", "hf"])
def test_ragged_prefill_without_shared_prefixes_equals_plain_prefill(tiny, engine):
    """No two rows share a prefix: the bodies still run in length buckets; one-token prompts work too."""
    texts = ["Zebra crossing at noon, then a long walk through the old market to find spices and tea.",
             "Quantum", "Ok", "Mountains rise above the clouds where eagles nest.", OTHER]
    reqs = [GenRequest(prompt=t, max_new_tokens=6) for t in texts]
    plain, _ = _run(tiny, reqs, None, False, "hf")
    ragged, stats = _run(tiny, reqs, None, True, engine, overhead=1)
    assert stats["prefix_groups"] == 0 and stats["buckets"] > 1
    for p, r in zip(plain, ragged, strict=True):
        assert r.token_ids == p.token_ids
        assert r.logprobs == pytest.approx(p.logprobs, abs=1e-4)
