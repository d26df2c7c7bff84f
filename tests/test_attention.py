"""Two-part attention (own keys + a shared prefix stored once) equals attention over the concatenated keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from haps.models.attention import (
    BlockPlan,
    SharedPrefix,
    attend_block,
    attention_with_lse,
    attention_with_lse_reference,
)
from haps.models.decode import StaticKVCache

LOWEST = torch.finfo(torch.float32).min


def test_attention_with_lse_on_strided_queries_equals_sdpa():
    """The CPU kernel returns wrong values for a q whose last dimension is strided unless it is made contiguous."""
    torch.manual_seed(0)
    n, H, T, hd = 2, 4, 6, 16
    q = torch.randn(n, T, hd, H).permute(0, 3, 1, 2)  # (n, H, T, hd), last-dim stride H
    assert q.stride(-1) != 1
    k, v = torch.randn(n, H, T, hd), torch.randn(n, H, T, hd)
    mask = torch.zeros(n, 1, T, T).masked_fill_(~torch.ones(T, T, dtype=torch.bool).tril(), LOWEST)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    for fn in (attention_with_lse, attention_with_lse_reference):
        out, lse = fn(q, k, v, mask, 0.3)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        s = (q @ k.transpose(-1, -2)) * 0.3 + mask
        torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("window", [None, 5])
def test_block_over_a_shared_prefix_equals_the_concatenated_keys(g, window):
    """Rows 0 and 2 of a 3-row block follow a prefix of L tokens; row 1 follows none and is left-padded."""
    torch.manual_seed(1)
    n, T, L, h_kv, hd = 3, 4, 7, 2, 8
    H = h_kv * g
    q, k, v = torch.randn(n * T, H, hd), torch.randn(n * T, h_kv, hd), torch.randn(n * T, h_kv, hd)
    prefix = SharedPrefix(rows=torch.tensor([0, 2]), keys=[torch.randn(1, h_kv, L, hd)],
                          values=[torch.randn(1, h_kv, L, hd)])
    valid = torch.ones(n, T, dtype=torch.bool)
    valid[1, :2] = False
    pos = torch.tensor([[L + t for t in range(T)], [0, 0, 0, 1], [L + t for t in range(T)]])
    # reference layout per row: [prefix (or masked) | block], a mask written out from positions
    key_pos = torch.cat([torch.arange(L).expand(n, L), pos], dim=1)  # (n, L + T)
    key_ok = torch.cat([torch.tensor([[True], [False], [True]]).expand(n, L), valid], dim=1)
    sees = key_ok[:, None, :] & (key_pos[:, None, :] <= pos[:, :, None])
    sees[:, :, L:] &= torch.ones(T, T, dtype=torch.bool).tril()
    if window:
        sees &= (pos[:, :, None] - key_pos[:, None, :]) < window
    sees[:, :, L:] |= torch.eye(T, dtype=torch.bool)  # padding queries see themselves (as the plans say)
    ref_mask = torch.zeros(n, 1, T, L + T).masked_fill_(~sees[:, None], LOWEST)
    kk = k.reshape(n, T, h_kv, hd).transpose(1, 2)
    vv = v.reshape(n, T, h_kv, hd).transpose(1, 2)
    k_all = torch.cat([prefix.keys[0].expand(n, -1, -1, -1), kk], 2).repeat_interleave(g, 1)
    v_all = torch.cat([prefix.values[0].expand(n, -1, -1, -1), vv], 2).repeat_interleave(g, 1)
    want = F.scaled_dot_product_attention(q.reshape(n, T, H, hd).transpose(1, 2), k_all, v_all, attn_mask=ref_mask,
                                          scale=0.5).transpose(1, 2).reshape(n * T, H * hd)
    own = ref_mask[:, :, :, L:].clone()
    lo = 0
    pmask = ref_mask[[0, 2], :, :, :L]
    if window:  # read only keys some token still sees, as LeanDecode's plans do
        lo = int(sees[[0, 2], :, :L].any(dim=1).any(dim=0).nonzero().min())
        pmask = pmask[..., lo:]
    cache = StaticKVCache([torch.zeros(4, h_kv, T + 2, hd)], [torch.zeros(4, h_kv, T + 2, hd)], 0)
    rows = torch.tensor([0, 3, 2])  # cache rows of the block's rows (row 1 of the block is cache row 3)
    plan = BlockPlan(rows=rows, start=1, own=own, shared=[(prefix, torch.tensor([0, 2]), lo, pmask)])  # block rows 0, 2
    got = attend_block(q, k, v, plan, cache, 0, 0.5)
    real = valid.reshape(-1)
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.keys[0][rows, :, 1:1 + T], kk) and not cache.keys[0][1].any()
