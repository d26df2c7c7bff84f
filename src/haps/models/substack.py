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
from collections.abc import Sequence

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


def states_batch(states: Sequence[torch.Tensor], expect: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept states (n_i, d) left-padded into (b, S, d) with a validity mask (b, S)."""
    from haps.errors import ShapeError

    for i, (st, n) in enumerate(zip(states, expect, strict=True)):
        if st.shape[0] != n:
            raise ShapeError(f"score: row {i} has states for {st.shape[0]} positions but its prompt and completion "
                             f"need {n} (prompt + completion - 1): pass the states its generation kept.")
    S = max(expect)
    h = states[0].new_zeros((len(states), S, states[0].shape[1]))
    valid = torch.zeros((len(states), S), dtype=torch.bool, device=h.device)
    for i, st in enumerate(states):
        h[i, S - st.shape[0]:] = st
        valid[i, S - st.shape[0]:] = True
    return h, valid


def hidden_from_states(model: nn.Module, prompt_ids, completion_ids, states, layer: int | None, first_adapted: int | None,
                       adapters: AdapterBatch | None) -> torch.Tensor:
    """`LocalModel.score`'s hidden states from kept states: (b, S, d) final-normed over each row's kept positions
    (prompt + completion - 1), left-padded. The states must enter a layer at or before the first adapted one."""
    from haps.errors import ConfigError

    if layer is None:
        raise ConfigError("score: states given without the layer they enter (states_layer).")
    if first_adapted is not None and layer > first_adapted:
        raise ConfigError(f"score: the states enter layer {layer}, after the first adapted layer {first_adapted}: "
                          "they would miss adapters; re-score without them.")
    h, valid = states_batch(states, [len(p) + len(c) - 1 for p, c in zip(prompt_ids, completion_ids, strict=True)])
    device = next(model.parameters()).device
    return forward_from(model, layer, h.to(device), valid.to(device), adapters)
