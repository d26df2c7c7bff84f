"""`HFDecode`: the reference decode engine, any causal LM, through the model's own forward and a
transformers `DynamicCache` (implements `haps.models.engine.DecodeEngine`).

Prefill executes a `PrefillPlan` with transformers forwards: each shared prefix once at batch 1 through
the decoder; each bucket through the decoder over its rows' prefix keys/values copied per row (a row
shorter than its bucket recomputes a few prefix tokens rather than padding mid-row); the results are
assembled into one config-less cache (every layer full; sliding windows come from the masks) laid out
exactly as plain left padding, so positions and windows see the same keys as a plain prefill; then the
rows' last tokens run as one forward over that cache. Adapters reach the LoRA wrappers through
`adapters_in_scope` around every forward.
"""

from __future__ import annotations

import torch
from torch import nn

from haps.models.adapters import AdapterBatch, adapters_in_scope
from haps.models.engine import PrefillPlan
from haps.models.hf_compat import with_cache
from haps.models.padding import left_pad
from haps.models.picking import pick_tokens


class HFDecode:
    """Reference engine: the model's forward and a transformers DynamicCache, every step."""

    compacts_in_place = False  # select_rows copies the whole cache
    shares_prefixes = False  # prefixes are computed once but copied into every row
    captures_states = False  # re-scoring runs the whole model

    def __init__(self, model: nn.Module, pad_id: int = 0) -> None:
        self.model = model
        self.pad_id = pad_id  # fills padded positions (masked: any id gives the same result)
        self.cache = None
        self.mask: torch.Tensor | None = None  # (b, n) 1 = real token
        self.next_pos: torch.Tensor | None = None  # (b,)
        self.inlined_prefixes = 0
        self.prompt_states: list[torch.Tensor] = []  # never kept (captures_states is False)
        self.step_states: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ prefill
    def prefill(self, plan: PrefillPlan, adapters: AdapterBatch | None) -> torch.Tensor:
        """Every prompt of ``plan`` -> the next-token logits (b, V)."""
        if not plan.plain:
            past = self._assembled_cache(plan, adapters)
            if past is not None:
                cache, mask = past
                last = torch.tensor([[s[-1]] for s in plan.seqs], dtype=torch.long, device=self.device)  # (b, 1)
                pos = torch.tensor([[n - 1] for n in plan.lengths], dtype=torch.long, device=self.device)
                return self._forward(last, mask, pos, cache, adapters)
        ids, mask = left_pad(plan.seqs, self.pad_id, self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, L)
        from transformers import DynamicCache

        return self._forward(ids, mask, pos, DynamicCache(config=self.model.config), adapters)

    def _forward(self, ids, mask, pos, cache, adapters) -> torch.Tensor:
        self.cache, self.mask, self.next_pos = cache, mask, pos[:, -1] + 1
        with adapters_in_scope(adapters):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                             **with_cache(self.model, cache))
        return out.logits[:, -1, :]

    def _assembled_cache(self, plan: PrefillPlan, adapters: AdapterBatch | None):
        """(DynamicCache over every row's positions but the last, laid out as left padding; its mask (b, P + 1)
        including the last tokens), or None when the model's cache is not made of full layers."""
        from transformers import DynamicCache

        seqs, lengths, b = plan.seqs, plan.lengths, len(plan.seqs)
        P = max(lengths) - 1  # width of the assembled cache
        group_kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # row -> its group's (1, h, n, d)
        for g in plan.groups:
            ids = torch.tensor([list(g.tokens)], dtype=torch.long, device=self.device)
            kv = self._decoder_kv(ids, None if adapters is None else adapters.select([g.rows[0]]))
            if kv is None:
                return None
            for r in g.rows:
                group_kv[r] = kv
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []

        def place(r: int, layer_kv: list[tuple[torch.Tensor, torch.Tensor]], j: int) -> None:
            """Row r's positions 0..len-2 are the last ones of ``layer_kv``'s row j: right-align them."""
            n = lengths[r] - 1
            if not keys:
                keys.extend(k.new_zeros((b, k.shape[1], P, k.shape[3])) for k, _ in layer_kv)
                values.extend(v.new_zeros((b, v.shape[1], P, v.shape[3])) for _, v in layer_kv)
            if n == 0:
                return
            for layer, (k, v) in enumerate(layer_kv):
                keys[layer][r, :, P - n:] = k[j, :, k.shape[2] - n:]
                values[layer][r, :, P - n:] = v[j, :, v.shape[2] - n:]

        for r in range(b):
            if plan.body(r) == 0 and lengths[r] > 1:  # the prefix is all of the row but its last token
                place(r, group_kv[r], 0)
        for rows in plan.buckets:
            T = max(plan.body(r) for r in rows)
            cached = [max(0, lengths[r] - 1 - T) for r in rows]  # <= covered[r], since body(r) <= T
            Pk = max(cached)
            past = DynamicCache()
            if Pk:
                n_layers = len(next(iter(group_kv.values())))
                for layer in range(n_layers):
                    k0, v0 = group_kv[next(r for r, c in zip(rows, cached, strict=True) if c)][layer]
                    kb = k0.new_zeros((len(rows), k0.shape[1], Pk, k0.shape[3]))
                    vb = v0.new_zeros((len(rows), v0.shape[1], Pk, v0.shape[3]))
                    for j, (r, c) in enumerate(zip(rows, cached, strict=True)):
                        if c:
                            kb[j, :, Pk - c:] = group_kv[r][layer][0][0, :, :c]
                            vb[j, :, Pk - c:] = group_kv[r][layer][1][0, :, :c]
                    past.update(kb, vb, layer)
            ids, in_mask = left_pad([seqs[r][c:lengths[r] - 1] for r, c in zip(rows, cached, strict=True)],
                                    self.pad_id, self.device)
            pmask = torch.zeros((len(rows), Pk), dtype=in_mask.dtype, device=in_mask.device)
            for j, c in enumerate(cached):
                pmask[j, Pk - c:] = 1
            mask = torch.cat([pmask, in_mask], dim=1)  # (n, Pk + T): left padding only
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, Pk:]
            layer_kv = self._decoder_kv(ids, None if adapters is None else adapters.select(rows), mask, pos, past)
            if layer_kv is None:
                return None
            for j, r in enumerate(rows):
                place(r, layer_kv, j)
        cache = DynamicCache()
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            cache.update(k, v, layer)
        mask = torch.zeros((b, P + 1), dtype=torch.long, device=self.device)
        for r, n in enumerate(lengths):
            mask[r, P + 1 - n:] = 1
        return cache, mask

    def _decoder_kv(self, ids: torch.Tensor, adapters: AdapterBatch | None, mask=None, pos=None,
                    past=None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Run the decoder on ``ids`` (n, T) after ``past`` (a config-less `DynamicCache`: every layer full,
        sliding windows come from the mask) with the rows' ``adapters``. Returns each layer's keys and values
        (n, h_kv, P + T, d), or None if the model's cache is not made of full `DynamicLayer`s."""
        from transformers import DynamicCache

        past = past if past is not None else DynamicCache()
        n_before = past.get_seq_length()
        decoder = self.model.get_decoder()
        with adapters_in_scope(adapters):
            decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **with_cache(decoder, past))
        if not _full_layers(past, n_before + ids.shape[1]):
            return None
        return [(layer.keys, layer.values) for layer in past.layers]

    # ------------------------------------------------------------------ decode
    @staticmethod
    def pick(logits: torch.Tensor, temps: torch.Tensor, top_ps: torch.Tensor, gen: torch.Generator,
             logprobs: bool = True) -> tuple[list[int], list[float]]:
        return pick_tokens(logits, temps, top_ps, gen, logprobs)

    def step(self, tokens: torch.Tensor, adapters: AdapterBatch | None) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        with adapters_in_scope(adapters):
            logits = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_pos[:, None],
                                use_cache=True, **with_cache(self.model, self.cache)).logits[:, -1, :]
        self.next_pos = self.next_pos + 1
        return logits

    def select_rows(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.mask = self.mask.index_select(0, keep)
        self.next_pos = self.next_pos.index_select(0, keep)


def _full_layers(cache, n: int) -> bool:
    """Whether every layer of ``cache`` is a plain `DynamicLayer` holding all ``n`` positions."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer and layer.keys.shape[2] == n for layer in cache.layers)
