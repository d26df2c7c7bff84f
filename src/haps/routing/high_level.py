"""The high-level router (paper Sec. 3.1, App. A.1): a causal LM that answers the routing prompt with a
JSON assignment, used so that it can never produce an invalid one.

Semantics (enumerable space, K^N <= max_enumerate)::

    for each prompt p and each valid assignment z (product order):
        s(p, z) = sum_t log P_theta(a_t | chat(p), a_<t)      # a = answer_ids(z): JSON + end token
    P(z | p) = softmax_z s(p, z)                              # the LM restricted to valid answers
    route(p) = argmax_z P(z | p)

The prompt is run once per prompt (KV cache), then expanded to the A candidates, so a batch of B
prompts costs B prompt passes plus B*A short answer passes; the prefix the batch's prompts share (system
prompt, task description, role definitions: about half of a routing prompt) runs once for the batch.
``reference_scores`` is the plain twin (one full sequence at a time) and a test holds them equal. Scores
carry gradients when grad is enabled.

Large spaces (K^N > max_enumerate) are decided role by role: at step i the K continuations
``id_k + next separator`` are scored after the answer so far and renormalised over valid ids, so
``P(z | p) = prod_i P(z_i | p, z_<i)`` (locally normalised; the enumerable form is normalised once
over whole answers, so the two agree on the unnormalised scores, not on the normalisation).

The answer is tokenised piece by piece (``{"teacher": `` / ``0`` / ``, "student": `` / ``1`` / ``}``)
in both modes, so the factorised scores are exactly the chain-rule parts of the enumerated ones.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from haps.errors import ConfigError, ModelLoadError
from haps.files import atomic_dir
from haps.models.hf_compat import is_peft, with_cache
from haps.models.padding import left_pad
from haps.models.prefix import common_prefix_len
from haps.quiet import peft_deprecations
from haps.routing.base import Decision, Router, register_router
from haps.routing.prompt import RoutingPrompt, parse_assignment_json
from haps.routing.space import Assignment, AssignmentSpace

CHECKPOINT_FORMAT = "haps-high-level-router/1"
PROMPT_CACHE_SIZE = 4096  # token ids of this many routing prompts are kept (oldest dropped first)
MIN_SHARED_PREFIX = 16  # a batch's common prompt prefix shorter than this is not run on its own


class RouterLoraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(default=8, ge=1, description="LoRA rank of the backbone adapter.")
    alpha: float = Field(default=16.0, gt=0, description="LoRA alpha (update scaled by alpha / r).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Backbone module names that get an adapter.",
    )


class HighLevelRouterConfig(BaseModel):
    """How the router is built. The backbone is named here, never in code."""

    model_config = ConfigDict(extra="forbid")
    backbone: str = Field(
        default="smollm2-135m",
        description="A model name of `backbone_pool` (its weights are loaded as a separate trainable copy), "
        "or a Hugging Face hub id / local folder.",
    )
    backbone_pool: str = Field(default="tiny", description="Pool (built-in name or YAML) that `backbone` names.")
    max_enumerate: int = Field(
        default=64, ge=1, description="Score every assignment when K^N <= this; else decide role by role."
    )
    batch_size: int = Field(default=8, ge=1, description="Prompts per scoring forward pass.")
    lora: RouterLoraConfig | None = Field(default=None, description="Train a PEFT LoRA instead of all weights.")
    seed: int = Field(default=0, description="Seed of the sampling generator.")


# ---------------------------------------------------------------------------------------------- scoring
def candidate_scores(model: nn.Module, prompt_ids: Sequence[Sequence[int]],
                     candidates: Sequence[Sequence[Sequence[int]]], pad_id: int,
                     prompt_states: bool = False, share_prefix: bool = True) -> tuple[torch.Tensor, ...]:
    """Summed log-probs of each prompt's candidate completions, sharing one prompt pass.

    prompt_ids: B token lists; candidates: B lists of A token lists each (same A for every row, each
    candidate non-empty). Returns (scores (B, A), n_tokens (B, A)). Gradients flow when enabled.

    The tokens every candidate starts with (e.g. ``{"teacher": ``) are appended to the prompts, so the
    B*A candidate rows only carry the tokens where candidates differ; the head runs on the last
    ``len(common) + 1`` prompt positions and on the candidate rows, never on the prompt body.

    With ``prompt_states`` it also returns the prompt pass's last hidden states after the final norm
    (B, L, d) and a mask (B, L) of the prompt's own tokens (no padding, no appended common tokens): what the
    low-level router pools, from the same pass.

    With ``share_prefix`` the prefix all B prompts start with runs once (``_prompt_pass``); off, the plain pass
    (also for a sliding-window backbone whose window is shorter than the longest prompt).
    """
    from transformers import DynamicCache

    B = len(prompt_ids)
    A = len(candidates[0])
    if any(len(c) != A for c in candidates):
        raise ConfigError("candidate_scores: every prompt needs the same number of candidates.")
    flat = [list(c) for row in candidates for c in row]  # B*A candidates, row-major
    if not all(flat):
        raise ConfigError("candidate_scores: every candidate needs at least one token.")
    c = common_prefix_len(flat)  # tokens all candidates start with, leaving at least one in each
    common = flat[0][:c]
    device = next(model.parameters()).device
    cache = DynamicCache(config=getattr(model, "config", None))
    seqs = [list(p) + common for p in prompt_ids]
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    if window is not None and max(len(s) for s in seqs) > window:
        share_prefix = False  # padding between prefix and suffix would shift what a window of keys covers
    hidden, mask, pos = _prompt_pass(model.get_decoder(), seqs, pad_id, cache, device,
                                     shared_prefix_len(prompt_ids) if share_prefix else 0)
    head_lp = torch.log_softmax(_logits(model, hidden[:, -(c + 1):]), dim=-1)  # (B, c + 1, V): common, then c
    prefix = torch.zeros(B, device=device)
    if c:
        tgt = torch.tensor(common, device=device)[None, :, None].expand(B, c, 1)
        prefix = head_lp[:, :c].gather(2, tgt).squeeze(2).sum(1)  # (B,)
    rest = [f[c:] for f in flat]
    La = max(len(f) for f in rest)
    ans = torch.full((B * A, La), pad_id, dtype=torch.long)
    amask = torch.zeros((B * A, La), dtype=torch.long)
    for j, f in enumerate(rest):
        ans[j, :len(f)] = torch.tensor(f, dtype=torch.long)
        amask[j, :len(f)] = 1
    ans, amask = ans.to(device), amask.to(device)
    row = torch.arange(B, device=device).repeat_interleave(A)  # (B*A,) prompt of each candidate
    tok_lp = head_lp[row, c, ans[:, 0]][:, None]  # (B*A, 1)
    if La > 1:
        cache.batch_repeat_interleave(A)
        full_mask = torch.cat([mask[row], amask[:, :-1]], dim=1)  # (B*A, Lp + c + La - 1)
        apos = pos[row, -1:] + 1 + torch.arange(La - 1, device=device)[None, :]  # (B*A, La - 1)
        logits = model(input_ids=ans[:, :-1], attention_mask=full_mask, position_ids=apos, use_cache=True,
                       **with_cache(model, cache)).logits  # (B*A, La - 1, V)
        more = torch.log_softmax(logits.float(), dim=-1).gather(2, ans[:, 1:, None]).squeeze(2)  # (B*A, La - 1)
        tok_lp = torch.cat([tok_lp, more], dim=1)  # (B*A, La)
    tok_lp = tok_lp * amask
    scores = tok_lp.sum(1).view(B, A) + prefix[:, None]
    if not prompt_states:
        return scores, (amask.sum(1) + c).view(B, A)
    own = mask.clone()
    if c:
        own[:, -c:] = 0  # the appended common answer tokens are not the prompt's
    return scores, (amask.sum(1) + c).view(B, A), hidden, own


def shared_prefix_len(prompt_ids: Sequence[Sequence[int]], minimum: int = MIN_SHARED_PREFIX) -> int:
    """Length P of the token prefix every prompt starts with, leaving each at least one token of its own;
    0 for a single prompt or when P < ``minimum`` (not worth a pass of its own)."""
    if len(prompt_ids) < 2:
        return 0
    n = common_prefix_len(prompt_ids)
    return n if n >= minimum else 0


def _prompt_pass(decoder: nn.Module, seqs: list[list[int]], pad_id: int, cache, device,
                 shared: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run B token lists through ``decoder`` into ``cache``; returns hidden (B, L, d) after the final norm,
    mask (B, L) and positions (B, L).

    Semantics (``shared`` = P > 0: every sequence starts with the same P tokens)::

        run seqs[0][:P] once (batch 1) -> hidden_P (1, P, d); cache := its KV repeated B times
        run the suffixes seqs[b][P:], left-padded to S, at positions P.. after the cached prefix
        hidden = [hidden_P repeated B times | suffix states]; mask = [1 * P | suffix mask]  # (B, P + S)

    equal (up to float rounding) to one left-padded pass over the whole sequences, at 1/B of the prefix's
    cost. Padding sits between the prefix and each suffix (masked; positions skip it)."""
    if not shared:
        ids, mask = left_pad(seqs, pad_id, device)  # (B, L)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **with_cache(decoder, cache)).last_hidden_state
        return hidden, mask, pos
    B = len(seqs)
    pre = torch.tensor([seqs[0][:shared]], device=device)  # (1, P)
    head = decoder(input_ids=pre, use_cache=True, **with_cache(decoder, cache)).last_hidden_state  # (1, P, d)
    cache.batch_repeat_interleave(B)
    ids, smask = left_pad([s[shared:] for s in seqs], pad_id, device)  # (B, S)
    mask = torch.cat([torch.ones(B, shared, dtype=smask.dtype, device=device), smask], dim=1)  # (B, P + S)
    pos = shared + (smask.cumsum(-1) - 1).clamp(min=0)  # (B, S)
    tail = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                   **with_cache(decoder, cache)).last_hidden_state  # (B, S, d)
    full_pos = torch.cat([torch.arange(shared, device=device).expand(B, shared), pos], dim=1)
    return torch.cat([head.expand(B, -1, -1), tail], dim=1), mask, full_pos


