"""Profiles: one switch for the defaults of every stage. ``default`` is haps' own; ``paper`` restores the
paper's protocol (arXiv 2601.05903 and the authors' code, zihangtian/HAPS) wherever haps' defaults differ.

A profile sits between a config model's defaults and the values a user gives::

    config model defaults  <  profile  <  the --config file  <  options on the command line

so ``profile: paper`` with a small ``limit`` runs the paper's settings on fewer problems. `DIFFERENCES`
lists every value the ``paper`` profile changes, with haps' default and the reason it differs; the README
table is `markdown_table()` (a test holds them equal).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from haps.errors import ConfigError

Profile = Literal["default", "paper"]
PROFILES: tuple[str, ...] = ("default", "paper")

#: paper Table 4: USD per 1M tokens of a whole episode, by composition of a two-model pool (L = the pool's
#: first model, Q = its second): both agents on L, one on each, both on Q
PAPER_COMPOSITION_PRICES = (0.2, 0.5, 0.8)
#: paper Sec. 4.1: problems per split of the action-level data (train / valid / test)
PAPER_SPLIT = (3000, 1000, 100)


@dataclass(frozen=True)
class Difference:
    """One value the paper profile changes: where it lives, haps' default, the paper's, and why they differ."""

    stage: str  # collect | sft | rl | pool
    field: str
    ours: str
    paper: str
    why: str


DIFFERENCES: tuple[Difference, ...] = (
    Difference("collect", "workflow_options.hotpotqa.forced_answer", "ask", "null",
               "a last round without Finish[...] answers nothing in the official code; tiny models rarely write "
               "Finish, which made every collected reward 0, so haps asks for a short answer instead"),
    Difference("collect", "workflow_options.<task>.parsing", "lenient", "strict",
               "the official parser takes only the exact format; tiny models add markdown, other spellings, "
               "missing brackets"),
    Difference("collect", "limit, split_fractions", "all problems, 0.6/0.2/0.2", "4,100: 3,000/1,000/100",
               "what a CPU collects in hours; the paper's sizes need GPUs"),
    Difference("sft", "epochs, lr, warmup_ratio", "3, 2e-5, 0.1", "10, 1e-5, 0.03",
               "tens of training problems on CPU: fewer, larger steps"),
    Difference("sft", "batch_size x grad_accum", "4 x 1", "8 x 8 (64)",
               "with tens of examples a batch of 64 is one step per epoch"),
    Difference("sft", "tie", "random", "all",
               "the authors' build_sft.py --tie_policy all keeps every tied best assignment; small sets with "
               "90% ties then teach the majority label"),
    Difference("rl", "route, routing_term", "sample, true", "greedy, false",
               "Eq. 5 trains the routing term on sampled z; the authors' code routes by argmax under no_grad"),
    Difference("rl", "batch_size, epochs", "4, 1", "1, 3", "an update per problem is slow on CPU"),
    Difference("rl", "validate_every", "10", "30", "fewer RL steps on CPU"),
    Difference("rl", "max_grad_norm, max_advantage", "1.0, 5.0", "none, none",
               "the authors use no clipping; haps clips against the large early updates of summed log-probs"),
    Difference("rl", "low_level_config.init, share_across_layers", "zero_update, false", "xavier, true",
               "a zero first update starts RL from the SFT router's behaviour (LoRA's init); the authors' code "
               "reuses one (A, B) in every adapted layer"),
    Difference("pool", "composition_prices", "none (each model's price_in/price_out)",
               "LL 0.2, mixed 0.5, QQ 0.8 $/1M tokens",
               "per-model prices price what each call used; Table 4 prices the whole episode by its composition"),
)


def _split_fractions(sizes: tuple[int, int, int]) -> tuple[float, float, float]:
    total = sum(sizes)
    return tuple(s / total for s in sizes)  # type: ignore[return-value]


def collect_overrides(profile: str, task: str) -> dict[str, Any]:
    """`CollectConfig` fields the profile sets for ``task``."""
    check(profile)
    if profile == "default":
        return {}
    options: dict[str, Any] = {"parsing": "strict"}
    if task == "hotpotqa":
        options.update(forced_answer="null", budget=3, summaries=True, passage_chars=None)
    elif task == "mmlu":
        options.update(rounds=3)
    return {"workflow_options": options, "max_new_tokens": None, "temperature": 0.0,
            "limit": sum(PAPER_SPLIT), "split_fractions": _split_fractions(PAPER_SPLIT)}


def sft_overrides(profile: str) -> dict[str, Any]:
    """`SFTConfig` fields the profile sets (the authors' README: 10 epochs, lr 1e-5, warm-up 0.03 + cosine,
    batch 8 x accumulation 8, clipping 1.0, tie policy all, no balancing)."""
    check(profile)
    if profile == "default":
        return {}
    return {"epochs": 10, "lr": 1e-5, "warmup_ratio": 0.03, "batch_size": 8, "grad_accum": 8, "max_grad_norm": 1.0,
            "tie": "all", "balance": "none"}


def rl_overrides(profile: str) -> dict[str, Any]:
    """`RLConfig` fields the profile sets (the authors' joint_rl/rl_batch.py and App. D)."""
    check(profile)
    if profile == "default":
        return {}
    return {"route": "greedy", "routing_term": False, "batch_size": 1, "group_size": 1, "epochs": 3,
            "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 256, "lr_backbone": 1e-6, "lr_heads": 1e-5,
            "weight_decay_backbone": 0.01, "weight_decay_heads": 0.0, "lr_end_factor": 0.1, "validate_every": 30,
            "patience": 4, "baseline": "none", "token_norm": "sum", "max_grad_norm": None, "max_advantage": None,
            "train_limit": 300, "valid_limit": 100, "reward": {"kind": "shaped"},
            "low_level_config": {"init": "xavier", "share_across_layers": True, "pooling": "mean"}}


def composition_prices(profile: str, models: list[str]) -> dict[str, float]:
    """The profile's `PoolConfig.composition_prices` for a pool of ``models`` (empty: per-model prices)."""
    check(profile)
    if profile == "default":
        return {}
    if len(models) != 2:
        raise ConfigError(f"the paper profile prices episodes as Table 4 does, for two-model pools; this pool has "
                          f"{len(models)} ({models}). Give composition_prices in the pool file, or use profile "
                          "default.")
    lo, hi = models
    from haps.config import PoolConfig

    return {PoolConfig.composition(c): p for c, p in zip(((lo, lo), (lo, hi), (hi, hi)), PAPER_COMPOSITION_PRICES,
                                                          strict=True)}


def check(profile: str) -> str:
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; profiles: {', '.join(PROFILES)}.")
    return profile


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, nested mappings merged key by key (a profile under a config file)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def markdown_table() -> str:
    """The README's table of the paper profile: stage, setting, haps' default, the paper's, why."""
    lines = ["| stage | setting | haps default | `profile: paper` | why haps differs |", "|---|---|---|---|---|"]
    lines += [f"| {d.stage} | `{d.field}` | {d.ours} | {d.paper} | {d.why} |" for d in DIFFERENCES]
    return "\n".join(lines)
