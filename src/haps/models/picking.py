"""Choosing the next token from a decode step's output: greedy or nucleus sampling, and the vocabulary head.

`pick_tokens` works on logits (b, V). On CPU the head itself is computed here (`head_logits`: ``W @ h^T``
in vocabulary slices), and an all-greedy batch is picked slice by slice without writing (b, V) logits at
all (`greedy_pick`); both give the tokens `pick_tokens` gives on the full logits (tests hold them equal).
"""

from __future__ import annotations

import torch
from torch import nn

from haps.models.padding import pad_rows


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
    if streamed_head(head, h):
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


def streamed_head(head: nn.Module, h: torch.Tensor) -> bool:
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
        sp, si = nucleus(probs, top_ps[sampled].to(logits.device))
        k = torch.multinomial(sp.cpu(), 1, generator=gen).to(logits.device)  # (s, 1)
        choice[sampled.to(logits.device)] = si.gather(1, k).squeeze(1)
    if not logprobs:
        return choice.tolist(), [0.0] * logits.shape[0]
    lp = logits.gather(1, choice[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    return choice.tolist(), lp.tolist()


# the nucleus is looked for among this many top tokens first (a partial sort); rows whose nucleus is larger fall
# back to sorting the whole vocabulary (Gemma 3's 262k: the full sort was ~30% of a sampled decode step)
NUCLEUS_CANDIDATES = 1024


def nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus of each row of probs (s, V) for top_p (s,): (weights (s, k), token ids (s, k)), weights
    zero outside the smallest top-probability set whose mass reaches top_p (sorted, descending).

    Semantics (`reference_nucleus`): sort each row descending and drop every token whose preceding mass
    exceeds top_p. Fast path: the same rule over the top `NUCLEUS_CANDIDATES` tokens, used for the rows where
    the last candidate is already dropped (so the nucleus lies among them); other rows, and top_p >= 1 (the
    whole distribution), use the full sort / the probabilities themselves."""
    if bool((top_p >= 1).all()):
        return probs, torch.arange(probs.shape[1], device=probs.device).expand_as(probs)
    k = min(NUCLEUS_CANDIDATES, probs.shape[1])
    sp, si = probs.topk(k, dim=-1)  # sorted, descending
    drop = (sp.cumsum(-1) - sp) > top_p[:, None]
    if k == probs.shape[1] or bool(drop[:, -1].all()):
        return sp.masked_fill(drop, 0.0), si
    return reference_nucleus(probs, top_p)


def reference_nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`nucleus` by a full sort of every row (the slow twin)."""
    sp, si = probs.sort(dim=-1, descending=True)
    drop = (sp.cumsum(-1) - sp) > top_p[:, None]  # keep the smallest nucleus
    drop &= (top_p < 1)[:, None]  # top_p = 1: everything (a cumulative sum may round past 1.0)
    return sp.masked_fill(drop, 0.0), si


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


def token_logprobs(head: nn.Linear, h: torch.Tensor, tgt: torch.Tensor, softcap: float | None = None,
                   temperature: float = 1.0, top_p: float = 1.0, chunk_bytes: int = 128 * 2**20) -> torch.Tensor:
    """log pi(tgt | h) per row under the distribution `pick_tokens` samples from: h (N, d), tgt (N,) -> (N,),
    with gradients.

    Semantics::

        p = softmax(head(h) / temperature)                     # (N, V), soft-capped first if the model does
        nucleus = smallest top-probability set with mass >= top_p (as `pick_tokens` keeps it), plus tgt
        log pi(tgt) = log p[tgt] - log sum_{v in nucleus} p[v]  # 0 renormalisation at top_p = 1

    The nucleus is chosen without gradient (a set), the renormalisation is differentiated. The target is always
    kept in it, so a token sampled under slightly different rounding never gets log-prob -inf. The head runs
    on chunks of at most ``chunk_bytes`` of fp32 logits; with gradients each chunk is recomputed in backward
    (checkpointing), so peak memory holds one chunk, never (N, V).
    """
    step = max(1, chunk_bytes // (head.weight.shape[0] * 4 * 2))
    return torch.cat([_chunk_logprob(h[s:s + step], tgt[s:s + step], head, softcap, temperature, top_p)
                      for s in range(0, h.shape[0], step)])


def _head_logprob(h: torch.Tensor, tgt: torch.Tensor, weight: torch.Tensor, bias, cap, temperature,
                  top_p) -> torch.Tensor:
    logits = torch.nn.functional.linear(h, weight, bias).float()  # (n, V)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    if temperature != 1.0:
        logits = logits / temperature
    if top_p < 1.0:
        with torch.no_grad():  # keep = what `pick_tokens` samples from, plus the target
            sp, si = nucleus(torch.softmax(logits, dim=-1), logits.new_full((logits.shape[0],), top_p))
            drop = torch.ones_like(logits, dtype=torch.bool).scatter_(1, si, sp == 0)
            drop.scatter_(1, tgt[:, None], False)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _chunk_logprob(h, tgt, head: nn.Linear, cap, temperature: float, top_p: float) -> torch.Tensor:
    if torch.is_grad_enabled() and h.requires_grad:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(_head_logprob, h, tgt, head.weight, head.bias, cap, temperature, top_p, use_reentrant=False)
    return _head_logprob(h, tgt, head.weight, head.bias, cap, temperature, top_p)
