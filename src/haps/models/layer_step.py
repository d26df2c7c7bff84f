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
  ``pack_gqa`` for one-token queries) and calls SDPA once on the static cache's views.
- no per-call keyword plumbing, output dataclasses or mask building.

For a model with something these steps do not model (attention logit soft-capping, tensor-parallel
pretraining slices), `step_supported` is False and `LeanDecode` calls each layer's own forward instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from haps.models.lora import PerRequestLoRALinear


def project(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)`` for a linear module and x: (b, d_in) -> (b, d_out) (possibly a transposed view).

    Plain CPU ``nn.Linear``: ``(W @ x^T)^T`` plus bias. `PerRequestLoRALinear` (batched strategy): its base
    layer the same way plus its adapters' `delta`. Anything else (PEFT layers, the row-loop strategy, other
    devices): the module's own forward.
    """
    if type(mod) is nn.Linear and x.device.type == "cpu":
        y = torch.mm(mod.weight, x.t()).t()
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


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, cache,
            layer_idx: int) -> torch.Tensor:
    """Writes k, v: (b, H_kv, hd) into the cache and attends q: (b, H, hd) over it -> (b, H * hd).

    mask: (b, 1, 1, n) additive over the n visible cache positions. The g = H / H_kv query heads that share
    a key/value head are that head's g queries (no key/value repetition).
    """
    b, H, hd = q.shape
    keys, values = cache.update(k[:, :, None], v[:, :, None], layer_idx)  # (b, H_kv, n, hd)
    h_kv = keys.shape[1]
    q = q.reshape(b, h_kv, H // h_kv, hd).contiguous()  # CPU SDPA takes its fast kernel only for contiguous q
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                         scale=attn.scaling)  # (b, H_kv, g, hd)
    return out.reshape(b, H * hd)


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gated MLP: down(act(gate(x)) * up(x)), x: (b, d) -> (b, d)."""
    return project(mlp.down_proj, mlp.act_fn(project(mlp.gate_proj, x)) * project(mlp.up_proj, x))


def llama_step(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
               cache, layer_idx: int) -> torch.Tensor:
    """`LlamaDecoderLayer` for one token: h (b, d) -> (b, d); cos, sin: (b, hd)."""
    attn = layer.self_attn
    q, k, v = _heads(attn, layer.input_layernorm(h))
    o = _attend(attn, _rope(q, cos, sin), _rope(k, cos, sin), v, mask, cache, layer_idx)
    h = h + project(attn.o_proj, o)
    return h + _mlp(layer.mlp, layer.post_attention_layernorm(h))


def gemma3_step(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache, layer_idx: int) -> torch.Tensor:
    """`Gemma3DecoderLayer` for one token (q/k norms, sandwich norms): h (b, d) -> (b, d)."""
    attn = layer.self_attn
    q, k, v = _heads(attn, layer.input_layernorm(h))
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = _attend(attn, _rope(q, cos, sin), _rope(k, cos, sin), v, mask, cache, layer_idx)
    h = h + layer.post_attention_layernorm(project(attn.o_proj, o))
    return h + layer.post_feedforward_layernorm(_mlp(layer.mlp, layer.pre_feedforward_layernorm(h)))


LayerStep = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, object, int], torch.Tensor]
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
