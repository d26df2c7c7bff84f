"""Decoder layers on token rows, for the families `LeanDecode` knows (Llama, Gemma 3): one decode step, or
one prefill block of T tokens per row.

The hidden states are 2-D ``(N, d)`` token rows (N = b rows for a step; n * T, token-major per sequence,
for a block), so every per-token op (norms, projections, rotary, MLP) runs once over all of them; only
attention sees the sequence structure, through its plan (`haps.models.attention.StepMask` or
`BlockPlan`). These functions run the layer's own submodules (norms, activations, the LoRA wrappers'
adapters) in the same order as the transformers layer code, with differences that change no result
beyond float rounding:

- `project` computes a bias-free CPU ``nn.Linear`` of a few rows as ``W @ x^T`` (the weight as MKL's
  streamed left operand) instead of ``x @ W^T`` (packed transposed right operand on every call). Measured
  on this project's 2-core AVX2 machine for a whole layer's projections: 153 vs 125 GFLOP/s at b=64
  (SmolLM2 shapes), 107 vs 72 at b=16 and 52 vs 22 at b=4 (Gemma 3 shapes).
- a step packs the query heads of a key/value group as that group's queries (transformers' ``pack_gqa``
  for one-token queries) and calls SDPA once on the static cache's views, reading only the positions a
  sliding window can see, plus any shared prefix (`haps.models.attention.attend`); a block attends over
  its own tokens and its rows' shared prefixes (`haps.models.attention.attend_block`).
- no per-call keyword plumbing, output dataclasses or mask building.

For a model with something these functions do not model (attention logit soft-capping, tensor-parallel
pretraining slices), `step_supported` is False and `LocalModel` decodes it with `HFDecode`. `module_step`
runs one token through the layer module's own forward: the reference the tests hold every step equal to.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from haps.models.adapters import AdapterBatch, lora_delta
from haps.models.attention import BlockPlan, StepMask, attend, attend_block
from haps.models.lora import PerRequestLoRALinear
from haps.models.padding import pad_rows

# Above this many rows (prefill blocks) a CPU projection runs as ``x @ W^T`` (its contiguous output suits the
# elementwise ops that follow; the weight is reused across many rows anyway) and is not padded.
SKINNY_MAX_ROWS = 256


def project(mod: nn.Module, x: torch.Tensor, tokens: int = 1, adapters: AdapterBatch | None = None) -> torch.Tensor:
    """``mod(x)`` for a linear module and x: (n * tokens, d_in) -> (n * tokens, d_out), rows token-major per
    sequence (x possibly a transposed view); ``adapters``: the batch's, one row per sequence of ``tokens`` rows.

    Plain CPU ``nn.Linear``: ``(W @ x^T)^T`` plus bias for up to `SKINNY_MAX_ROWS` rows, padded to a count MKL
    covers in few weight passes (`gemm_rows`); ``x @ W^T`` above. `PerRequestLoRALinear` (batched strategy):
    its base layer the same way plus `lora_delta` of its layer's adapters. Anything else (PEFT layers, the
    row-loop strategy, other devices): the module's own forward.
    """
    N = x.shape[0]
    if type(mod) is nn.Linear and x.device.type == "cpu":
        if N > SKINNY_MAX_ROWS:
            return F.linear(x, mod.weight, mod.bias)
        y = torch.mm(mod.weight, pad_rows(x).t())[:, :N].t()
        return y if mod.bias is None else y + mod.bias
    if type(mod) is PerRequestLoRALinear:
        w = mod.weights_of(adapters)
        if w is None:
            return project(mod.base_layer, x, tokens)
        if adapters.strategy == "bmm":
            y = project(mod.base_layer, x, tokens)
            return y + lora_delta(x.reshape(-1, tokens, x.shape[1]), *w, adapters.alpha).reshape(N, -1)
        return mod(x.reshape(-1, tokens, x.shape[1]), adapters).reshape(N, -1)
    return mod(x.reshape(-1, tokens, x.shape[1])).reshape(N, -1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x: (b, heads, hd) with cos, sin: (b, hd) (transformers' rotate-half form)."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def _heads(attn: nn.Module, x: torch.Tensor, tokens: int,
           adapters: AdapterBatch | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q: (N, H, hd), k and v: (N, H_kv, hd) of the normed hidden states x: (N, d)."""
    N, hd = x.shape[0], attn.head_dim
    return (project(attn.q_proj, x, tokens, adapters).reshape(N, -1, hd),
            project(attn.k_proj, x, tokens, adapters).reshape(N, -1, hd),
            project(attn.v_proj, x, tokens, adapters).reshape(N, -1, hd))


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StepMask | BlockPlan, cache,
            layer_idx: int) -> torch.Tensor | None:
    """Writes k, v: (N, H_kv, hd) into the cache and attends q: (N, H, hd) -> (N, H * hd) (None for a keys-only
    block).

    A decode step (`StepMask`, N = b rows): ``plan`` says which of the rows' own cache positions the step reads
    (the last ``plan.rows.shape[-1]``) and which shared prefixes; the g = H / H_kv query heads that share a
    key/value head are that head's g queries (no key/value repetition). A prefill block (`BlockPlan`,
    N = n * T): `attend_block`.
    """
    if isinstance(plan, BlockPlan):
        return attend_block(q, k, v, plan, cache, layer_idx, attn.scaling)
    b, H, hd = q.shape
    keys, values = cache.update(k[:, :, None], v[:, :, None], layer_idx)  # (b, H_kv, n, hd)
    h_kv = keys.shape[1]
    q = q.reshape(b, h_kv, H // h_kv, hd).contiguous()  # CPU SDPA takes its fast kernel only for contiguous q
    return attend(q, keys, values, plan, layer_idx, attn.scaling).reshape(b, H * hd)


def _mlp(mlp: nn.Module, x: torch.Tensor, tokens: int, adapters: AdapterBatch | None) -> torch.Tensor:
    """Gated MLP: down(act(gate(x)) * up(x)), x: (N, d) -> (N, d)."""
    up = mlp.act_fn(project(mlp.gate_proj, x, tokens, adapters)) * project(mlp.up_proj, x, tokens, adapters)
    return project(mlp.down_proj, up, tokens, adapters)


def llama_step(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: StepMask | BlockPlan,
               cache, layer_idx: int, adapters: AdapterBatch | None = None) -> torch.Tensor:
    """`LlamaDecoderLayer` on token rows: h (N, d) -> (N, d); cos, sin: (N, hd); ``adapters``: one row per sequence."""
    attn, T = layer.self_attn, plan.tokens
    q, k, v = _heads(attn, layer.input_layernorm(h), T, adapters)
    o = _attend(attn, _rope(q, cos, sin), _rope(k, cos, sin), v, plan, cache, layer_idx)
    if o is None:  # a keys-only prefill block: the layer's output is not needed
        return h
    h = h + project(attn.o_proj, o, T, adapters)
    return h + _mlp(layer.mlp, layer.post_attention_layernorm(h), T, adapters)


def gemma3_step(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: StepMask | BlockPlan,
                cache, layer_idx: int, adapters: AdapterBatch | None = None) -> torch.Tensor:
    """`Gemma3DecoderLayer` on token rows (q/k norms, sandwich norms): h (N, d) -> (N, d); cos, sin: (N, hd)."""
    attn, T = layer.self_attn, plan.tokens
    q, k, v = _heads(attn, layer.input_layernorm(h), T, adapters)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = _attend(attn, _rope(q, cos, sin), _rope(k, cos, sin), v, plan, cache, layer_idx)
    if o is None:  # a keys-only prefill block: the layer's output is not needed
        return h
    h = h + layer.post_attention_layernorm(project(attn.o_proj, o, T, adapters))
    return h + layer.post_feedforward_layernorm(_mlp(layer.mlp, layer.pre_feedforward_layernorm(h), T, adapters))


LayerStep = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, StepMask | BlockPlan, object, int,
                      AdapterBatch | None], torch.Tensor]
LAYER_STEPS: dict[str, LayerStep] = {"llama": llama_step, "gemma3_text": gemma3_step}


def module_step(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: StepMask, cache,
                layer_idx: int, adapters: AdapterBatch | None = None) -> torch.Tensor:
    """The slow twin of a `LAYER_STEPS` decode step: one token (b, d) through the layer module's own forward,
    attending over every cache position (``mask.rows`` covers them all; no shared prefixes)."""
    from haps.models.adapters import adapters_in_scope
    from haps.models.hf_compat import with_cache

    with adapters_in_scope(adapters):
        return layer(h[:, None], attention_mask=mask.rows, position_embeddings=(cos[:, None], sin[:, None]),
                     **with_cache(layer, cache))[:, 0]


def step_supported(model: nn.Module) -> bool:
    """Whether every decoder layer of ``model`` is one `LAYER_STEPS` models exactly."""
    cfg = model.config
    if cfg.model_type not in LAYER_STEPS:
        return False
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        return False
    if cfg.model_type == "llama" and getattr(cfg, "pretraining_tp", 1) > 1:
        return False
    return True