def _logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The causal LM's logits (fp32) of final-normed hidden states, with its final soft-capping if any."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def reference_scores(model: nn.Module, prompt_ids: Sequence[Sequence[int]],
                     candidates: Sequence[Sequence[Sequence[int]]]) -> torch.Tensor:
    """Slow twin of ``candidate_scores``: one unpadded full sequence per (prompt, candidate)."""
    device = next(model.parameters()).device
    out = torch.zeros(len(prompt_ids), len(candidates[0]))
    for b, (p, cands) in enumerate(zip(prompt_ids, candidates, strict=False)):
        for a, c in enumerate(cands):
            seq = torch.tensor([list(p) + list(c)], device=device)
            lp = torch.log_softmax(model(input_ids=seq).logits[0].float(), dim=-1)  # (T, V)
            n = len(c)
            T = seq.shape[1]
            out[b, a] = lp[T - 1 - n:T - 1].gather(1, seq[0, T - n:, None]).sum()
    return out


# ---------------------------------------------------------------------------------------------- router
@register_router("high_level")
class HighLevelRouter(Router):
    """An LM backbone answering the routing prompt; decides among valid assignments only."""

    def __init__(self, model: nn.Module, tokenizer, space: AssignmentSpace,
                 config: HighLevelRouterConfig | None = None, *, backbone_ref: dict[str, Any] | None = None) -> None:
        config = config or HighLevelRouterConfig()
        super().__init__(space, max_enumerate=config.max_enumerate, seed=config.seed)
        self.config = config
        if not getattr(tokenizer, "chat_template", None):  # base models: plain role-tagged turns
            from haps.models.templates import PLAIN_CHAT_TEMPLATE

            tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        self.tokenizer = tokenizer
        self.backbone_ref = backbone_ref  # where the base weights came from (pool model or hub id/folder)
        if config.lora is not None and not is_peft(model):
            model = _wrap_lora(model, config.lora)
        self.model = model
        self.model.eval()  # no dropout: P(z|p) is deterministic, in training too
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ConfigError("router tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
        self.end_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self._prompt_cache: dict[tuple[str, str], list[int]] = {}
        self._piece_cache: dict[str, list[int]] = {}

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pool(cls, space: AssignmentSpace, config: HighLevelRouterConfig | None = None) -> HighLevelRouter:
        """Load ``config.backbone`` as a fresh trainable copy (never the pool's shared inference weights)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = config or HighLevelRouterConfig()
        path, ref = _resolve_backbone(config)
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except OSError as e:
            hint = "" if ref["kind"] == "pool" else (
                f" It is not a model of pool {config.backbone_pool!r} either; name one of that pool's models or an "
                "existing folder / hub id.")
            raise ModelLoadError(f"router backbone {config.backbone!r}: cannot load from {path!r}: {e}.{hint}") from e
        return cls(model, tok, space, config, backbone_ref=ref)

    @classmethod
    def from_spec(cls, arg: str, *, space: AssignmentSpace, **kwargs) -> HighLevelRouter:
        if not arg:
            raise ConfigError("router 'high_level' needs a checkpoint folder: high_level:<CKPT>.")
        router = load_router(arg)
        if router.space != space:
            raise ConfigError(f"checkpoint {arg!r} routes {router.space}, not {space}.")
        return router

    def parameters(self):
        return (p for p in self.model.parameters() if p.requires_grad)

    def train_mode(self, flag: bool = True) -> None:
        """Enable gradients on the trainable weights (LoRA only, or all weights)."""
        if is_peft(self.model):
            for n, p in self.model.named_parameters():
                p.requires_grad_(flag and "lora_" in n)
        else:
            self.model.requires_grad_(flag)

    # ---------------------------------------------------------------- tokens
    def prompt_ids(self, prompt: RoutingPrompt) -> list[int]:
        key = (prompt.system, prompt.user)
        if key not in self._prompt_cache:
            out = self.tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if hasattr(out, "keys") else out
            if len(self._prompt_cache) >= PROMPT_CACHE_SIZE:  # bounded: a server sees endless distinct prompts
                self._prompt_cache.pop(next(iter(self._prompt_cache)))
            self._prompt_cache[key] = [int(t) for t in ids]
        return self._prompt_cache[key]

    def _piece(self, text: str) -> list[int]:
        if text not in self._piece_cache:
            self._piece_cache[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._piece_cache[text]

    def _pieces(self, z: Sequence[int | None]) -> list[list[int]]:
        """Token pieces of the answer: [key_0, id_0, sep_1, id_1, ..., '}' + end]; ids left None are []."""
        roles = self.space.roles
        out: list[list[int]] = []
        for i, r in enumerate(roles):
            head = ("{" if i == 0 else ", ") + json.dumps(r) + ": "
            out.append(self._piece(head))
            out.append(self._piece(str(z[i])) if z[i] is not None else [])
        out.append(self._piece("}") + self.end_ids)
        return out

    def answer_ids(self, z: Sequence[int]) -> list[int]:
        """Token ids of the canonical answer ``assignment_json(z)`` followed by the end token."""
        return [t for piece in self._pieces(self.space.check(z)) for t in piece]

    # ---------------------------------------------------------------- scoring
    def scores(self, prompts: Sequence[RoutingPrompt], assignments: Sequence[Assignment] | None = None,
               fast: bool = True) -> torch.Tensor:
        """(B, A) summed answer log-likelihoods s(p, z) for every assignment (default: the whole space)."""
        zs = list(assignments) if assignments is not None else self.space.assignments()
        cands = [self.answer_ids(z) for z in zs]
        rows = []
        for s in range(0, len(prompts), self.config.batch_size):
            chunk = prompts[s:s + self.config.batch_size]
            pids = [self.prompt_ids(p) for p in chunk]
            if fast:
                sc, _ = candidate_scores(self.model, pids, [cands] * len(chunk), self.pad_id)
            else:
                sc = reference_scores(self.model, pids, [cands] * len(chunk))
            rows.append(sc)
        return torch.cat(rows)

    def log_probs(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        if not self.enumerable:
            raise ConfigError(
                f"the space has {self.space.size} assignments (> max_enumerate={self.max_enumerate}): the full "
                "distribution is not enumerated; use log_prob(prompts, assignments) or route()."
            )
        return torch.log_softmax(self.scores(prompts), dim=-1)

    def log_prob(self, prompts: Sequence[RoutingPrompt], assignments: Sequence[Assignment]) -> torch.Tensor:
        """(B,) log P(z_b | p_b) with gradients (for RL): enumerated or factorised per the space size."""
        if self.enumerable:
            idx = torch.tensor([self.space.index(z) for z in assignments])
            return self.log_probs(prompts).gather(1, idx[:, None].to(self.model.device)).squeeze(1)
        return self._factorised(prompts, "argmax", forced=[self.space.check(z) for z in assignments])[1]

    def sequence_loss(self, prompts: Sequence[RoutingPrompt], assignments: Sequence[Assignment]) -> torch.Tensor:
        """Causal-LM loss on the answer tokens only (prompt masked): mean token negative log-likelihood."""
        pids = [self.prompt_ids(p) for p in prompts]
        cands = [[self.answer_ids(z)] for z in assignments]
        sc, n = candidate_scores(self.model, pids, cands, self.pad_id)  # (B, 1)
        return -(sc.sum() / n.sum())

    # ---------------------------------------------------------------- factorised decoding
    def route_factorised(self, prompts: Sequence[RoutingPrompt], decision: Decision) -> list[Assignment]:
        with torch.no_grad():
            return self._factorised(prompts, decision)[0]

    def _factorised(self, prompts, decision: Decision, forced: list[Assignment] | None = None):
        """Decide role by role among valid ids; returns (assignments, summed local log-probs (B,))."""
        K, N = len(self.space.models), len(self.space.roles)
        chosen: list[list[int | None]] = [[None] * N for _ in prompts]
        total = torch.zeros(len(prompts))
        pids_all = [self.prompt_ids(p) for p in prompts]
        for i in range(N):
            cands = []
            for b in range(len(prompts)):
                pieces = self._pieces(chosen[b])
                done = [t for piece in pieces[:2 * i + 1] for t in piece]  # answer so far + key of role i
                nxt = pieces[2 * i + 2]  # separator / closing piece after id i
                cands.append([done + self._piece(str(k)) + nxt for k in range(K)])
            lps = []
            for s in range(0, len(prompts), self.config.batch_size):
                sl = slice(s, s + self.config.batch_size)
                sc, _ = candidate_scores(self.model, pids_all[sl], cands[sl], self.pad_id)
                lps.append(torch.log_softmax(sc, dim=-1))  # (b, K): renormalised over valid ids
            lp = torch.cat(lps).cpu() if not torch.is_grad_enabled() else torch.cat(lps)
            if forced is not None:
                pick = torch.tensor([z[i] for z in forced])
            elif decision == "argmax":
                pick = lp.argmax(-1).cpu()
            else:
                pick = torch.multinomial(lp.detach().exp().cpu(), 1, generator=self.generator).squeeze(1)
            total = total.to(lp.device) + lp.gather(1, pick[:, None].to(lp.device)).squeeze(1)
            for b in range(len(prompts)):
                chosen[b][i] = int(pick[b])
        return [tuple(c) for c in chosen], total

    # ---------------------------------------------------------------- free-form decoding
    @torch.no_grad()
    def free_form(self, prompts: Sequence[RoutingPrompt], max_new_tokens: int = 32) -> list[str]:
        """Greedy unconstrained answers (what the authors' router does before parsing)."""
        from haps.config import ModelSpec
        from haps.models.local import LocalModel
        from haps.models.types import GenRequest

        spec = ModelSpec(name="router", backend="local", source_kind="folder", source="<in-memory>")
        lm = LocalModel(spec, self.model, self.tokenizer, max_batch_size=self.config.batch_size)
        gens = lm.generate([GenRequest(messages=p.messages, max_new_tokens=max_new_tokens) for p in prompts])
        return [g.text for g in gens]

    def free_form_parse_rate(self, prompts: Sequence[RoutingPrompt], max_new_tokens: int = 32) -> dict[str, Any]:
        """Share of greedy free-form answers that parse to a valid assignment (no fallback to model 0)."""
        texts = self.free_form(prompts, max_new_tokens)
        parsed = [parse_assignment_json(t, self.space) for t in texts]
        ok = sum(p is not None for p in parsed)
        return {"n": len(texts), "parsed": ok, "rate": ok / len(texts) if texts else math.nan,
                "examples": texts[:5], "assignments": parsed}

    # ---------------------------------------------------------------- checkpoints
    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """safetensors weights + JSON config (never pickle), written to a temp folder then renamed."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            lora = is_peft(self.model)
            base_saved = not (lora and self.backbone_ref is not None and self.backbone_ref.get("kind") == "pool")
            if lora:
                self.model.save_pretrained(tmp / "adapter", safe_serialization=True)
                if base_saved:  # the base without the LoRA wrappers (unload a copy, keep ours wrapped)
                    copy.deepcopy(self.model).unload().save_pretrained(tmp / "backbone", safe_serialization=True)
            else:
                self.model.save_pretrained(tmp / "backbone", safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            info = {
                "format": CHECKPOINT_FORMAT, "router": self.name, "config": self.config.model_dump(),
                "roles": list(self.space.roles), "models": list(self.space.models),
                "backbone_ref": self.backbone_ref, "base_saved": base_saved, "lora": lora, "meta": meta or {},
            }
            (tmp / "router.json").write_text(json.dumps(info, indent=2) + "\n")
        return path


def _wrap_lora(model: nn.Module, cfg: RouterLoraConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        raise ConfigError(f"router LoRA: the backbone has no modules named {missing}; set lora.target_modules.")
    pc = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                    bias="none", task_type="CAUSAL_LM")
    with peft_deprecations():
        return get_peft_model(model, pc)


def _resolve_backbone(config: HighLevelRouterConfig) -> tuple[str, dict[str, Any]]:
    """(from_pretrained path, reference recorded in checkpoints)."""
    from haps.config import load_pool

    pool = load_pool(config.backbone_pool)  # a mistyped pool is an error, never a hub id
    if config.backbone in pool.names:
        from haps.config import cache_root
        from haps.models.sources import resolve

        spec = pool.get(config.backbone)
        if spec.backend != "local":
            raise ConfigError(f"router backbone {config.backbone!r} is an API model; name a local model.")
        src = resolve(spec, cache_root(pool))
        if src.gguf_file:
            raise ConfigError(f"router backbone {config.backbone!r}: GGUF sources must be converted first.")
        return src.path, {"kind": "pool", "pool": config.backbone_pool, "model": config.backbone}
    return config.backbone, {"kind": "path", "path": config.backbone}


def load_router(path: str | Path) -> HighLevelRouter:
    """Restore a router saved by ``HighLevelRouter.save`` (same weights, config, space)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    info_p = path / "router.json"
    if not info_p.exists():
        raise ConfigError(f"{str(path)!r} is not a router checkpoint (no router.json).")
    info = json.loads(info_p.read_text())
    if info.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{str(info_p)!r}: unknown checkpoint format {info.get('format')!r}; "
                          f"expected {CHECKPOINT_FORMAT!r}.")
    config = HighLevelRouterConfig.model_validate(info["config"])
    space = AssignmentSpace.of(info["roles"], info["models"])
    if info["base_saved"]:
        base_path = str(path / "backbone")
    else:
        base_path, _ = _resolve_backbone(config)
    tok = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    if info["lora"]:
        from peft import PeftModel

        with peft_deprecations():
            model = PeftModel.from_pretrained(model, str(path / "adapter"))
    model.requires_grad_(False)
    return HighLevelRouter(model, tok, space, config, backbone_ref=info.get("backbone_ref"))
