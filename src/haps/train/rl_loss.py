"""The joint RL objective (paper Eq. 5 and 9, App. D), as pure functions on per-episode quantities.

For episode e with shaped reward r_e, baseline b_e, routing log-probability log P(z_e | p_e) and the summed
log-probs of every token both agents generated on open models, ``sum_t log pi(a_t)`` (n_e tokens)::

    w_e    = clamp(r_e - b_e, -max_advantage, max_advantage)                 # the loss scale, clamped
    L      = -(1 / E) * sum_e w_e * (route_e + tokens_e)
    route_e  = log P(z_e | p_e)            if routing_term else 0            # Eq. 5; the authors' code drops it
    tokens_e = sum_t log pi(a_t)           (token_norm "sum", the paper's Eq. 9)
             = sum_t log pi(a_t) / n_e     (token_norm "mean": every episode weighs alike, whatever its length)

Baselines b_e: ``none`` (0, the paper), ``mean`` (running mean of all earlier rewards), ``group`` (G episodes
per problem; the mean of the other G - 1 rewards of the same problem: RLOO's leave-one-out baseline).
The mean over E episodes (not the sum) keeps the step size independent of the batch size; with one episode
per step (the paper) the two are equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from haps.errors import ConfigError

BaselineKind = Literal["none", "mean", "group"]
TokenNorm = Literal["sum", "mean"]


def baselines(rewards: Sequence[float], groups: Sequence[int], kind: BaselineKind,
              running_mean: float | None = None) -> list[float]:
    """b_e for each episode. ``groups[e]``: which problem episode e belongs to (for ``group``);
    ``running_mean``: the mean reward of all earlier steps (for ``mean``; None before any)."""
    if kind == "none":
        return [0.0] * len(rewards)
    if kind == "mean":
        return [0.0 if running_mean is None else float(running_mean)] * len(rewards)
    if kind != "group":
        raise ConfigError(f"baseline must be one of none, mean, group; got {kind!r}.")
    out = []
    for e, g in enumerate(groups):
        others = [r for j, (r, h) in enumerate(zip(rewards, groups, strict=True)) if h == g and j != e]
        if not others:
            raise ConfigError("baseline 'group' needs at least 2 episodes per problem (group_size >= 2).")
        out.append(sum(others) / len(others))
    return out


def advantages(rewards: Sequence[float], base: Sequence[float], max_advantage: float | None) -> list[float]:
    """w_e = r_e - b_e, clamped to [-max_advantage, max_advantage] (None: not clamped)."""
    w = [float(r) - float(b) for r, b in zip(rewards, base, strict=True)]
    if max_advantage is not None:
        w = [max(-max_advantage, min(max_advantage, x)) for x in w]
    return w


def token_weights(weights: Sequence[float], token_counts: Sequence[int], token_norm: TokenNorm) -> list[float]:
    """The factor each episode's summed token log-prob is multiplied by in L (before the 1 / E and the sign)."""
    if token_norm == "sum":
        return [float(w) for w in weights]
    if token_norm == "mean":
        return [float(w) / n if n else 0.0 for w, n in zip(weights, token_counts, strict=True)]
    raise ConfigError(f"token_norm must be 'sum' or 'mean', got {token_norm!r}.")


def policy_loss(weights: Sequence[float], route_logp: torch.Tensor | None, token_logp: torch.Tensor,
                token_counts: Sequence[int], *, routing_term: bool = True, token_norm: TokenNorm = "sum") -> torch.Tensor:
    """L of the module docstring. route_logp, token_logp: (E,) (route_logp may be None without a routing term)."""
    E = len(weights)
    if E == 0:
        raise ConfigError("policy_loss: no episodes.")
    w = torch.tensor(list(weights), dtype=token_logp.dtype, device=token_logp.device)
    tw = torch.tensor(token_weights(weights, token_counts, token_norm), dtype=token_logp.dtype, device=token_logp.device)
    loss = -(tw * token_logp).sum()
    if routing_term:
        if route_logp is None:
            raise ConfigError("policy_loss: routing_term is on but no log P(z|p) was given.")
        loss = loss - (w * route_logp.to(token_logp.dtype)).sum()
    return loss / E
