"""Decode engines for `LocalModel`: the generic transformers path (reference) and a lean fast path.

Both engines expose the same four calls used by the decode loop in `LocalModel._generate_batch`::

    out = engine.prefill(ids, mask, pos, past)  # ids, pos: (b, T); mask: (b, P + T) over the past
                                                # (a DynamicCache of P positions, or None) and ids
    out = engine.step(tokens)                   # tokens: (b,) -> the output for the next position
    tokens, logprobs = engine.pick(out, temps, top_ps, gen, lp)  # out (or out[rows]) -> next tokens
                                                                   # (log-probs 0.0 unless lp)
    engine.select_rows(keep)                    # keep: (b',) indices of rows that stay in the batch

``out`` is engine-specific: `HFDecode` returns logits (b, V); `LeanDecode` returns the final-normed
hidden states (b, d), so that an all-greedy batch never materialises (b, V) logits (`greedy_pick`).

`HFDecode` runs the model's own forward with a `DynamicCache` (any causal LM). `LeanDecode` keeps a
static cache (per-row buffers, no `torch.cat` growth per step, plus prefixes shared by groups of rows and
stored once, `haps.models.attention`), a padding mask kept as one preallocated additive row per sequence
(no mask building per step) and the last-token head only. Its prefill runs as blocks of tokens written
straight into the buffers (`prefill_block`) and each decode step runs every decoder layer through
`haps.models.layer_step` (the layer's own submodules on token rows, skinny-matmul friendly projections,
the per-request LoRA wrappers' adapters included); for layers that module does not model it uses the
decoder's and the layers' own forwards. It supports the families whose layer signature it knows
(`LEAN_FAMILIES`); other models use `HFDecode`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from haps.models.attention import BlockPlan, SharedPrefix, StepMask
from haps.models.layer_step import LAYER_STEPS, pad_rows, step_supported

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
    if _streamed_head(head, h):
        b = h.shape[0]
        W, ht = head.weight, pad_rows(h, HEAD_MIN_ROWS).t()
        out = h.new_empty((b, W.shape[0]))
        for i in range(0, W.shape[0], chunk):
            out[:, i:i + chunk].copy_(torch.mm(W[i:i + chunk], ht)[:, :b].t())
        return out
    return head(h)


# one row: MKL's matrix-vector path streams a large weight slower than a 2-column product (SmolLM2's 49k x 576
# head: 8.7 vs 5.9 ms; Gemma 3's 262k x 640: 46 vs 30 ms), so a lone row is computed as two columns
HEAD_MIN_ROWS = 2


def _streamed_head(head: nn.Module, h: torch.Tensor) -> bool:
    """Whether `head_logits` / `greedy_pick` compute ``head`` themselves: a plain bias-free ``nn.Linear`` on
    CPU, hidden states (b, d)."""
    return type(head) is nn.Linear and head.bias is None and h.dim() == 2 and h.device.type == "cpu"


def pick_tokens(logits: torch.Tensor, temps: torch.Tensor, top_ps: torch.Tensor, gen: torch.Generator,
                logprobs: bool = True) -> tuple[list[int], list[float]]:
    """Next token per row (greedy where temperature is 0, else nucleus sampling) and its log-prob at
    temperature 1 (0.0 without ``logprobs``). logits: (b, V); temps, top_ps: (b,)."""
    logits = logits.float()
    choice = logits.argmax(dim=-1)  # (b,)
    sampled = (temps > 0).nonzero().flatten()
    if sampled.numel():
        sl = logits.index_select(0, sampled.to(logits.device)) / temps[sampled].to(logits.device)[:, None]
        probs = torch.softmax(sl, dim=-1)  # (s, V)
        sp, si = probs.sort(dim=-1, descending=True)
        cum = sp.cumsum(-1)
        drop = (cum - sp) > top_ps[sampled].to(logits.device)[:, None]  # keep the smallest nucleus
        sp = sp.masked_fill(drop, 0.0)
        k = torch.multinomial(sp.cpu(), 1, generator=gen).to(logits.device)  # (s, 1)
        choice[sampled.to(logits.device)] = si.gather(1, k).squeeze(1)
    if not logprobs:
        return choice.tolist(), [0.0] * logits.shape[0]
    lp = logits.gather(1, choice[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    return choice.tolist(), lp.tolist()


# Below this many rows the whole-logits pick is as fast or faster (measured on the 2-core CPU: Gemma 3's head
# 31 vs 34 ms at b=2, 62 vs 59 at b=8, 142 vs 110 at b=32; SmolLM2's 44 vs 34 ms at b=64).
GREEDY_PICK_MIN_ROWS = 8


def greedy_pick(head: nn.Linear, h: torch.Tensor, softcap: float | None = None, chunk: int = 4096,
                logprobs: bool = True) -> tuple[list[int], list[float]]:
    """`pick_tokens` for an all-greedy batch, straight from hidden states h: (b, d), for a bias-free head.

    Runs ``W @ h^T`` over slices of ``chunk`` vocabulary rows and keeps, per row, the running maximum, its
    first index and an online log-sum-exp, while each slice is in cache: no (b, V) logits are written or
    read back. The logits are the same dot products as `head_logits` (same slices), so the argmax (first
    of equal maxima, as ``argmax``) is the same token; the log-prob differs from ``logsumexp`` over the
    whole row only by float rounding. Without ``logprobs`` only the running maximum is kept (log-probs 0.0).
    """
    b = h.shape[0]
    W, ht = head.weight, pad_rows(h, HEAD_MIN_ROWS).t()  # (d, m): m >= b, zero columns past b
    m_rows = ht.shape[1]
    best = h.new_full((m_rows,), float("-inf"), dtype=torch.float32)
    arg = torch.zeros(m_rows, dtype=torch.long, device=h.device)
    total = h.new_zeros((m_rows,), dtype=torch.float32)  # sum of exp(logit - best)
    for i in range(0, W.shape[0], chunk):
        z = torch.mm(W[i:i + chunk], ht)  # (c, b), soft-capped in the model's dtype as `LeanDecode` does
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        z = z.float()
        m, a = z.max(dim=0)  # (b,): first maximum in the slice
        top = torch.maximum(best, m)
        if logprobs:
            total = total * torch.exp(best - top) + torch.exp(z - top).sum(dim=0)
        arg = torch.where(m > best, a + i, arg)  # strictly greater: an earlier slice wins ties
        best = top
    if not logprobs:
        return arg[:b].tolist(), [0.0] * b
    lp = -torch.log(total[:b])  # best - (best + log total)
    return arg[:b].tolist(), lp.tolist()


def _module_step(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: StepMask,
                 cache, layer_idx: int) -> torch.Tensor:
    """One token through the layer module's own forward (for layers `haps.models.layer_step` does not model):
    it attends over every cache position, so ``mask.rows`` covers them all and there are no shared prefixes."""
    return layer(h[:, None], attention_mask=mask.rows, position_embeddings=(cos[:, None], sin[:, None]),
                 past_key_values=cache)[:, 0]


class HFDecode:
    """Reference engine: the model's forward and a transformers DynamicCache, every step."""

    compacts_in_place = False  # select_rows copies the whole cache

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

    @staticmethod
    def pick(logits: torch.Tensor, temps: torch.Tensor, top_ps: torch.Tensor, gen: torch.Generator,
             logprobs: bool = True) -> tuple[list[int], list[float]]:
        return pick_tokens(logits, temps, top_ps, gen, logprobs)

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
    """Per-layer K and V buffers of shape (b, h_kv, S, d), filled up to ``length`` positions, plus prefixes
    shared by groups of rows (`SharedPrefix`, stored once) that come before those positions.

    Implements the one cache call transformers attention layers make, ``update(k, v, layer_idx)``:
    it writes the T new positions at ``length`` and returns views of positions ``[0, length + T)``.
    `advance(T)` moves ``length`` once all layers have written their T positions.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int,
                 shared: list[SharedPrefix] | None = None) -> None:
        self.keys, self.values, self.length = keys, values, length
        self.shared: list[SharedPrefix] = shared or []

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

    def write_rows(self, rows: torch.Tensor, start: int, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> None:
        """Writes k, v: (n, h_kv, T, d) to rows ``rows`` (n,), positions [start, start + T) (a prefill block)."""
        T = k.shape[2]
        self.keys[layer_idx][:, :, start:start + T].index_copy_(0, rows, k)
        self.values[layer_idx][:, :, start:start + T].index_copy_(0, rows, v)

    def select_rows(self, keep: torch.Tensor) -> None:
        """Row j becomes old row ``keep[j]``. When every ``keep[j] >= j`` (finished rows replaced by live rows
        from the end, as the decode loop does), rows move within the buffers: only moved rows are copied, and
        only their filled positions. Any other order is gathered into new buffers."""
        n, order = self.length, keep.tolist()
        in_place = all(src >= j for j, src in enumerate(order))
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                if in_place:  # safe in this order: a source row keep[j] >= j is never an earlier destination
                    for j, src in enumerate(order):
                        if src != j:
                            buf[j, :, :n].copy_(buf[src, :, :n])
                    store[i] = buf[: len(order)]
                else:
                    new = buf.new_zeros((len(order), *buf.shape[1:]))
                    new[:, :, :n] = buf[:, :, :n].index_select(0, keep)
                    store[i] = new
        new_row = {src: j for j, src in enumerate(order)}
        shared = []
        for p in self.shared:
            rows = [new_row[r] for r in p.rows.tolist() if r in new_row]
            if rows:
                shared.append(dataclasses.replace(p, rows=torch.tensor(rows, device=p.rows.device)))
        self.shared = shared


# A shared prefix is kept apart (two-part attention) only if it spares reading at least this many bytes of
# keys/values per layer and step; smaller ones are copied into their rows (`LeanDecode._inline_small_prefixes`).
CASCADE_MIN_BYTES = 2 << 20


def _prefix_in_window(p: SharedPrefix, qpos: torch.Tensor, w: int) -> tuple[int, torch.Tensor | None] | None:
    """What a sliding window of w shows of shared prefix ``p`` to tokens at absolute positions qpos (n_g, T):
    the keys at positions > qpos - w. Returns None when it shows no key, else (lo, mask): read keys [lo, L),
    masked per token by ``mask`` (n_g, 1, T, L - lo, additive), or unmasked (None) when each token sees them all."""
    first = qpos - (w - 1)  # first visible position per token
    lo = max(0, int(first.min()))
    if lo >= p.length:
        return None
    hidden = torch.arange(lo, p.length, device=qpos.device)[None, None, :] < first[:, :, None]  # (n_g, T, L - lo)
    if not bool(hidden.any()):
        return lo, None
    dtype = p.keys[0].dtype
    mask = torch.zeros(hidden.shape, dtype=dtype, device=qpos.device).masked_fill_(hidden, torch.finfo(dtype).min)
    return lo, mask[:, None]


class LeanDecode:
    """Fast engine for known families: static KV cache, direct decoder-layer calls, last-token head.

    Exactness (up to float rounding): prefill blocks and decode steps run the same modules on the same inputs
    as the reference forward, with keys/values read from buffers (and shared prefixes) instead of a
    concatenated tensor, and additive masks of 0 / finfo.min (what the reference's masks mean).
    Sliding-window layers see the same keys: steps read only the window's positions, blocks mask the
    older ones. Tests compare every path with the transformers forward on tiny Llama and Gemma 3 models.
    """

    # finished rows leave the batch cheaply (`StaticKVCache.select_rows` moves only the rows that fill holes)
    compacts_in_place = True

    def __init__(self, model: nn.Module, max_new_tokens: int) -> None:
        self.model = model
        self.cfg = model.config
        self.decoder = model.get_decoder()
        self.layers = list(self.decoder.layers[: self.cfg.num_hidden_layers])
        self.rope_kind = LEAN_FAMILIES[self.cfg.model_type]
        # own layer steps read only the positions a sliding window sees and take shared prefixes
        self.own_steps = step_supported(model)
        self.layer_step = LAYER_STEPS[self.cfg.model_type] if self.own_steps else _module_step
        self.layer_types = list(getattr(self.cfg, "layer_types", None) or ["full_attention"] * len(self.layers))
        self.window = getattr(self.cfg, "sliding_window", None)
        self.softcap = getattr(self.cfg, "final_logit_softcapping", None)
        self.max_new = max_new_tokens
        self.inlined_prefixes = 0  # shared prefixes the last `start` copied into their rows
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
        """Prompt ids, pos (b, T), left-padded where ``mask`` (b, T) is 0 -> the final-normed hidden states (b, d)
        of the last position. With the own layer steps and no ``past``: every token but the last as one
        `prefill_block` straight into the static buffers, the last as the first decode step; otherwise the
        decoder's own forward with a DynamicCache (``past``: one over earlier positions) copied into them."""
        from transformers import DynamicCache

        if past is None and self.shares_prefixes and ids.shape[1] > 1:
            b, T = ids.shape
            cache = self.open_cache(b, T - 1, self.model.get_output_embeddings().weight)
            self.prefill_block(cache, torch.arange(b, device=ids.device), ids[:, :-1], mask[:, :-1].bool(),
                               pos[:, :-1], 0)
            return self.start(cache, ids[:, -1], mask, pos[:, -1])
        dyn = past if past is not None else DynamicCache(config=self.cfg)
        hidden = self.decoder(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=dyn,
                              use_cache=True).last_hidden_state  # (b, T, d), after the final norm
        last = hidden[:, -1].contiguous()  # (b, d); a copy, so the (b, T, d) states can be freed
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
        self._arm(StaticKVCache(keys, values, L), mask, pos[:, -1] + 1)
        return last

    def open_cache(self, b: int, width: int, like: torch.Tensor) -> StaticKVCache:
        """Empty static buffers for b rows whose first ``width`` positions the caller fills in place.

        Keys/values per layer: (b, h_kv, width + 1 + max_new, d), zeros, dtype and device of ``like``; the
        cache's length is ``width``. `start` then runs each row's last prompt token on top of it.
        """
        cfg = self.cfg
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (b, cfg.num_key_value_heads, width + 1 + self.max_new, hd)
        keys = [like.new_zeros(shape) for _ in self.layers]
        values = [like.new_zeros(shape) for _ in self.layers]
        return StaticKVCache(keys, values, width)

    def prefill_block(self, cache: StaticKVCache, rows: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
                      pos: torch.Tensor, start: int) -> None:
        """Runs a block of T tokens for each of ``cache`` rows ``rows`` (n,) and writes their keys/values at cache
        positions [start, start + T): ids, pos (n, T), left-padded where ``valid`` (n, T, bool) is False. Each
        token attends over its row's shared prefix (``cache.shared``) and the block's earlier tokens, so a
        block never copies a prefix. The LoRA wrappers must hold the n rows' adapters. Needs `shares_prefixes`.
        """
        h = self.decoder.embed_tokens(ids)  # (n, T, d)
        plans = self._block_plans(cache, rows, valid, pos, start)
        last = {t: dataclasses.replace(p, keys_only=True) for t, p in plans.items()}  # the last layer's plans
        self._run_layers(h.reshape(-1, h.shape[-1]), self._rotary(h, pos), plans, cache, last)

    def _rotary(self, h: torch.Tensor, pos: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per attention type, (cos, sin) as token rows (N, hd) for states h (n, T, d) at positions pos (n, T)."""
        if self.rope_kind == "plain":
            pe = self.decoder.rotary_emb(h, pos)
            pes = {t: pe for t in set(self.layer_types)}
        else:
            pes = {t: self.decoder.rotary_emb(h, pos, t) for t in set(self.layer_types)}
        return {t: (cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])) for t, (cos, sin) in pes.items()}

    def _run_layers(self, h: torch.Tensor, pes: dict, plans: dict, cache: StaticKVCache,
                    last_plans: dict | None = None) -> torch.Tensor:
        """Every decoder layer on token rows h (N, d), each with its attention type's rotary and plan (the last
        layer with ``last_plans`` where given) -> (N, d)."""
        final = len(self.layers) - 1
        for li, (layer, lt) in enumerate(zip(self.layers, self.layer_types, strict=True)):
            cos, sin = pes[lt]
            plan = last_plans[lt] if last_plans is not None and li == final else plans[lt]
            h = self.layer_step(layer, h, cos, sin, plan, cache, li)
        return h

    def _block_plans(self, cache: StaticKVCache, rows: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor,
                     start: int) -> dict[str, BlockPlan]:
        """Per attention type, the `BlockPlan` of a prefill block (see `prefill_block`)."""
        n, T = valid.shape
        dtype = cache.keys[0].dtype
        lowest = torch.finfo(dtype).min
        causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
        seen = causal[None] & valid[:, None, :]  # (n, T, T): query t sees key s
        seen |= torch.eye(T, dtype=torch.bool, device=valid.device)[None]  # padding queries see themselves
        # real tokens' positions; a padding slot borrows its row's first real position (never lowers a window)
        first_real = torch.where(valid, pos, pos.new_full(pos.shape, 2**62)).amin(dim=1, keepdim=True)
        qpos = torch.where(valid, pos, first_real)  # (n, T)
        members = {r: i for i, r in enumerate(rows.tolist())}
        out = {}
        for t in sorted(set(self.layer_types)):  # a fixed order
            w = self.window if t == "sliding_attention" else None
            sees = seen if w is None else seen & ((qpos[:, :, None] - qpos[:, None, :]) < w)
            own = torch.zeros((n, 1, T, T), dtype=dtype, device=valid.device).masked_fill_(~sees[:, None], lowest)
            shared = []
            for p in cache.shared:
                idx = [members[r] for r in p.rows.tolist() if r in members]
                if not idx:
                    continue
                idx_t = torch.tensor(idx, device=valid.device)
                part = (0, None) if w is None else _prefix_in_window(p, qpos.index_select(0, idx_t), w)
                if part is not None:
                    shared.append((p, idx_t, *part))
            out[t] = BlockPlan(rows=rows, start=start, own=own, shared=shared)
        return out

    def start(self, cache: StaticKVCache, last: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Prefill's last stage as a decode step: ``last`` (b,) tokens at positions ``pos`` (b,) after the
        ``cache.length`` positions filled in ``cache`` (from `open_cache`); ``mask`` (b, length + 1) marks real
        tokens (1), the new one included. Returns the final-normed hidden states (b, d) for the next token."""
        self._arm(cache, mask, pos.clone())
        out = self.step(last)
        self._inline_small_prefixes()
        return out

    def _inline_small_prefixes(self) -> None:
        """Copies each shared prefix whose two-part attention costs more than it saves into its rows' buffers,
        right before each row's own positions (where plain left padding would have it).

        Per layer and step, a shared prefix costs a fixed ~150 us of extra attention calls (measured on the
        2-core CPU: 8 groups of 4 rows with 39-token prefixes slowed a SmolLM2 step at 32 rows by 35 ms) and
        saves reading its keys/values for all but one of its rows; below `CASCADE_MIN_BYTES` saved it is
        inlined.
        """
        cache = self.cache
        if not cache.shared:
            return
        k0 = cache.keys[0]
        token_bytes = 2 * k0.shape[1] * k0.shape[3] * k0.element_size()  # keys + values, one layer
        small = [p for p in cache.shared if (p.rows.numel() - 1) * p.length * token_bytes < CASCADE_MIN_BYTES]
        self.inlined_prefixes = len(small)
        if not small:
            return
        shift, n = max(p.length for p in small), cache.length
        first = (self.pad_add[:, :n] == 0).int().argmax(dim=1).tolist()  # each row's first own position
        for store, side in ((cache.keys, "keys"), (cache.values, "values")):
            for i, buf in enumerate(store):
                new = buf.new_zeros((buf.shape[0], buf.shape[1], buf.shape[2] + shift, buf.shape[3]))
                new[:, :, shift:shift + n] = buf[:, :, :n]
                for p in small:
                    src = getattr(p, side)[i][0]  # (h_kv, L, d)
                    for r in p.rows.tolist():
                        new[r, :, shift + first[r] - p.length:shift + first[r]] = src
                store[i] = new
        pad = torch.full((self.pad_add.shape[0], self.pad_add.shape[1] + shift), torch.finfo(self.pad_add.dtype).min,
                         dtype=self.pad_add.dtype, device=self.pad_add.device)
        pad[:, shift:] = self.pad_add
        for p in small:
            for r in p.rows.tolist():
                pad[r, shift + first[r] - p.length:shift + first[r]] = 0
        self.pad_add = pad
        cache.length = n + shift
        cache.shared = [p for p in cache.shared if all(p is not q for q in small)]

    def _arm(self, cache: StaticKVCache, mask: torch.Tensor, next_pos: torch.Tensor) -> None:
        """Decode from ``cache`` next: the padding row of each sequence from ``mask`` (b, m), 1 = real token
        at cache position < m (later positions are the ones decoding writes), and its next position (b,)."""
        self.cache = cache
        dtype = cache.keys[0].dtype
        self.pad_add = torch.zeros((mask.shape[0], cache.capacity), dtype=dtype, device=mask.device)
        self.pad_add[:, : mask.shape[1]].masked_fill_(mask == 0, torch.finfo(dtype).min)
        self.next_pos = next_pos

    @property
    def shares_prefixes(self) -> bool:
        """Whether a cache from `open_cache` may hold shared prefixes (`StaticKVCache.shared`)."""
        return self.own_steps

    def _masks(self, n: int) -> dict[str, StepMask]:
        """Per attention type, the masks of a step whose query sits at cache index n-1 (`StepMask`).

        Full attention reads all n own positions and every shared prefix. A sliding window of w reads the
        last w own positions (rows are right-aligned, so that is the same slice for every row), and of a
        shared prefix only the keys some row of its group still sees, masking the rest per row. The
        layer-module fallback reads every position, older ones masked.
        """
        full = self.pad_add[:, None, None, :n]
        shared = [(p, 0, None) for p in self.cache.shared]
        out = {"full_attention": StepMask(full, shared)}
        if "sliding_attention" in self.layer_types:
            w = self.window
            if w is None or (n <= w and all(p.length + n <= w for p in self.cache.shared)):
                out["sliding_attention"] = out["full_attention"]
            elif self.own_steps:
                out["sliding_attention"] = StepMask(full[..., max(0, n - w):], self._window_shared(w))
            else:
                sl = full.clone()
                sl[..., : n - w] = torch.finfo(sl.dtype).min  # keep q_idx - kv_idx < window
                out["sliding_attention"] = StepMask(sl)
        return out

    def _window_shared(self, w: int) -> list[tuple[SharedPrefix, int, torch.Tensor | None]]:
        """The shared-prefix keys a sliding window of w still shows to this step's tokens."""
        out = []
        for p in self.cache.shared:
            part = _prefix_in_window(p, self.next_pos.index_select(0, p.rows)[:, None], w)
            if part is not None:
                out.append((p, *part))
        return out

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        n = cache.length + 1  # keys visible to the new token
        pos = self.next_pos[:, None]  # (b, 1)
        h = self.decoder.embed_tokens(tokens[:, None])  # (b, 1, d)
        h = self._run_layers(h[:, 0], self._rotary(h, pos), self._masks(n), cache)  # (b, d)
        cache.advance(1)
        self.next_pos = self.next_pos + 1
        return self.decoder.norm(h)  # (b, d)

    def pick(self, hidden: torch.Tensor, temps: torch.Tensor, top_ps: torch.Tensor, gen: torch.Generator,
             logprobs: bool = True) -> tuple[list[int], list[float]]:
        """Next tokens from final-normed hidden states (b, d): `greedy_pick` when every row is greedy and there
        are enough rows (CPU, plain bias-free head), else `pick_tokens` on the full logits."""
        head = self.model.get_output_embeddings()
        if hidden.shape[0] >= GREEDY_PICK_MIN_ROWS and bool((temps <= 0).all()) and _streamed_head(head, hidden):
            return greedy_pick(head, hidden, self.softcap, logprobs=logprobs)
        return pick_tokens(self.logits(hidden), temps, top_ps, gen, logprobs)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(b, d) final-normed hidden states -> (b, V) logits, with the model's final soft-capping."""
        logits = head_logits(self.model.get_output_embeddings(), h)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def select_rows(self, keep: torch.Tensor) -> None:
        self.cache.select_rows(keep)
        self.pad_add = self.pad_add.index_select(0, keep)
        self.next_pos = self.next_pos.index_select(0, keep)
