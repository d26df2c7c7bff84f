"""Decode-step attention over a two-level KV cache: each row's own keys plus a prefix shared by rows.

Rows of a lockstep batch mostly start with the same long prompt prefix (instructions, worked example).
`LocalModel._prefill` computes that prefix once; instead of copying its keys/values into every row's
cache, `LeanDecode` keeps one copy per group (`SharedPrefix`) and each row's buffer holds only what
follows it. A decode step then attends in two parts and merges them by their log-sum-exps (the
shared-prefix "cascade" of Hydragen and FlashInfer):

- own keys: the rows' queries (b, h_kv, g, hd) over their buffers (b, h_kv, m, hd), masked per row;
- shared keys: the group's queries as one block (1, h_kv, n_g * g, hd) over the single prefix copy
  (1, h_kv, L, hd): a read of L keys per group and step instead of per row, and a matmul-shaped problem.

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


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp: q (B, h, Lq, d), k and v (B, h, Lk, d), additive ``mask``
    broadcastable to (B, h, Lq, Lk) -> out (B, h, Lq, d), lse (B, h, Lq).

    On CPU this is the flash kernel that ``F.scaled_dot_product_attention`` itself runs there (it also
    returns the log-sum-exp); elsewhere, or where torch lacks that kernel, explicit matmuls.
    """
    if q.device.type == "cpu" and _CPU_FLASH is not None and q.dtype == k.dtype:
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
        w = torch.sigmoid(lse.index_select(0, rows) - l_p)[..., None].to(out.dtype)  # weight of the own keys
        out.index_copy_(0, rows, out.index_select(0, rows) * w + o_p * (1 - w))
    return out
