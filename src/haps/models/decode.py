"""`LeanDecode`: the fast decode engine for the families it knows (Llama, Gemma 3), implementing
`haps.models.engine.DecodeEngine`.

It keeps a static cache (`StaticKVCache`: per-row buffers, no `torch.cat` growth per step, plus prefixes
shared by groups of rows and stored once, `haps.models.attention`), a padding mask kept as one
preallocated additive row per sequence (no mask building per step) and the last-token head only. Prefill
executes a `PrefillPlan` as blocks of tokens written straight into the buffers (`prefill_block`: shared
prefixes once at batch 1, then each length bucket attending over its prefix's single copy), the rows'
last tokens as the first decode step; each decode step runs every decoder layer through
`haps.models.layer_step` (the layer's own submodules on token rows, skinny-matmul friendly projections,
the batch's adapters passed to the LoRA wrappers). Its output is the final-normed hidden states (b, d),
so that an all-greedy batch never materialises (b, V) logits (`haps.models.picking.greedy_pick`).

Models it does not support (other families, layer features the steps do not model) use
`haps.models.hf_decode.HFDecode`, the reference.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from haps.models.adapters import AdapterBatch
from haps.models.attention import BlockPlan, SharedPrefix, StepMask
from haps.models.engine import PrefillPlan
from haps.models.layer_step import LAYER_STEPS, step_supported
from haps.models.padding import left_pad
from haps.models.picking import GREEDY_PICK_MIN_ROWS, greedy_pick, head_logits, pick_tokens, streamed_head

# model_type -> how the rotary embedding is called: "plain" rotary_emb(x, pos) or "per_type"
# rotary_emb(x, pos, layer_type) (one (cos, sin) per attention type, e.g. Gemma 3 local/global).
LEAN_FAMILIES = {"llama": "plain", "gemma3_text": "per_type"}


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
    # a group's prefix keeps one copy of its keys/values (`StaticKVCache.shared`), attended in two parts
    shares_prefixes = True
    # with capture_layer: the states entering that layer, per prompt and fed token
    captures_states = True

    def __init__(self, model: nn.Module, max_new_tokens: int, pad_id: int = 0, capture_layer: int | None = None) -> None:
        """``capture_layer``: keep the hidden states entering that decoder layer, for every prompt token
        (`prompt_states`, after `prefill`) and every token a step feeds (`step_states`, after `step`)."""
        self.model = model
        self.cfg = model.config
        self.decoder = model.get_decoder()
        self.layers = list(self.decoder.layers[: self.cfg.num_hidden_layers])
        self.rope_kind = LEAN_FAMILIES[self.cfg.model_type]
        self.layer_step = LAYER_STEPS[self.cfg.model_type]
        self.layer_types = list(getattr(self.cfg, "layer_types", None) or ["full_attention"] * len(self.layers))
        self.window = getattr(self.cfg, "sliding_window", None)
        self.softcap = getattr(self.cfg, "final_logit_softcapping", None)
        self.max_new = max_new_tokens
        self.pad_id = pad_id  # fills padded positions (masked: any id gives the same result)
        self.inlined_prefixes = 0  # shared prefixes the last `start` copied into their rows
        self.cache: StaticKVCache | None = None
        self.pad_add: torch.Tensor | None = None  # (b, S): 0 where a key is a real token, finfo.min where padding
        self.next_pos: torch.Tensor | None = None  # (b,)
        self.capture_layer = capture_layer
        self.prompt_states: list[torch.Tensor] = []  # per row (prompt length, d), after prefill
        self.step_states: torch.Tensor | None = None  # (b, d) of the last step's tokens

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """A family whose layers `haps.models.layer_step` models exactly, with SDPA/eager attention."""
        cfg = model.config
        return (cfg.model_type in LEAN_FAMILIES and getattr(cfg, "_attn_implementation", "eager") in ("sdpa", "eager")
                and not getattr(cfg, "use_bidirectional_attention", False)
                and hasattr(model.get_decoder(), "rotary_emb") and step_supported(model))

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    # ------------------------------------------------------------------ prefill
    def prefill(self, plan: PrefillPlan, adapters: AdapterBatch | None) -> torch.Tensor:
        """Every prompt of ``plan`` -> the final-normed hidden states (b, d) for each row's next token.

        Plain: every token but the last as one left-padded `prefill_block`. Otherwise each group's prefix runs
        once (batch 1, its rows' adapter) into one `SharedPrefix`; the row buffers hold only what follows each
        row's prefix, right-aligned, and each bucket is a left-padded `prefill_block` over its rows that attends
        over its prefix's copy. Then the last tokens run as the first decode step (`start`).
        """
        seqs, lengths, b, dev = plan.seqs, plan.lengths, len(plan.seqs), self.device
        parts: list[list[torch.Tensor]] = [[] for _ in range(b)]  # captured states, per row in prompt order
        if plan.plain:
            ids, mask = left_pad(seqs, self.pad_id, dev)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, L)
            cache = self.open_cache(b, ids.shape[1] - 1)
            if ids.shape[1] > 1:
                self._block(cache, list(range(b)), ids[:, :-1], mask[:, :-1].bool(), pos[:, :-1], 0, adapters, parts)
            return self._start_prompt(cache, ids[:, -1], mask, pos[:, -1], adapters, parts)
        width = max(plan.body(r) for r in range(b))
        cache = self.open_cache(b, width)
        cache.shared = [self._shared_prefix(g, None if adapters is None else adapters.select([g.rows[0]]), parts)
                        for g in plan.groups]
        for rows in plan.buckets:
            T = max(plan.body(r) for r in rows)
            ids, valid = left_pad([seqs[r][plan.covered[r]:lengths[r] - 1] for r in rows], self.pad_id, dev)
            offset = torch.tensor([plan.covered[r] - (T - plan.body(r)) for r in rows], device=dev)
            pos = (offset[:, None] + torch.arange(T, device=dev)[None]).clamp(min=0)  # (n, T) absolute
            self._block(cache, rows, ids, valid.bool(), pos, width - T,
                        None if adapters is None else adapters.select(rows), parts)
        last = torch.tensor([s[-1] for s in seqs], dtype=torch.long, device=dev)  # (b,)
        mask = torch.zeros((b, width + 1), dtype=torch.long, device=dev)
        for r in range(b):
            mask[r, width - plan.body(r):] = 1  # the row's own positions, then its last token
        pos = torch.tensor([n - 1 for n in lengths], dtype=torch.long, device=dev)
        return self._start_prompt(cache, last, mask, pos, adapters, parts)

    def _block(self, cache: StaticKVCache, rows: list[int], ids, valid, pos, start: int, adapters,
               parts: list[list[torch.Tensor]]) -> None:
        """`prefill_block` over batch rows ``rows``; captured states of their valid tokens go to ``parts``."""
        cap: list[torch.Tensor] | None = [] if self.capture_layer is not None else None
        self.prefill_block(cache, torch.tensor(rows, device=self.device), ids, valid, pos, start, adapters, cap)
        if cap:
            h = cap[0].view(len(rows), ids.shape[1], -1)  # (n, T, d)
            for j, r in enumerate(rows):
                parts[r].append(h[j][valid[j]])

    def _start_prompt(self, cache, last, mask, pos, adapters, parts: list[list[torch.Tensor]]) -> torch.Tensor:
        """`start` (the prompts' last tokens), then each row's captured prompt states in `prompt_states`."""
        out = self.start(cache, last, mask, pos, adapters)
        if self.capture_layer is not None:
            self.prompt_states = [torch.cat([*p, self.step_states[r:r + 1]]) for r, p in enumerate(parts)]
        return out

    def _shared_prefix(self, group, adapters: AdapterBatch | None, parts: list[list[torch.Tensor]]) -> SharedPrefix:
        """One group's prefix run at batch 1 with its rows' adapter, as a `SharedPrefix` of its rows (captured
        states go to each of its rows in ``parts``)."""
        n = group.length
        ids = torch.tensor([list(group.tokens)], dtype=torch.long, device=self.device)
        cache = self.open_cache(1, n)
        cap: list[torch.Tensor] | None = [] if self.capture_layer is not None else None
        self.prefill_block(cache, torch.zeros(1, dtype=torch.long, device=self.device), ids,
                           torch.ones_like(ids, dtype=torch.bool), torch.arange(n, device=self.device)[None], 0,
                           adapters, cap)
        for r in group.rows if cap else ():
            parts[r].append(cap[0])
        return SharedPrefix(rows=torch.tensor(group.rows, device=self.device), keys=[k[:, :, :n] for k in cache.keys],
                            values=[v[:, :, :n] for v in cache.values])

    def open_cache(self, b: int, width: int) -> StaticKVCache:
        """Empty static buffers for b rows whose first ``width`` positions prefill blocks fill in place.

        Keys/values per layer: (b, h_kv, width + 1 + max_new, d), zeros, in the head's dtype and device; the
        cache's length is ``width``. `start` then runs each row's last prompt token on top of it.
        """
        like = self.model.get_output_embeddings().weight
        cfg = self.cfg
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (b, cfg.num_key_value_heads, width + 1 + self.max_new, hd)
        keys = [like.new_zeros(shape) for _ in self.layers]
        values = [like.new_zeros(shape) for _ in self.layers]
        return StaticKVCache(keys, values, width)

    def prefill_block(self, cache: StaticKVCache, rows: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
                      pos: torch.Tensor, start: int, adapters: AdapterBatch | None,
                      capture: list[torch.Tensor] | None = None) -> None:
        """Runs a block of T tokens for each of ``cache`` rows ``rows`` (n,) and writes their keys/values at cache
        positions [start, start + T): ids, pos (n, T), left-padded where ``valid`` (n, T, bool) is False;
        ``adapters``: those n rows' (or None). Each token attends over its row's shared prefix
        (``cache.shared``) and the block's earlier tokens, so a block never copies a prefix. ``capture`` gets
        the token rows (n * T, d) entering ``capture_layer``.
        """
        if adapters is not None and adapters.rows != rows.numel():
            from haps.errors import ShapeError

            raise ShapeError(f"prefill_block: {rows.numel()} rows but adapters for {adapters.rows}; pass "
                             "adapters.select(rows).")
        h = self.decoder.embed_tokens(ids)  # (n, T, d)
        plans = self._block_plans(cache, rows, valid, pos, start)
        last = {t: dataclasses.replace(p, keys_only=True) for t, p in plans.items()}  # the last layer's plans
        self._run_layers(h.reshape(-1, h.shape[-1]), self._rotary(h, pos), plans, cache, adapters, last, capture)

    def _rotary(self, h: torch.Tensor, pos: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per attention type, (cos, sin) as token rows (N, hd) for states h (n, T, d) at positions pos (n, T)."""
        if self.rope_kind == "plain":
            pe = self.decoder.rotary_emb(h, pos)
            pes = {t: pe for t in set(self.layer_types)}
        else:
            pes = {t: self.decoder.rotary_emb(h, pos, t) for t in set(self.layer_types)}
        return {t: (cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])) for t, (cos, sin) in pes.items()}

    def _run_layers(self, h: torch.Tensor, pes: dict, plans: dict, cache: StaticKVCache,
                    adapters: AdapterBatch | None, last_plans: dict | None = None,
                    capture: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Every decoder layer on token rows h (N, d), each with its attention type's rotary and plan (the last
        layer with ``last_plans`` where given) -> (N, d); ``capture`` gets the rows entering ``capture_layer``."""
        final = len(self.layers) - 1
        for li, (layer, lt) in enumerate(zip(self.layers, self.layer_types, strict=True)):
            if capture is not None and li == self.capture_layer:
                capture.append(h)
            cos, sin = pes[lt]
            plan = last_plans[lt] if last_plans is not None and li == final else plans[lt]
            h = self.layer_step(layer, h, cos, sin, plan, cache, li, adapters)
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

    def start(self, cache: StaticKVCache, last: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
              adapters: AdapterBatch | None) -> torch.Tensor:
        """Prefill's last stage as a decode step: ``last`` (b,) tokens at positions ``pos`` (b,) after the
        ``cache.length`` positions filled in ``cache`` (from `open_cache`); ``mask`` (b, length + 1) marks real
        tokens (1), the new one included. Returns the final-normed hidden states (b, d) for the next token."""
        self._arm(cache, mask, pos.clone())
        out = self.step(last, adapters)
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

    def _masks(self, n: int) -> dict[str, StepMask]:
        """Per attention type, the masks of a step whose query sits at cache index n-1 (`StepMask`).

        Full attention reads all n own positions and every shared prefix. A sliding window of w reads the
        last w own positions (rows are right-aligned, so that is the same slice for every row), and of a
        shared prefix only the keys some row of its group still sees, masking the rest per row.
        """
        full = self.pad_add[:, None, None, :n]
        shared = [(p, 0, None) for p in self.cache.shared]
        out = {"full_attention": StepMask(full, shared)}
        if "sliding_attention" in self.layer_types:
            w = self.window
            if w is None or (n <= w and all(p.length + n <= w for p in self.cache.shared)):
                out["sliding_attention"] = out["full_attention"]
            else:
                out["sliding_attention"] = StepMask(full[..., max(0, n - w):], self._window_shared(w))
        return out

    def _window_shared(self, w: int) -> list[tuple[SharedPrefix, int, torch.Tensor | None]]:
        """The shared-prefix keys a sliding window of w still shows to this step's tokens."""
        out = []
        for p in self.cache.shared:
            part = _prefix_in_window(p, self.next_pos.index_select(0, p.rows)[:, None], w)
            if part is not None:
                out.append((p, *part))
        return out

    def step(self, tokens: torch.Tensor, adapters: AdapterBatch | None) -> torch.Tensor:
        """tokens (b,) at each row's next position -> the final-normed hidden states (b, d) after them."""
        cache = self.cache
        n = cache.length + 1  # keys visible to the new token
        pos = self.next_pos[:, None]  # (b, 1)
        h = self.decoder.embed_tokens(tokens[:, None])  # (b, 1, d)
        cap: list[torch.Tensor] | None = [] if self.capture_layer is not None else None
        h = self._run_layers(h[:, 0], self._rotary(h, pos), self._masks(n), cache, adapters, capture=cap)  # (b, d)
        self.step_states = cap[0] if cap else None
        cache.advance(1)
        self.next_pos = self.next_pos + 1
        return self.decoder.norm(h)  # (b, d)

    def pick(self, hidden: torch.Tensor, temps: torch.Tensor, top_ps: torch.Tensor, gen: torch.Generator,
             logprobs: bool = True) -> tuple[list[int], list[float]]:
        """Next tokens from final-normed hidden states (b, d): `greedy_pick` when every row is greedy and there
        are enough rows (CPU, plain bias-free head), else `pick_tokens` on the full logits."""
        head = self.model.get_output_embeddings()
        if hidden.shape[0] >= GREEDY_PICK_MIN_ROWS and bool((temps <= 0).all()) and streamed_head(head, hidden):
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
