"""The decode-engine protocol: both engines run the same plans to the same tokens; adapters travel per call,
so concurrent batches on one model do not interfere; context windows are enforced per row."""

from __future__ import annotations

import threading

import pytest
import torch

from haps.config import LoraTarget
from haps.models.decode import LeanDecode
from haps.models.engine import DecodeEngine, DecodeOptions, plan_prefill
from haps.models.engines import make_engine
from haps.models.hf_decode import HFDecode
from haps.models.local import LocalModel
from haps.models.types import GenRequest, RowAdapter

ENGINES = {"lean": LeanDecode, "hf": HFDecode}
INSTRUCTIONS = "You are a careful assistant. Read the question, think step by step, then answer in one line. "


@pytest.fixture(params=["tiny_llama", "tiny_gemma3"])
def tiny(request) -> LocalModel:
    return request.getfixturevalue(request.param)


def _adapter(local: LocalModel, target: LoraTarget, seed: int) -> RowAdapter:
    g = torch.Generator().manual_seed(seed)
    shapes = local.lora_sites(target).shapes
    return RowAdapter(A=[torch.randn(o, target.rank, generator=g) * 0.5 for o, _ in shapes],
                      B=[torch.randn(target.rank, i, generator=g) * 0.5 for _, i in shapes])


@torch.no_grad()
def _greedy_alone(local: LocalModel, ids: list[int], n: int, adapter, target) -> list[int]:
    """The obviously-correct decoder: the whole sequence through the model every step, adapters in scope."""
    from haps.models.adapters import adapters_in_scope

    seq = list(ids)
    batch = local.adapter_batch([adapter], target) if adapter is not None else None
    for _ in range(n):
        with adapters_in_scope(batch):
            seq.append(int(local.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("kind", ["lean", "hf"])
def test_engines_implement_the_protocol(tiny, kind):
    engine = make_engine(tiny.model, kind, 4)
    assert isinstance(engine, ENGINES[kind])
    for attr in ("compacts_in_place", "shares_prefixes", "inlined_prefixes"):
        assert isinstance(getattr(engine, attr), bool | int)
    for method in ("prefill", "step", "pick", "select_rows"):
        assert callable(getattr(engine, method))
    assert set(DecodeEngine.__annotations__) <= set(dir(engine)) | {"inlined_prefixes"}


@pytest.mark.parametrize("kind", ["lean", "hf"])
@pytest.mark.parametrize("share", [False, True])
@torch.no_grad()
def test_engine_runs_a_plan_and_steps_like_the_reference(tiny, kind, share):
    """prefill(plan) + pick + select_rows + step, driven by hand, give each row's reference greedy tokens."""
    target = LoraTarget(last_k_layers=2, rank=4)
    shared = _adapter(tiny, target, 3)
    adapters = [None, shared, shared, None]
    texts = [INSTRUCTIONS + q for q in ("What is 2+2?", "Name a river.", "Name a colour.", "Why?")]
    seqs = [tiny.encode(GenRequest(prompt=t))[1] for t in texts]
    batch = tiny.adapter_batch(adapters, target)
    options = DecodeOptions(share_prefix=share, min_shared_prefix=4, bucket_overhead_tokens=1)
    plan = plan_prefill(seqs, options, batch)
    assert plan.plain != share and (not share or plan.groups)
    engine = make_engine(tiny.model, kind, 6, tiny.tokenizer.pad_token_id)
    out = engine.prefill(plan, batch)
    temps, top_ps = torch.zeros(4), torch.ones(4)
    got: list[list[int]] = [[] for _ in seqs]
    rows = [0, 1, 2, 3]
    for step in range(6):
        tokens, _ = engine.pick(out, temps[rows], top_ps[rows], torch.Generator(), False)
        for r, t in zip(rows, tokens, strict=True):
            got[r].append(t)
        if step == 2:  # row 0 leaves the batch: the last row fills its hole
            keep = torch.tensor([3, 1, 2])
            engine.select_rows(keep)
            batch = batch.select(keep)
            rows, tokens = [3, 1, 2], [tokens[3], tokens[1], tokens[2]]
        out = engine.step(torch.tensor(tokens), batch)
    for r, (ids, a) in enumerate(zip(seqs, adapters, strict=True)):
        n = 3 if r == 0 else 6
        assert got[r][:n] == _greedy_alone(tiny, ids, n, a, target), f"row {r}"


def test_two_threads_with_different_adapters_equal_one_at_a_time(tiny):
    """Adapters are passed per call: two threads generating on one model at once with different adapters get
    exactly what each gets alone."""
    target = LoraTarget(last_k_layers=2, rank=4, alpha=0.5)
    jobs = {k: [GenRequest(prompt=f"{INSTRUCTIONS} Item {k}.{i}", max_new_tokens=8, adapter=_adapter(tiny, target, k))
                for i in range(3)] for k in (1, 2)}
    alone = {k: [g.token_ids for g in tiny.generate(reqs, target=target)] for k, reqs in jobs.items()}
    assert alone[1] != alone[2]
    got: dict[int, list] = {1: [], 2: []}
    barrier = threading.Barrier(2)

    def work(k):
        barrier.wait()
        for _ in range(3):
            got[k].append([g.token_ids for g in tiny.generate(jobs[k], target=target)])

    threads = [threading.Thread(target=work, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in (1, 2):
        assert got[k] == [alone[k]] * 3


def test_context_window_rejects_one_row_and_leaves_the_others(tiny_llama):
    window = tiny_llama.context_window
    assert window == 512  # the tiny config's max_position_embeddings
    long = " ".join(["word"] * 600)
    reqs = [GenRequest(prompt="Hi there", max_new_tokens=4), GenRequest(prompt=long, max_new_tokens=4),
            GenRequest(prompt="Once upon a time", max_new_tokens=4)]
    out = tiny_llama.generate(reqs)
    n_long = len(tiny_llama.encode(reqs[1])[1])
    assert out[1].finish_reason == "error" and out[1].text == "" and out[1].token_ids == []
    assert out[1].error == (f"model 'tiny-llama': the prompt has {n_long} tokens and 4 are to be generated, more "
                            f"than its context window of {window}; shorten the prompt, ask for fewer tokens, or set "
                            "the request's truncation='middle'.")
    for i in (0, 2):
        assert out[i].error is None and out[i].token_ids == tiny_llama.generate([reqs[i]])[0].token_ids
    # fits exactly: prompt + max_new_tokens == window
    ids = tiny_llama.encode(reqs[1])[1]
    edge = GenRequest(prompt=tiny_llama.tokenizer.decode(ids[: window - 4 - 1]), max_new_tokens=4)
    assert tiny_llama.generate([edge])[0].error is None


def test_middle_truncation_keeps_the_start_and_the_end(tiny_llama):
    window = tiny_llama.context_window
    ids = list(range(100, 100 + window + 50))
    req = GenRequest(prompt="x", max_new_tokens=10, truncation="middle")
    fitted, err = tiny_llama.fit_context(req, ids)
    room = window - 10
    assert err is None and len(fitted) == room
    assert fitted == ids[: room // 2] + ids[len(ids) - (room - room // 2):]
    text = tiny_llama.tokenizer.decode(ids)
    out = tiny_llama.generate([GenRequest(prompt=text, max_new_tokens=3, truncation="middle")])[0]
    assert out.error is None and len(out.token_ids) == 3 and out.prompt_tokens == window - 3


@pytest.mark.parametrize("last_k", [1, 2])
@pytest.mark.parametrize("share", [False, True])
def test_kept_states_rescore_like_the_whole_model(tiny, last_k, share):
    """Rows that ask for it keep the states entering the first adapted layer (prompt and fed tokens, shared
    prefixes and compaction included); re-scoring from them equals re-scoring through the whole model, with
    gradients to the same adapters."""
    target = LoraTarget(last_k_layers=last_k, rank=4, alpha=0.5)
    adapters = [_adapter(tiny, target, 1), None, _adapter(tiny, target, 2), _adapter(tiny, target, 1)]
    lens = [7, 3, 12, 1]  # rows finish at different steps; the last one right after prefill
    reqs = [GenRequest(prompt=INSTRUCTIONS + f"Question {i}?", max_new_tokens=n, adapter=a, keep_states=True,
                       temperature=1.0) for i, (n, a) in enumerate(zip(lens, adapters, strict=True))]
    lm = LocalModel(tiny.spec, tiny.model, tiny.tokenizer,
                    options=DecodeOptions(share_prefix=share, min_shared_prefix=4))
    gens = lm.generate(reqs, target=target, seed=3)
    first = min(tiny.lora_sites(target).layers)
    rows = [i for i, a in enumerate(adapters) if a is not None]
    assert gens[1].states is None  # no adapter: nothing to keep
    for i in rows:
        g = gens[i]
        assert g.states_layer == first and g.states.shape == (len(g.prompt_ids) + len(g.token_ids) - 1,
                                                              tiny.model.config.hidden_size)
    leaves = {}
    for i in rows:
        a = adapters[i]
        leaves.setdefault(id(a), RowAdapter(A=[x.clone().requires_grad_() for x in a.A],
                                            B=[x.clone().requires_grad_() for x in a.B]))
    args = ([gens[i].prompt_ids for i in rows], [gens[i].token_ids for i in rows],
            [leaves[id(adapters[i])] for i in rows], target)
    want = lm.score(*args)
    want.sum().backward()
    want_grads = {k: [x.grad.clone() for x in v.A + v.B] for k, v in leaves.items()}
    for v in leaves.values():
        for x in v.A + v.B:
            x.grad = None
    got = lm.score(*args, states=[gens[i].states for i in rows], states_layer=first)
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for k, v in leaves.items():
        for x, g in zip(v.A + v.B, want_grads[k], strict=True):
            torch.testing.assert_close(x.grad, g, rtol=1e-3, atol=1e-5)
    with torch.no_grad():  # and the recorded sampling log-probs are the same distribution's
        for j, i in enumerate(rows):
            assert float(got[j]) == pytest.approx(sum(gens[i].logprobs), abs=1e-3)


@pytest.mark.parametrize("kind", ["lean", "hf"])
@torch.no_grad()
def test_rows_with_different_last_layer_adapters_share_a_prefix(tiny, kind):
    """Adapters on the last layer's o_proj change no key or value, so rows with different adapters share one
    prefix prefill and still decode exactly their own greedy tokens; on two layers they do not share."""
    from haps.models.lora import changes_keys_values

    target = LoraTarget(last_k_layers=1, rank=4)
    assert not changes_keys_values(target)
    assert changes_keys_values(LoraTarget(last_k_layers=2, rank=4))
    assert changes_keys_values(LoraTarget(last_k_layers=1, rank=4, module_name="self_attn.v_proj"))
    adapters = [_adapter(tiny, target, 1), _adapter(tiny, target, 2), None]
    reqs = [GenRequest(prompt=INSTRUCTIONS + q, max_new_tokens=5, adapter=a)
            for q, a in zip(("What is 2+2?", "Name a river.", "Why?"), adapters, strict=True)]
    seqs = [tiny.encode(r)[1] for r in reqs]
    batch = tiny.adapter_batch(adapters, target)
    options = DecodeOptions(min_shared_prefix=4, engine=kind)
    assert [g.rows for g in plan_prefill(seqs, options, batch, adapters_change_kv=False).groups] == [(0, 1, 2)]
    assert plan_prefill(seqs, options, batch).groups == []  # three slots (0, 1, none): nothing shared
    before, tiny.options = tiny.options, options
    try:
        got = tiny.generate(reqs, target=target)
        assert tiny.last_stats["prefix_groups"] == 1
    finally:
        tiny.options = before
    for g, ids, a in zip(got, seqs, adapters, strict=True):
        assert g.token_ids == _greedy_alone(tiny, ids, 5, a, target)
