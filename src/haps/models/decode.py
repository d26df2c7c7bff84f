"""Decode engines for `LocalModel`: the generic transformers path (reference) and a lean fast path.

Both engines expose the same three calls used by the decode loop in `LocalModel._generate_batch`::

    logits = engine.prefill(ids, mask, pos, past)  # ids, pos: (b, T); mask: (b, P + T) over the past
                                                   # (a DynamicCache of P positions, or None) and ids
    logits = engine.step(tokens)                # tokens: (b,) -> logits (b, V) for the next position
    engine.select_rows(keep)                    # keep: (b',) indices of rows that stay in the batch

`HFDecode` runs the model's own forward with a `DynamicCache` (any causal LM). `LeanDecode` runs the
prefill the same way, copies the cache into preallocated buffers, then decodes with a static cache (no
`torch.cat` growth per step), a padding mask kept as one preallocated additive row per sequence (no mask
building per step) and the last-token head only. Each decode step runs every decoder layer through
`haps.models.layer_step` (the layer's own submodules on (b, d) hidden states, skinny-matmul friendly
projections, the per-request LoRA wrappers' adapters included) or, for layers that module does not
model, through the layer's own forward. It supports the families whose layer signature it knows
(`LEAN_FAMILIES`); other models use `HFDecode`.
"""

from __future__ import annotations

import torch
from torch import nn

from haps.models.layer_step import LAYER_STEPS, step_supported

# model_type -> how the rotary embedding is called: "plain" rotary_emb(x, pos) or "per_type"
# rotary_emb(x, pos, layer_type) (one (cos, sin) per attention type, e.g. Gemma 3 local/global).
LEAN_FAMILIES = {"llama": "plain", "gemma3_text": "per_type"}


