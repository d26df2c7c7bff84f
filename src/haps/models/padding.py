"""Padding: token lists left-padded into batches (the layout every prefill and scoring pass uses), and token rows
padded to the counts MKL multiplies in few passes over a weight."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ids (b, L) filled with ``pad_id`` and an attention mask (b, L) of 1/0."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, L - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, L - len(s):] = 1
    return ids.to(device), mask.to(device)


# Row counts up to 16 and what to pad them to (see `gemm_rows`).
_SMALL_GEMM_ROWS = (0, 1, 2, 4, 4, 5, 6, 8, 8) + (16,) * 8


def gemm_rows(n: int, min_rows: int = 1) -> int:
    """How many rows to give a CPU ``W @ x^T`` whose x has n rows (the matmul's N): n, or a little more.

    MKL's single-precision GEMM covers N in column blocks of 16, then 8, 4, 2, 1, and each block streams
    the whole weight, so a ragged N costs as many weight passes as the set bits of N % 16, plus one per full
    16 block. Measured on this project's 2-core AVX2 machine for Gemma 3's 262k x 640 head (ms): N=15
    146, N=16 66; N=12 92; N=31 173, N=32 93; and the same shape over a decoder layer's projections (N=15
    58.6 vs N=16 20.3 ms for 18 layers). So pad N to the cheapest count at or above it: 3 -> 4, 7 -> 8,
    9..15 -> 16, above 16 to a multiple of 16 (N=17 and N=32 cost the same, 92 vs 93 ms), never below
    ``min_rows``. Zero rows give zero columns that callers slice away; the other columns are the same dot
    products.
    """
    n = max(n, min_rows)
    return _SMALL_GEMM_ROWS[n] if n <= 16 else -(-n // 16) * 16


def pad_rows(x: torch.Tensor, min_rows: int = 1) -> torch.Tensor:
    """x: (b, d) with zero rows appended up to ``gemm_rows(b, min_rows)``; x itself when none are needed."""
    m = gemm_rows(x.shape[0], min_rows)
    return x if m == x.shape[0] else torch.cat([x, x.new_zeros((m - x.shape[0], x.shape[1]))])
