"""Decode-step attention over a two-level KV cache: each row's own keys plus a prefix shared by rows.

Rows of a lockstep batch mostly start with the same long prompt prefix (instructions, worked example).
`LocalModel._prefill` computes that prefix once; instead of copying its keys/values into every row's
cache, `LeanDecode` keeps one copy per group (`SharedPrefix`) and each row's buffer holds only what
follows it. A decode step then attends in two parts and merges them by their log-sum-exps (the
shared-prefix "cascade" of Hydragen and FlashInfer):

- own keys: the rows' queries (b, h_kv, g, hd) over their buffers (b, h_kv, m, hd), masked per row;
- shared keys: the group's queries as one block (1, h_kv, n_g * g, hd) over the single prefix copy
  (1, h_kv, L, hd): a read of L keys per group and step instead of per row, and a matmul-shaped problem.

A prefill block (T tokens per row, `BlockPlan`, `attend_block`) works the same way: the block's tokens
over themselves (causal), and each group's (n_g * g * T) queries over the prefix copy, so prefilling the
rows' bodies never copies the prefix into each row either.

Softmax over the union of both key sets is ``w * out_own + (1 - w) * out_shared`` with
``w = sigmoid(lse_own - lse_shared)``: the same attention up to float rounding. A row belongs to at most
one group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SharedPrefix:
    """Keys and values, per layer (1, h_kv, L, hd), of the first L positions of batch rows ``rows`` (n_g,)."""

    rows: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]


@dataclass
class StepMask:
    """Additive masks of one decode step, for one attention type.

    ``rows``: (b, 1, 1, m) over the last m positions of each row's own buffer (the positions the step
    reads). ``shared``: per shared prefix, (prefix, lo, mask): the step reads the prefix's keys [lo, L),
    masked per row by ``mask`` (n_g, 1, 1, L - lo), or unmasked when ``mask`` is None.
    """

    rows: torch.Tensor
    shared: list[tuple[SharedPrefix, int, torch.Tensor | None]] = field(default_factory=list)
    tokens = 1  # new tokens per row


@dataclass
class BlockPlan:
    """Attention of one prefill block: T new tokens for each of n rows of a static cache (left-padded).

    ``rows`` (n,): the cache rows; the tokens' keys/values go to cache positions [start, start + T) (rows are
    right-aligned, so the same columns for every row). ``own``: (n, 1, T, T) additive mask of the block's
    tokens over themselves (causal, padding, sliding window). ``shared``: per shared prefix that some of the
    rows follow, (prefix, idx, lo, mask): those rows' block indices idx (n_g,), the prefix keys [lo, L) they
    read, and a mask (n_g, 1, T, L - lo) or None when every token sees them all.
    """

    rows: torch.Tensor
    start: int
    own: torch.Tensor
    shared: list[tuple[SharedPrefix, torch.Tensor, int, torch.Tensor | None]] = field(default_factory=list)
    keys_only: bool = False  # the last layer: only its keys/values are needed, its output is not

    @property
    def tokens(self) -> int:
        return self.own.shape[-1]


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp: q (B, h, Lq, d), k and v (B, h, Lk, d), additive ``mask``
    broadcastable to (B, h, Lq, Lk) -> out (B, h, Lq, d), lse (B, h, Lq).

    On CPU this is the flash kernel that ``F.scaled_dot_product_attention`` itself runs there (it also
    returns the log-sum-exp); elsewhere, or where torch lacks that kernel, explicit matmuls. The kernel reads
    each vector as contiguous (``F.scaled_dot_product_attention`` checks that before calling it; here it is
    made so): a q whose last dimension has another stride gives wrong results, not an error.
    """
    if q.device.type == "cpu" and _CPU_FLASH is not None and q.dtype == k.dtype:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out, lse = _CPU_FLASH(q, k, v, attn_mask=mask, scale=scale)
        return out, lse
    return attention_with_lse_reference(q, k, v, mask, scale)


