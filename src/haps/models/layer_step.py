"""One decode step of one decoder layer, for the families `LeanDecode` knows (Llama, Gemma 3).

A decode step has one new token per row, so every projection is a skinny ``(b, d_in) -> (b, d_out)``
matmul. These functions run the layer's own submodules (norms, activations, the LoRA wrappers'
adapters) on 2-D ``(b, d)`` hidden states, in the same order as the transformers layer code, with
three differences that change no result beyond float rounding:

- `project` computes a bias-free CPU ``nn.Linear`` as ``W @ x^T`` (the weight as MKL's streamed left
  operand) instead of ``x @ W^T`` (packed transposed right operand on every call). Measured on this
  project's 2-core AVX2 machine for a whole layer's projections: 153 vs 125 GFLOP/s at b=64 (SmolLM2
  shapes), 107 vs 72 at b=16 and 52 vs 22 at b=4 (Gemma 3 shapes).
- attention packs the query heads of a key/value group as that group's queries (transformers'
  ``pack_gqa`` for one-token queries) and calls SDPA once on the static cache's views, reading only the
  positions a sliding window can see, plus any shared prefix (`haps.models.attention.attend`).
- no per-call keyword plumbing, output dataclasses or mask building.

For a model with something these steps do not model (attention logit soft-capping, tensor-parallel
pretraining slices), `step_supported` is False and `LeanDecode` calls each layer's own forward instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from haps.models.attention import StepMask, attend
from haps.models.lora import PerRequestLoRALinear

# Row counts up to 16 and what to pad them to (see `gemm_rows`).
_SMALL_GEMM_ROWS = (0, 1, 2, 4, 4, 5, 6, 8, 8) + (16,) * 8


def gemm_rows(n: int, min_rows: int = 1) -> int:
    """How many rows to give a CPU ``W @ x^T`` whose x has n rows (the matmul's N): n, or a little more.

    MKL's single-precision GEMM covers N in column blocks of 16, then 8, 4, 2, 1, and each block streams
    the whole weight, so a ragged N costs as many weight passes as the set bits of N % 16, plus one per full
    16 block. Measured on this project's 2-core AVX2 machine for Gemma 3's 262k x 640 head (ms): N=15
    146, N=16 66; N=12 92; N=31 173, N=32 93; and the same shape over a decoder layer's projections (N=15
    58.6 vs N=16 20.3 ms for 18 layers). So pad N to the cheapest count at or above it: 3 -> 4, 7 -> 8,
    9..15 -> 16, above 16 to a multiple of 16 (N=17 and N=32 cost the same, 92 vs 93 ms), never below
    ``min_rows``. Zero rows give zero columns that callers slice away; the other columns are the same dot
    products.
    """
    n = max(n, min_rows)
    return _SMALL_GEMM_ROWS[n] if n <= 16 else -(-n // 16) * 16


def pad_rows(x: torch.Tensor, min_rows: int = 1) -> torch.Tensor:
    """x: (b, d) with zero rows appended up to ``gemm_rows(b, min_rows)``; x itself when none are needed."""
    m = gemm_rows(x.shape[0], min_rows)
    return x if m == x.shape[0] else torch.cat([x, x.new_zeros((m - x.shape[0], x.shape[1]))])


def project(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)`` for a linear module and x: (b, d_in) -> (b, d_out) (possibly a transposed view).

    Plain CPU ``nn.Linear``: ``(W @ x^T)^T`` plus bias, with x's rows padded to a count MKL covers in few
    weight passes (`gemm_rows`). `PerRequestLoRALinear` (batched strategy): its base layer the same way
    plus its adapters' `delta`. Anything else (PEFT layers, the row-loop strategy, other devices): the
    module's own forward.
    """
    if type(mod) is nn.Linear and x.device.type == "cpu":
        y = torch.mm(mod.weight, pad_rows(x).t())[:, : x.shape[0]].t()
        return y if mod.bias is None else y + mod.bias
    if type(mod) is PerRequestLoRALinear and not mod.row_loop:
        y = project(mod.base_layer, x)
        return y if mod.A is None else y + mod.delta(x[:, None])[:, 0]
    return mod(x[:, None])[:, 0]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x: (b, heads, hd) with cos, sin: (b, hd) (transformers' rotate-half form)."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def _heads(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q: (b, H, hd), k and v: (b, H_kv, hd) of the normed hidden states x: (b, d)."""
    b, hd = x.shape[0], attn.head_dim
    return (project(attn.q_proj, x).reshape(b, -1, hd), project(attn.k_proj, x).reshape(b, -1, hd),
            project(attn.v_proj, x).reshape(b, -1, hd))


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: StepMask, cache,
            layer_idx: int) -> torch.Tensor:
    """Writes k, v: (b, H_kv, hd) into the cache and attends q: (b, H, hd) over it -> (b, H * hd).

    ``mask`` says which of the rows' own cache positions the step reads (the last ``mask.rows.shape[-1]``)
    and which shared prefixes (`haps.models.attention`). The g = H / H_kv query heads that share a
    key/value head are that head's g queries (no key/value repetition).
    """
    b, H, hd = q.shape
    keys, values = cache.update(k[:, :, None], v[:, :, None], layer_idx)  # (b, H_kv, n, hd)
    h_kv = keys.shape[1]
    q = q.reshape(b, h_kv, H // h_kv, hd).contiguous()  # CPU SDPA takes its fast kernel only for contiguous q
    return attend(q, keys, values, mask, layer_idx, attn.scaling).reshape(b, H * hd)


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gated MLP: down(act(gate(x)) * up(x)), x: (b, d) -> (b, d)."""
    return project(mlp.down_proj, mlp.act_fn(project(mlp.gate_proj, x)) * project(mlp.up_proj, x))


def llama_step(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: StepMask,
               cache, layer_idx: int) -> torch.Tensor:
    """`LlamaDecoderLayer` for one token: h (b, d) -> (b, d); cos, sin: (b, hd)."""
    attn = layer.self_attn
    q, k, v = _heads(attn, layer.input_layernorm(h))
    o = _attend(attn, _rope(q, cos, sin), _rope(k, cos, sin), v, mask, cache, layer_idx)
    h = h + project(attn.o_proj, o)
    return h + _mlp(layer.mlp, layer.post_attention_layernorm(h))


def gemma3_step(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: StepMask,
                cache, layer_idx: int) -> torch.Tensor:
    """`Gemma3DecoderLayer` for one token (q/k norms, sandwich norms): h (b, d) -> (b, d)."""
    attn = layer.self_attn
    q, k, v = _heads(attn, layer.input_layernorm(h))
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = _attend(attn, _rope(q, cos, sin), _rope(k, cos, sin), v, mask, cache, layer_idx)
    h = h + layer.post_attention_layernorm(project(attn.o_proj, o))
    return h + layer.post_feedforward_layernorm(_mlp(layer.mlp, layer.pre_feedforward_layernorm(h)))


LayerStep = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, StepMask, object, int], torch.Tensor]
LAYER_STEPS: dict[str, LayerStep] = {"llama": llama_step, "gemma3_text": gemma3_step}


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
