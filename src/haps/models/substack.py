"""Running only the top decoder layers over whole sequences, from hidden states kept at generation time.

Generated adapters sit in the last k layers, so the hidden states entering the first adapted layer do not
depend on them. `LeanDecode` keeps those states for every prompt and generated token (``capture_layer``);
re-scoring a recorded completion with gradients (RL) then runs only layers ``first..L-1`` and the head,
instead of the whole model::

    h = states                                    # (b, S, d): entering layer `first`, left-padded
    for l in first..L-1:  h = layer_l(h, mask_type(l), rotary_type(l)(pos))   # the layers' own modules
    return final_norm(h)                          # (b, S, d), as the decoder's last hidden state

The masks are causal over each row's own tokens (padding masked; a sliding layer also hides keys w or more
positions back), exactly what the full forward applies; `LocalModel.score` with and without states agree
(a test holds them equal).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from haps.models.adapters import AdapterBatch, adapters_in_scope


def _masks(valid: torch.Tensor, pos: torch.Tensor, layer_types: list[str], window: int | None,
           dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Additive (b, 1, S, S) masks per attention type; a padding query sees itself (no empty softmax row)."""
    S = valid.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=valid.device).tril()
    seen = causal[None] & valid[:, None, :]  # (b, S, S)
    seen |= torch.eye(S, dtype=torch.bool, device=valid.device)[None]
    lowest = torch.finfo(dtype).min
    out = {}
    for t in set(layer_types):
        sees = seen
        if t == "sliding_attention" and window is not None:
            sees = seen & ((pos[:, :, None] - pos[:, None, :]) < window)
        out[t] = torch.zeros(sees.shape, dtype=dtype, device=valid.device).masked_fill_(~sees, lowest)[:, None]
    return out


def forward_from(model: nn.Module, first: int, states: torch.Tensor, valid: torch.Tensor,
                 adapters: AdapterBatch | None = None) -> torch.Tensor:
    """Layers ``first..L-1`` of a causal LM over ``states`` (b, S, d), left-padded where ``valid`` (b, S) is
    False, with the rows' ``adapters`` -> the final-normed hidden states (b, S, d)."""
    cfg = model.config
    decoder = model.get_decoder()
    layers = list(decoder.layers[: cfg.num_hidden_layers])
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * len(layers))
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (b, S)
    masks = _masks(valid, pos, types, getattr(cfg, "sliding_window", None), states.dtype)
    rot = decoder.rotary_emb
    per_type = "layer_type" in inspect.signature(rot.forward).parameters  # Gemma 3: one rotary per type
    pes = {t: (rot(states, pos, t) if per_type else rot(states, pos)) for t in set(types)}
    h = states
    with adapters_in_scope(adapters):
        for li in range(first, len(layers)):
            h = layers[li](h, attention_mask=masks[types[li]], position_ids=pos, position_embeddings=pes[types[li]])
            if isinstance(h, tuple):  # older transformers return (hidden_states, ...)
                h = h[0]
    return decoder.norm(h)