def attention_with_lse_reference(q, k, v, mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_with_lse` as explicit matmuls (any device)."""
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (B, h, Lq, Lk)
    if mask is not None:
        s = s + mask.float()
    lse = torch.logsumexp(s, dim=-1)  # (B, h, Lq)
    out = torch.matmul(torch.exp(s - lse[..., None]).to(v.dtype), v)
    return out, lse


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: StepMask, layer_idx: int,
           scale: float) -> torch.Tensor:
    """One decode step: q (b, h_kv, g, hd) (g query heads per key/value head), the rows' own keys and values
    (b, h_kv, n, hd) of which the last ``mask.rows.shape[-1]`` are read, and the shared prefixes of
    ``mask.shared`` (layer ``layer_idx``) -> (b, h_kv, g, hd)."""
    m = mask.rows.shape[-1]
    keys, values = keys[:, :, keys.shape[2] - m:], values[:, :, values.shape[2] - m:]
    if not mask.shared:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.rows, scale=scale)
    out, lse = attention_with_lse(q, keys, values, mask.rows, scale)  # (b, h_kv, g, hd), (b, h_kv, g)
    for prefix, lo, pmask in mask.shared:
        rows = prefix.rows
        qg = q.index_select(0, rows)  # (n_g, h_kv, g, hd)
        n_g, h_kv, g, hd = qg.shape
        block = qg.permute(1, 0, 2, 3).reshape(1, h_kv, n_g * g, hd)  # query (row i, head j) -> i * g + j
        if pmask is not None:  # (n_g, 1, 1, L') -> one mask row per query of the block
            pmask = pmask[:, 0].expand(n_g, g, pmask.shape[-1]).reshape(1, 1, n_g * g, -1)
        k_p = prefix.keys[layer_idx][:, :, lo:]
        v_p = prefix.values[layer_idx][:, :, lo:]
        o_p, l_p = attention_with_lse(block, k_p, v_p, pmask, scale)
        o_p = o_p.reshape(h_kv, n_g, g, hd).permute(1, 0, 2, 3)  # (n_g, h_kv, g, hd)
        l_p = l_p.reshape(h_kv, n_g, g).permute(1, 0, 2)  # (n_g, h_kv, g)
        _merge_shared(out, lse, rows, o_p, l_p)
    return out


def _merge_shared(out: torch.Tensor, lse: torch.Tensor, idx: torch.Tensor, o_p: torch.Tensor,
                  l_p: torch.Tensor) -> None:
    """Rows ``idx`` of ``out`` (own-key attention, log-sum-exp ``lse``) become attention over their own and
    their prefix's keys, given the prefix part ``o_p`` / ``l_p`` of those rows (same shapes as out[idx],
    lse[idx]); in place."""
    w = torch.sigmoid(lse.index_select(0, idx) - l_p)[..., None].to(out.dtype)  # weight of the own keys
    out.index_copy_(0, idx, out.index_select(0, idx) * w + o_p * (1 - w))


def attend_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, cache, layer_idx: int,
                 scale: float) -> torch.Tensor | None:
    """One prefill block: q (n * T, H, hd), k and v (n * T, h_kv, hd), token-major per row -> (n * T, H * hd), or
    None for a ``keys_only`` plan (nothing is attended).

    Writes k and v to the cache (``cache.write_rows``), attends each token over the block's own tokens and
    over its row's shared prefix (one query block per prefix and key/value head over the single copy), and
    merges the two by their log-sum-exps, as `attend` does for a step.
    """
    n, T = plan.rows.numel(), plan.tokens
    _, H, hd = q.shape
    h_kv = k.shape[1]
    g = H // h_kv
    q = q.reshape(n, T, H, hd).transpose(1, 2)  # (n, H, T, hd)
    k = k.reshape(n, T, h_kv, hd).transpose(1, 2)  # (n, h_kv, T, hd)
    v = v.reshape(n, T, h_kv, hd).transpose(1, 2)
    cache.write_rows(plan.rows, plan.start, k, v, layer_idx)
    if plan.keys_only:
        return None
    k_own, v_own = (k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)) if g > 1 else (k, v)
    out, lse = attention_with_lse(q, k_own, v_own, plan.own, scale)  # (n, H, T, hd), (n, H, T)
    for prefix, idx, lo, pmask in plan.shared:
        n_g = idx.numel()
        block = q.index_select(0, idx).reshape(n_g, h_kv, g, T, hd).permute(1, 0, 2, 3, 4)
        block = block.reshape(1, h_kv, n_g * g * T, hd)  # query (row i, head j, token t) -> (i * g + j) * T + t
        if pmask is not None:  # (n_g, 1, T, L') -> one mask row per query of the block
            pmask = pmask.expand(n_g, g, T, pmask.shape[-1]).reshape(1, 1, n_g * g * T, -1)
        o_p, l_p = attention_with_lse(block, prefix.keys[layer_idx][:, :, lo:], prefix.values[layer_idx][:, :, lo:],
                                      pmask, scale)
        o_p = o_p.reshape(h_kv, n_g, g, T, hd).permute(1, 0, 2, 3, 4).reshape(n_g, H, T, hd)
        l_p = l_p.reshape(h_kv, n_g, g, T).permute(1, 0, 2, 3).reshape(n_g, H, T)
        _merge_shared(out, lse, idx, o_p, l_p)
    return out.transpose(1, 2).reshape(n * T, H * hd)
