"""The real `tiny` pool: SmolLM2-135M-Instruct (chat) and Gemma-3-270M (base, completion style).

Slow (real weights on CPU): run with ``pytest -m integration``; ``-s`` prints the memory numbers."""

from __future__ import annotations

import pytest
import torch

from haps.config import LoraTarget
from haps.models.adapters import adapters_in_scope
from haps.models.local import LocalModel
from haps.models.types import GenRequest, RowAdapter

pytestmark = pytest.mark.integration

SMOL, GEMMA = "smollm2-135m", "gemma3-270m"


@pytest.fixture(scope="module")
def smol(real_pool) -> LocalModel:
    return real_pool.backend(SMOL)


@pytest.fixture(scope="module")
def gemma(real_pool) -> LocalModel:
    return real_pool.backend(GEMMA)


def test_pool_loads_both_models_once(real_pool, smol, gemma):
    assert isinstance(smol, LocalModel) and isinstance(gemma, LocalModel)
    assert real_pool.backend(SMOL) is smol  # one load per process
    assert smol.spec.name == SMOL and gemma.spec.name == GEMMA


def test_info_shapes(smol, gemma):
    s, g = smol.info(), gemma.info()
    assert (s.model_type, s.layers, s.hidden_size, s.vocab_size) == ("llama", 30, 576, 49152)
    assert (s.o_proj_in, s.o_proj_out) == (576, 576)
    assert g.model_type.startswith("gemma3") and g.layers == 18 and g.hidden_size == 640
    assert g.vocab_size == 262144
    assert (g.o_proj_in, g.o_proj_out) == (1024, 640)  # rectangular: 4 heads x 256 -> 640
    assert (s.context_window, g.context_window) == (8192, 32768)
    assert 100e6 < s.params < 170e6 and 230e6 < g.params < 300e6


def test_smollm2_chat_answers(real_pool):
    q = [{"role": "user", "content": "What is the capital of France?"}]
    out = real_pool.generate(SMOL, [GenRequest(messages=q, max_new_tokens=24)])[0]
    assert "Paris" in out.text, out.text
    assert out.finish_reason in ("eos", "length")
    assert out.prompt_tokens > 5 and out.completion_tokens == len(out.token_ids)
    assert out.cost == pytest.approx(real_pool.spec(SMOL).cost(out.prompt_tokens, out.completion_tokens))
    assert out.cost > 0


def test_gemma_completion_prompt(real_pool):
    prompt = "Question: What is the capital of Germany?\nAnswer: Berlin\n\nQuestion: What is the capital of France?\nAnswer:"
    out = real_pool.generate(GEMMA, [GenRequest(prompt=prompt, max_new_tokens=12, stop=["\n"])])[0]
    assert out.completion_tokens >= 1
    assert out.text.strip(), f"empty completion: {out!r}"
    assert "\n" not in out.text
    assert out.finish_reason in ("stop", "eos", "length")
    assert "Paris" in out.text, out.text


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_score_matches_generation_logprobs(real_pool, name):
    m: LocalModel = real_pool.backend(name)
    reqs = [GenRequest(prompt="The three primary colours are", max_new_tokens=8),
            GenRequest(prompt="1, 2, 3, 4,", max_new_tokens=5)]
    gens = m.generate(reqs)
    prompts = [m.encode(r)[1] for r in reqs]
    with torch.no_grad():
        s = m.score(prompts, [g.token_ids for g in gens])
    for g, v in zip(gens, s, strict=True):
        assert len(g.logprobs) == len(g.token_ids) > 0
        assert v.item() == pytest.approx(sum(g.logprobs), abs=1e-3)


def test_gemma_adapter_changes_logits_zero_adapter_does_not(gemma):
    target = LoraTarget(last_k_layers=2, rank=4, alpha=0.5)
    assert gemma.lora_sites(target).shapes == ((640, 1024), (640, 1024))
    ids = torch.tensor([gemma.tokenizer("The capital of France is")["input_ids"]] * 2)
    g = torch.Generator().manual_seed(0)
    rand = RowAdapter(A=[torch.randn(640, 4, generator=g) * 0.1 for _ in range(2)],
                      B=[torch.randn(4, 1024, generator=g) * 0.1 for _ in range(2)])
    zero = RowAdapter(A=[torch.zeros(640, 4)] * 2, B=[torch.zeros(4, 1024)] * 2)
    with torch.no_grad():
        base = gemma.model(input_ids=ids).logits
        with adapters_in_scope(gemma.adapter_batch([zero, rand], target)):
            adapted = gemma.model(input_ids=ids).logits
    assert torch.equal(adapted[0], base[0])
    assert (adapted[1] - base[1]).abs().max() > 1e-2


# ----------------------------------------------------------------------------- memory of score
def _peak_cpu_bytes(fn) -> tuple[object, int]:
    """Run ``fn`` under the torch profiler; the peak of the running sum of its CPU allocations/frees."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert events, "the profiler recorded no memory events"
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return out, peak


def test_chunked_score_peak_memory_is_well_below_full_logits(gemma):
    torch.manual_seed(0)
    prompts = [torch.randint(10, 5000, (16,)).tolist() for _ in range(2)]
    comps = [torch.randint(10, 5000, (96,)).tolist() for _ in range(2)]
    V = gemma.model.get_output_embeddings().weight.shape[0]
    n = sum(len(c) for c in comps)

    def chunked():
        with torch.no_grad():
            return gemma.score(prompts, comps)

    def naive():  # same decoder pass, then the whole (N, V) logits at once
        seqs = [p + c for p, c in zip(prompts, comps, strict=True)]
        ids = torch.tensor(seqs)
        with torch.no_grad():
            h = gemma.model.get_decoder()(input_ids=ids).last_hidden_state[:, len(prompts[0]) - 1:-1]  # (b, T, d)
            logits = gemma.model.get_output_embeddings()(h).float()  # (b, T, V)
            lp = logits.gather(2, torch.tensor(comps)[:, :, None]).squeeze(2) - torch.logsumexp(logits, -1)
        return lp.sum(1)

    s_chunk, peak_chunk = _peak_cpu_bytes(chunked)
    s_naive, peak_naive = _peak_cpu_bytes(naive)
    logits_mb = n * V * 4 / 2**20
    print(f"\nscore on Gemma ({n} completion tokens, V={V}): full logits {logits_mb:.0f} MiB; "
          f"peak chunked {peak_chunk / 2**20:.0f} MiB, naive {peak_naive / 2**20:.0f} MiB")
    torch.testing.assert_close(s_chunk, s_naive, rtol=1e-5, atol=1e-2)
    assert peak_naive > n * V * 4  # the naive path holds at least the whole logits
    assert peak_chunk < 0.5 * peak_naive