def head_logits(head: nn.Module, h: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Vocabulary logits (b, V) of last-position hidden states ``h`` (b, d).

    On CPU, for a plain bias-free ``nn.Linear`` head, computes ``W @ h^T`` in slices of ``chunk`` vocabulary
    rows, each written transposed into the (b, V) output while it is still in cache: the same dot products as
    ``h @ W^T``, but MKL streams the (V, d) weight as its left operand instead of packing it as a transposed
    right operand on every call. Measured on this project's 2-core AVX2 machine, against ``h @ W^T``:
    Gemma 3's 262k x 640 head 40 vs 130 ms at b=2 and 103 vs 190 ms at b=16 (one slice); slicing then took
    b=16 from 93 to 68 ms and SmolLM2's 49k x 576 head at b=64 from 33 to 29 ms. Other heads and devices
    are called as they are.
    """
    if type(head) is nn.Linear and head.bias is None and h.dim() == 2 and h.device.type == "cpu":
        W, ht = head.weight, h.t()
        out = h.new_empty((h.shape[0], W.shape[0]))
        for i in range(0, W.shape[0], chunk):
            out[:, i:i + chunk].copy_(torch.mm(W[i:i + chunk], ht).t())
        return out
    return head(h)


def _module_step(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                 cache, layer_idx: int) -> torch.Tensor:
    """One token through the layer module's own forward (for layers `haps.models.layer_step` does not model)."""
    return layer(h[:, None], attention_mask=mask, position_embeddings=(cos[:, None], sin[:, None]),
                 past_key_values=cache)[:, 0]


class HFDecode:
    """Reference engine: the model's forward and a transformers DynamicCache, every step."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.cache = None
        self.mask: torch.Tensor | None = None  # (b, n) 1 = real token
        self.next_pos: torch.Tensor | None = None  # (b,)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, past=None) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = past if past is not None else DynamicCache(config=self.model.config)
        self.mask = mask
        self.next_pos = pos[:, -1] + 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        logits = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_pos[:, None],
                            past_key_values=self.cache, use_cache=True).logits[:, -1, :]
        self.next_pos = self.next_pos + 1
        return logits

    def select_rows(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.mask = self.mask.index_select(0, keep)
        self.next_pos = self.next_pos.index_select(0, keep)


class StaticKVCache:
    """Per-layer K and V buffers of shape (b, h_kv, S, d), filled up to ``length`` positions.

    Implements the one cache call transformers attention layers make, ``update(k, v, layer_idx)``:
    it writes the T new positions at ``length`` and returns views of positions ``[0, length + T)``.
    `advance(T)` moves ``length`` once all layers have written their T positions.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> None:
        self.keys, self.values, self.length = keys, values, length

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        n, T = self.length, key_states.shape[2]
        k, v = self.keys[layer_idx], self.values[layer_idx]  # (b, h_kv, S, d)
        k[:, :, n:n + T].copy_(key_states)
        v[:, :, n:n + T].copy_(value_states)
        return k[:, :, :n + T], v[:, :, :n + T]

    def advance(self, T: int) -> None:
        self.length += T

    def select_rows(self, keep: torch.Tensor) -> None:
        n = self.length
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                new = buf.new_zeros((keep.numel(), *buf.shape[1:]))
                new[:, :, :n] = buf[:, :, :n].index_select(0, keep)
                store[i] = new


class LeanDecode:
    """Fast engine for known families: static KV cache, direct decoder-layer calls, last-token head.

    Exactness: the prefill is the reference decoder forward itself; a decode step runs the same modules on the
    same inputs, with keys/values read from a buffer instead of a concatenated tensor, and an additive
    mask of 0 / finfo.min (what the reference's masks mean). Sliding-window layers see the same keys:
    positions older than the window are masked rather than dropped.
    """

    def __init__(self, model: nn.Module, max_new_tokens: int) -> None:
        self.model = model
        self.cfg = model.config
        self.decoder = model.get_decoder()
        self.layers = list(self.decoder.layers[: self.cfg.num_hidden_layers])
        self.rope_kind = LEAN_FAMILIES[self.cfg.model_type]
        self.layer_step = LAYER_STEPS[self.cfg.model_type] if step_supported(model) else _module_step
        self.layer_types = list(getattr(self.cfg, "layer_types", None) or ["full_attention"] * len(self.layers))
        self.window = getattr(self.cfg, "sliding_window", None)
        self.softcap = getattr(self.cfg, "final_logit_softcapping", None)
        self.max_new = max_new_tokens
        self.cache: StaticKVCache | None = None
        self.pad_add: torch.Tensor | None = None  # (b, S): 0 where a key is a real token, finfo.min where padding
        self.next_pos: torch.Tensor | None = None  # (b,)

    @staticmethod
    def supports(model: nn.Module) -> bool:
        cfg = model.config
        return (cfg.model_type in LEAN_FAMILIES and getattr(cfg, "_attn_implementation", "eager") in ("sdpa", "eager")
                and not getattr(cfg, "use_bidirectional_attention", False)
                and hasattr(model.get_decoder(), "rotary_emb"))

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, past=None) -> torch.Tensor:
        from transformers import DynamicCache

        dyn = past if past is not None else DynamicCache(config=self.cfg)
        hidden = self.decoder(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=dyn,
                              use_cache=True).last_hidden_state  # (b, T, d), after the final norm
        logits = self._logits(hidden[:, -1])
        b, L = mask.shape  # past + new positions
        S = L + self.max_new
        keys, values = [], []
        for layer in dyn.layers:
            k, v = layer.keys, layer.values  # (b, h_kv, n_i, d); sliding layers may keep only the last window
            kb = k.new_zeros((b, k.shape[1], S, k.shape[3]))
            vb = v.new_zeros((b, v.shape[1], S, v.shape[3]))
            n_i = k.shape[2]
            kb[:, :, L - n_i:L] = k  # right-aligned: older positions stay zero and are masked by the window
            vb[:, :, L - n_i:L] = v
            keys.append(kb)
            values.append(vb)
        self.cache = StaticKVCache(keys, values, L)
        dtype = keys[0].dtype
        self.pad_add = torch.zeros((b, S), dtype=dtype, device=ids.device)
        self.pad_add[:, :L].masked_fill_(mask == 0, torch.finfo(dtype).min)
        self.next_pos = pos[:, -1] + 1
        return logits

    def _masks(self, n: int) -> dict[str, torch.Tensor]:
        """Additive masks (b, 1, 1, n) for a query at cache index n-1, per attention type."""
        full = self.pad_add[:, None, None, :n]
        out = {"full_attention": full}
        if "sliding_attention" in self.layer_types:
            if self.window is not None and n > self.window:
                sl = full.clone()
                sl[..., : n - self.window] = torch.finfo(sl.dtype).min  # keep q_idx - kv_idx < window
                out["sliding_attention"] = sl
            else:
                out["sliding_attention"] = full
        return out

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        n = cache.length + 1  # keys visible to the new token
        pos = self.next_pos[:, None]  # (b, 1)
        h = self.decoder.embed_tokens(tokens[:, None])  # (b, 1, d)
        masks = self._masks(n)
        if self.rope_kind == "plain":
            pe = self.decoder.rotary_emb(h, pos)
            pes = {t: pe for t in set(self.layer_types)}
        else:
            pes = {t: self.decoder.rotary_emb(h, pos, t) for t in set(self.layer_types)}
        h = h[:, 0]  # (b, d)
        for li, (layer, lt) in enumerate(zip(self.layers, self.layer_types, strict=True)):
            cos, sin = pes[lt]
            h = self.layer_step(layer, h, cos[:, 0], sin[:, 0], masks[lt], cache, li)
        cache.advance(1)
        logits = self._logits(self.decoder.norm(h))
        self.next_pos = self.next_pos + 1
        return logits

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """(b, d) final-normed hidden states -> (b, V) logits, with the model's final soft-capping."""
        logits = head_logits(self.model.get_output_embeddings(), h)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def select_rows(self, keep: torch.Tensor) -> None:
        self.cache.select_rows(keep)
        self.pad_add = self.pad_add.index_select(0, keep)
        self.next_pos = self.next_pos.index_select(0, keep)
