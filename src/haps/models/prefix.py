"""Shared-prefix planning for batched prefill.

Agent prompts in one batch mostly start with the same long text (chat header, instructions, the worked
example): only the problem and the history differ. `plan_prefix_groups` groups the rows of a batch by a
common token prefix so that the prefix is prefilled once per group (batch 1) and its keys/values are
copied to every row of the group; only the suffixes go through the batched prefill.

`plan_length_buckets` then cuts the rows into buckets of similar remaining length, so that the batched
prefill of what is left after the prefixes pads little. Both plans are pure bookkeeping on token lists;
`LocalModel._prefill` executes them.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PrefixGroup:
    """Rows ``rows`` (batch indices) share their first ``length`` tokens, ``tokens``."""

    rows: tuple[int, ...]
    tokens: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.tokens)


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def common_prefix_len(seqs: Sequence[Sequence[int]], keep: int = 1) -> int:
    """Tokens that every one of ``seqs`` (non-empty) starts with, leaving each at least ``keep`` of its own."""
    return max(0, min(min(_lcp(seqs[0], s) for s in seqs), min(len(s) for s in seqs) - keep))


def plan_prefix_groups(seqs: Sequence[Sequence[int]], keys: Sequence[Hashable] | None = None,
                       min_prefix: int = 16, max_prefix: int | None = None) -> list[PrefixGroup]:
    """Groups of rows that share a prefix worth prefilling once; rows in no group are not listed.

    seqs: the token ids of each row. keys: rows may only share a prefix with rows of an equal key (e.g.
    the identity of their LoRA adapter, which changes the keys/values of later layers). A group's prefix
    leaves at least one token of every row to the suffix (its last-position logits are needed) and is at
    most ``max_prefix`` long (e.g. a sliding window). Among the ways of cutting the lexicographically
    sorted rows into runs, it takes the one that saves the most prefill tokens, sum (|g| - 1) * length(g),
    over thresholds on the common prefix of neighbours; groups shorter than ``min_prefix`` are dropped.
    """
    n = len(seqs)
    if n < 2:
        return []
    keys = list(keys) if keys is not None else [0] * n
    if len(keys) != n:
        raise ValueError(f"plan_prefix_groups: {n} sequences but {len(keys)} keys.")
    order = sorted(range(n), key=lambda i: (str(keys[i]), list(seqs[i])))
    # common prefix of each row with the next one in sorted order (0 across different keys)
    adj = [(_lcp(seqs[order[j]], seqs[order[j + 1]]) if keys[order[j]] == keys[order[j + 1]] else 0)
           for j in range(n - 1)]

    def cut(threshold: int) -> list[PrefixGroup]:
        groups, start = [], 0
        for j in range(n):
            if j == n - 1 or adj[j] < threshold:
                members = order[start:j + 1]
                if len(members) > 1:
                    length = min(adj[start:j])
                    length = min(length, min(len(seqs[i]) for i in members) - 1)
                    if max_prefix is not None:
                        length = min(length, max_prefix)
                    if length >= min_prefix:
                        groups.append(PrefixGroup(tuple(sorted(members)), tuple(seqs[members[0]][:length])))
                start = j + 1
        return groups

    best: list[PrefixGroup] = []
    best_saved = 0
    for threshold in sorted({a for a in adj if a >= min_prefix}):
        groups = cut(threshold)
        saved = sum((len(g.rows) - 1) * g.length for g in groups)
        if saved > best_saved:
            best, best_saved = groups, saved
    return best


def plan_length_buckets(lengths: Sequence[int], overhead_tokens: int = 64) -> list[list[int]]:
    """Split rows into buckets of similar length so that a padded batched prefill wastes little.

    A bucket of n rows padded to its longest row, T, costs ``n * T + overhead_tokens`` (the overhead
    is the fixed cost of one more forward call, in token equivalents). Rows sorted by length are cut
    into contiguous buckets by an exact O(b^2) dynamic programme that minimises the total cost. Rows of
    length 0 need no compute and go in no bucket. Returns lists of row indices, longest bucket first.
    """
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    n = len(order)
    if n == 0:
        return []
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest cover of order[:j]
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # bucket order[i:j], padded to lengths[order[i]] (the longest, sorted desc)
            c = best[i] + (j - i) * lengths[order[i]] + overhead_tokens
            if c < best[j]:
                best[j], cut[j] = c, i
    buckets = []
    j = n
    while j > 0:
        buckets.append(order[cut[j]:j])
        j = cut[j]
    return buckets[::-1]
