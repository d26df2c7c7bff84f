"""Local backend: any Hugging Face causal LM through transformers, batched, with per-request LoRA.

`generate` runs our own lean decode loop over the transformers model (prefill, then one token per
step with the model's KV cache): left padding, explicit position ids, every row finishing on its own
(EOS, stop string, max tokens), finished rows leaving the batch (cache, mask and adapters are
compacted), greedy or temperature/top-p sampling per row, and per-token log-probs (when asked for).

`score` recomputes summed log-probs of given completions with gradients (teacher forcing), with the
vocabulary projection chunked and checkpointed so a 262k-token head never holds (T, V) logits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from haps.config import LoraTarget, ModelSpec
from haps.errors import ConfigError, ModelLoadError
from haps.models.attention import SharedPrefix
from haps.models.lora import LoRAInjector
from haps.models.prefix import PrefixGroup, plan_length_buckets, plan_prefix_groups
from haps.models.sources import resolve
from haps.models.types import Generation, GenRequest, RowAdapter

# A plain template for models that ship none (base models): role-tagged turns, then the assistant tag.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass
class ModelInfo:
    name: str
    model_type: str
    layers: int
    hidden_size: int
    vocab_size: int
    params: int
    o_proj_in: int
    o_proj_out: int


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


class LocalModel:
    """One loaded transformers causal LM plus its tokenizer and (lazily) its LoRA injector."""

    def __init__(self, spec: ModelSpec, model: nn.Module, tokenizer, max_batch_size: int = 64) -> None:
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self._injector: LoRAInjector | None = None
        # "auto": the lean static-cache engine for known families (haps.models.decode.LEAN_FAMILIES), the
        # transformers forward otherwise; "hf": always the transformers forward (the reference); "lean".
        self.decode_engine: str = "auto"
        # prefill a prefix shared by rows of a batch (instructions, worked example) once per batch; rows
        # share only prefixes of at least this many tokens
        self.share_prefix: bool = True
        self.min_shared_prefix: int = 16
        # the rest of each prompt runs in buckets of similar length; one more bucket (one more forward
        # call) is worth this many padded tokens saved
        self.bucket_overhead_tokens: int = 64
        self.last_stats: dict = {}
        # running totals over every generated batch (benchmarks read differences of these)
        self.totals: dict[str, float] = {}
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if spec.chat_template:
            tokenizer.chat_template = spec.chat_template
        elif not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        eos = set()
        for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
            if isinstance(src, int):
                eos.add(src)
            elif src:
                eos.update(int(e) for e in src)
        self.eos_ids = eos

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, spec: ModelSpec, cache_dir=None, max_batch_size: int = 64) -> LocalModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = resolve(spec, cache_dir)
        try:
            tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
            model = AutoModelForCausalLM.from_pretrained(
                src.path, gguf_file=src.gguf_file, dtype=getattr(torch, spec.dtype)
            )
        except OSError as e:
            raise ModelLoadError(f"model {spec.name!r}: cannot load from {src.path!r}: {e}") from e
        model.eval().requires_grad_(False)
        return cls(spec, model, tok, max_batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def info(self) -> ModelInfo:
        cfg = self.model.config
        inj = self.injector(LoraTarget(last_k_layers=1)) if self._injector is None else self._injector
        d_out, d_in = inj.shapes[-1]
        return ModelInfo(
            name=self.spec.name, model_type=cfg.model_type, layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
            params=sum(p.numel() for p in self.model.parameters()), o_proj_in=d_in, o_proj_out=d_out,
        )

    def injector(self, target: LoraTarget) -> LoRAInjector:
        """The LoRA wrappers for ``target`` (created once; a different target re-wraps)."""
        if self._injector is None or self._injector.target != target:
            self._injector = LoRAInjector(self.model, target)
        return self._injector

    # ------------------------------------------------------------------ prompts
    def render(self, req: GenRequest) -> str:
        """The exact text the model continues: the raw prompt, or the chat template with the generation
        prompt; then ``req.response_prefix``."""
        if req.prompt is not None:
            return req.prompt + req.response_prefix
        text = self.tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        return text + req.response_prefix

    def encode(self, req: GenRequest) -> tuple[str, list[int]]:
        text = self.render(req)
        # chat templates write their own special tokens; raw prompts get the tokenizer's (e.g. BOS)
        ids = self.tokenizer(text, add_special_tokens=req.prompt is not None)["input_ids"]
        return text, list(ids)

    def _left_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return left_pad(seqs, self.tokenizer.pad_token_id, self.device)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, requests: Sequence[GenRequest], target: LoraTarget | None = None,
                 seed: int | None = None) -> list[Generation]:
        """Generate for all requests, in length-sorted chunks of at most ``max_batch_size`` rows."""
        if not requests:
            return []
        if any(r.adapter is not None for r in requests):
            if not self.spec.open_weights:
                raise ConfigError(f"model {self.spec.name!r} is closed: it takes no adapters.")
            if target is None:
                raise ConfigError("requests carry adapters but no LoraTarget was given.")
        encoded = [self.encode(r) for r in requests]
        for i, (_, ids) in enumerate(encoded):
            if not ids:
                raise ConfigError(
                    f"request {i} renders to an empty prompt (no tokens; this tokenizer adds no BOS): "
                    "give a non-empty prompt or messages."
                )
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i][1]))
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        else:
            gen.seed()  # non-deterministic, and leaves the global torch RNG alone
        results: list[Generation | None] = [None] * len(requests)
        for start in range(0, len(order), self.max_batch_size):
            idx = order[start:start + self.max_batch_size]
            outs = self._generate_batch([requests[i] for i in idx], [encoded[i] for i in idx], target, gen)
            for i, o in zip(idx, outs, strict=True):
                results[i] = o
        return results  # type: ignore[return-value]

    def _engine(self, max_new: int):
        """The decode engine for one batch: `LeanDecode` for known families, else the reference `HFDecode`."""
        from haps.models.decode import HFDecode, LeanDecode

        if self.decode_engine == "hf" or (self.decode_engine == "auto" and not LeanDecode.supports(self.model)):
            return HFDecode(self.model)
        if not LeanDecode.supports(self.model):
            raise ConfigError(
                f"decode_engine='lean' does not support model_type {self.model.config.model_type!r}; "
                "use decode_engine='auto' or 'hf'."
            )
        return LeanDecode(self.model, max_new)

    def _generate_batch(self, reqs, encoded, target, gen) -> list[Generation]:
        tok = self.tokenizer
        b = len(reqs)
        inj = self.injector(target) if target is not None else self._injector
        stacked = inj.stack([r.adapter for r in reqs], self.device, self.model.dtype) if inj else None
        if inj is not None:
            inj.set(stacked)
        temps = torch.tensor([max(r.temperature, 0.0) for r in reqs])
        top_ps = torch.tensor([r.top_p for r in reqs])
        max_new = [r.max_new_tokens for r in reqs]
        want_logprobs = [r.logprobs for r in reqs]
        stops = [r.stop for r in reqs]
        tail_tokens = [max((len(s) for s in st), default=0) + 2 for st in stops]
        out_ids: list[list[int]] = [[] for _ in range(b)]
        out_lp: list[list[float]] = [[] for _ in range(b)]
        finish: list[str | None] = [None] * b
        # batch row -> request index, or -req-2 for a finished row still in the batch. Finished rows leave
        # the batch (cache, positions and adapters compacted): at once where the engine compacts in place
        # (it copies only the live rows that move into the holes), else once they are an eighth of it (a
        # full cache copy costs more than carrying a few idle rows).
        rows = list(range(b))
        engine = self._engine(max(max_new))
        eager_compaction = getattr(engine, "compacts_in_place", False)
        t0 = time.perf_counter()
        steps = 0
        try:
            out, prefill_stats = self._prefill(engine, [e[1] for e in encoded], reqs, inj, stacked)
            t_prefill = time.perf_counter()
            while True:
                live = [j for j, i in enumerate(rows) if i >= 0]
                want_lp = any(want_logprobs[rows[j]] for j in live)
                if len(live) == len(rows):
                    tokens, lps = engine.pick(out, temps[rows], top_ps[rows], gen, want_lp)
                else:  # sample only live rows; idle rows feed their last token back
                    lt, ll = engine.pick(out[live], temps[[rows[j] for j in live]],
                                        top_ps[[rows[j] for j in live]], gen, want_lp)
                    tokens = [out_ids[i][-1] if i >= 0 else out_ids[-i - 2][-1] for i in rows]
                    lps = [0.0] * len(rows)
                    for j, t, p in zip(live, lt, ll, strict=True):
                        tokens[j], lps[j] = t, p
                n_done = 0
                for j in live:
                    req_i = rows[j]
                    t = tokens[j]
                    out_ids[req_i].append(t)
                    out_lp[req_i].append(lps[j])
                    if t in self.eos_ids:
                        finish[req_i] = "eos"
                    elif stops[req_i] and any(
                        s in tok.decode(out_ids[req_i][-tail_tokens[req_i]:]) for s in stops[req_i]
                    ):
                        finish[req_i] = "stop"
                    elif len(out_ids[req_i]) >= max_new[req_i]:
                        finish[req_i] = "length"
                    if finish[req_i] is not None:
                        rows[j] = -req_i - 2  # idle: remembers its request for the token it feeds back
                        n_done += 1
                n_live = len(live) - n_done
                if n_live == 0:
                    break
                step_tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)  # (b',)
                n_idle = len(rows) - n_live
                if n_idle and (eager_compaction or n_idle * 8 >= len(rows)):  # finished rows leave the batch
                    keep_l = _fill_holes(rows)
                    keep = torch.tensor(keep_l, device=self.device)
                    rows = [rows[j] for j in keep_l]
                    engine.select_rows(keep)
                    step_tokens = step_tokens.index_select(0, keep)
                    if inj is not None and stacked is not None:
                        inj.select_rows(keep)
                out = engine.step(step_tokens)
                steps += 1
        finally:
            if inj is not None:
                inj.set(None)
        t_end = time.perf_counter()
        # timings of this batch for benchmarks: prefill (incl. the first token) and the decode steps
        self.last_stats = {"engine": type(engine).__name__, "rows": b, **prefill_stats,
                           "prefill_s": t_prefill - t0, "decode_s": t_end - t_prefill, "decode_steps": steps,
                           "decode_tokens": sum(len(o) for o in out_ids) - b,
                           "prompt_tokens": sum(len(e[1]) for e in encoded)}
        for key in ("rows", "prefill_tokens", "prompt_tokens", "prefill_s", "decode_s", "decode_steps",
                    "decode_tokens"):
            self.totals[key] = self.totals.get(key, 0) + self.last_stats[key]
        self.totals["batches"] = self.totals.get("batches", 0) + 1
        results = []
        for i in range(len(reqs)):
            ids_i = out_ids[i]
            body = ids_i[:-1] if finish[i] == "eos" else ids_i
            text = tok.decode(body, skip_special_tokens=True)
            if finish[i] == "stop":
                cut = min((text.find(s) for s in stops[i] if s in text), default=-1)
                if cut >= 0:
                    text = text[:cut]
            n_in, n_out = len(encoded[i][1]), len(ids_i)
            results.append(Generation(
                text=text, model=self.spec.name, token_ids=ids_i, logprobs=out_lp[i] if want_logprobs[i] else [],
                prompt_tokens=n_in,
                completion_tokens=n_out, finish_reason=finish[i] or "length",
                cost=self.spec.cost(n_in, n_out), prompt_text=encoded[i][0],
            ))
        return results

    # ------------------------------------------------------------------ prefill: shared prefixes, ragged bodies
    def _prefill(self, engine, seqs: list[list[int]], reqs, inj, stacked) -> tuple[torch.Tensor, dict]:
        """Prefill ``seqs`` (b rows) into ``engine``; returns the engine's last-position output (what
        ``engine.pick`` takes: logits (b, V), or hidden states for `LeanDecode`) and stats.

        Plain prefill is one left-padded batch of width max(len). With ``share_prefix`` (and b > 1), three
        stages give the same keys, values and logits (up to float rounding) with less compute:

        1. prefixes: rows are grouped by a common token prefix (`plan_prefix_groups`; rows with different
           adapters never share); each group's prefix runs once at batch 1;
        2. bodies: each row's tokens past its prefix, except the last, run in buckets of similar length
           (`plan_length_buckets`);
        3. last tokens: one token per row through the engine, as its first decode step.

        With an engine that takes shared prefixes (`LeanDecode` with its own layer steps) each group's prefix
        stays one copy (`SharedPrefix`); the row buffers hold only what follows it, right-aligned, and each
        bucket is a left-padded `prefill_block` that attends over the prefix copy and writes its keys/values
        straight into the rows' buffers. Otherwise (`HFDecode`) each bucket is a forward over its rows' prefix
        keys/values copied per row (a row shorter than its bucket recomputes a few prefix tokens rather than
        padding mid-row), assembled into a cache of width max(len) - 1 laid out as plain left padding, so
        that positions and sliding windows (applied by the masks: the caches are config-less, all layers
        full) see the same keys as in plain prefill.
        """
        b = len(seqs)
        lengths = [len(s) for s in seqs]
        plain_len = max(lengths)

        def plain() -> tuple[torch.Tensor, dict]:
            ids, mask = self._left_pad(seqs)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, L)
            return engine.prefill(ids, mask, pos), {"prompt_len": plain_len, "prefill_tokens": b * plain_len,
                                                    "prefix_groups": 0, "buckets": 1}

        P = plain_len - 1  # width of the assembled cache
        if not self.share_prefix or b == 1 or P == 0:
            return plain()
        from transformers import DynamicCache

        groups = [g for g in self._prefix_groups(seqs, reqs) if g.length > 0]
        covered = [0] * b  # prefix length of each row's group (0: no group)
        for g in groups:
            for r in g.rows:
                covered[r] = g.length
        body = [lengths[r] - 1 - covered[r] for r in range(b)]
        buckets = plan_length_buckets(body, self.bucket_overhead_tokens)
        if not groups and len(buckets) <= 1:  # nothing to save over one padded batch
            return plain()
        group_kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # row -> its group's (1, h, n, d)
        computed = 0
        for g in groups:
            kv = self._prefix_kv(list(g.tokens), reqs[g.rows[0]].adapter, inj, stacked, engine)
            if kv is None:  # a cache layout we cannot pre-fill
                return plain()
            computed += g.length
            for r in g.rows:
                group_kv[r] = kv
        # the assembled cache: the engine's own static buffers where it has them (no second copy), else
        # (b, h_kv, P, d) tensors that go to the engine as a DynamicCache. An engine that takes shared
        # prefixes keeps each group's prefix once (the batch-1 keys/values above); its row buffers then
        # hold only each row's positions after its prefix, ``skip[r]`` of them left out.
        shares = getattr(engine, "shares_prefixes", False)
        skip = covered if shares else [0] * b
        width = max(lengths[r] - 1 - skip[r] for r in range(b)) if shares else P
        static = engine.open_cache(b, width, self.model.get_output_embeddings().weight) if hasattr(
            engine, "open_cache") else None
        keys: list[torch.Tensor] = static.keys if static is not None else []
        values: list[torch.Tensor] = static.values if static is not None else []
        if shares:
            static.shared = [SharedPrefix(rows=torch.tensor(g.rows, device=self.device),
                                          keys=[k for k, _ in group_kv[g.rows[0]]],
                                          values=[v for _, v in group_kv[g.rows[0]]]) for g in groups]

        def place(r: int, layer_kv: list[tuple[torch.Tensor, torch.Tensor]], j: int) -> None:
            """Row r's positions skip[r]..len-2 are the last ones of ``layer_kv``'s row j: right-align them."""
            n = lengths[r] - 1 - skip[r]
            if not keys:
                keys.extend(k.new_zeros((b, k.shape[1], P, k.shape[3])) for k, _ in layer_kv)
                values.extend(v.new_zeros((b, v.shape[1], P, v.shape[3])) for _, v in layer_kv)
            if n == 0:
                return
            for layer, (k, v) in enumerate(layer_kv):
                keys[layer][r, :, width - n:width] = k[j, :, k.shape[2] - n:]
                values[layer][r, :, width - n:width] = v[j, :, v.shape[2] - n:]

        for r in range(b):
            if body[r] == 0 and lengths[r] > 1 and not shares:  # the prefix is all of the row but its last token
                place(r, group_kv[r], 0)
        for rows in buckets:
            T = max(body[r] for r in rows)
            if shares:  # the block's tokens attend to their prefix's single copy: nothing is recomputed or copied
                ids, valid = self._left_pad([seqs[r][covered[r]:lengths[r] - 1] for r in rows])
                offset = torch.tensor([covered[r] - (T - body[r]) for r in rows], device=self.device)
                pos = (offset[:, None] + torch.arange(T, device=self.device)[None]).clamp(min=0)  # (n, T) absolute
                with self._adapters_of(inj, [reqs[r].adapter for r in rows], stacked):
                    engine.prefill_block(static, torch.tensor(rows, device=self.device), ids, valid.bool(), pos,
                                         width - T)
                computed += len(rows) * T
                continue
            cached = [max(0, lengths[r] - 1 - T) for r in rows]  # <= covered[r], since body[r] <= T
            Pk = max(cached)
            past = DynamicCache()
            if Pk:
                for layer in range(len(next(iter(group_kv.values())))):
                    k0, v0 = group_kv[next(r for r, c in zip(rows, cached, strict=True) if c)][layer]
                    kb = k0.new_zeros((len(rows), k0.shape[1], Pk, k0.shape[3]))
                    vb = v0.new_zeros((len(rows), v0.shape[1], Pk, v0.shape[3]))
                    for j, (r, c) in enumerate(zip(rows, cached, strict=True)):
                        if c:
                            kb[j, :, Pk - c:] = group_kv[r][layer][0][0, :, :c]
                            vb[j, :, Pk - c:] = group_kv[r][layer][1][0, :, :c]
                    past.update(kb, vb, layer)
            ids, in_mask = self._left_pad([seqs[r][c:lengths[r] - 1] for r, c in zip(rows, cached, strict=True)])
            pmask = torch.zeros((len(rows), Pk), dtype=in_mask.dtype, device=in_mask.device)
            for j, c in enumerate(cached):
                pmask[j, Pk - c:] = 1
            mask = torch.cat([pmask, in_mask], dim=1)  # (n, Pk + T): left padding only
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, Pk:]
            layer_kv = self._decoder_kv(ids, [reqs[r].adapter for r in rows], inj, stacked, mask, pos, past)
            if layer_kv is None:
                return plain()
            computed += len(rows) * T
            for j, r in enumerate(rows):
                place(r, layer_kv, j)
            del past, layer_kv
        last = torch.tensor([[s[-1]] for s in seqs], dtype=torch.long, device=self.device)  # (b, 1)
        mask = torch.zeros((b, width + 1), dtype=torch.long, device=self.device)
        for r, n in enumerate(lengths):
            mask[r, width + 1 - (n - skip[r]):] = 1
        pos = torch.tensor([[n - 1] for n in lengths], dtype=torch.long, device=self.device)
        if static is not None:
            out = engine.start(static, last[:, 0], mask, pos[:, 0])
        else:
            cache = DynamicCache()
            for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
                cache.update(k, v, layer)
            out = engine.prefill(last, mask, pos, past=cache)
        return out, {"prompt_len": plain_len, "prefill_tokens": computed + b, "prefix_groups": len(groups),
                        "buckets": len(buckets), "inlined_prefixes": getattr(engine, "inlined_prefixes", 0)}

    def _prefix_groups(self, seqs: list[list[int]], reqs) -> list[PrefixGroup]:
        """Groups of rows sharing a prefix of at least ``min_shared_prefix`` tokens (same adapter)."""
        keys = [id(r.adapter) if r.adapter is not None else None for r in reqs]
        return plan_prefix_groups(seqs, keys, min_prefix=self.min_shared_prefix)

    @contextmanager
    def _adapters_of(self, inj, adapters, stacked) -> Iterator[None]:
        """The LoRA wrappers hold ``adapters`` (one per row of a sub-batch) inside, the batch's ``stacked`` after."""
        try:
            if inj is not None:
                inj.set(inj.stack(adapters, self.device, self.model.dtype))
            yield
        finally:
            if inj is not None:
                inj.set(stacked)

    def _prefix_kv(self, tokens: list[int], adapter, inj, stacked,
                   engine=None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Keys and values, per layer (1, h_kv, n, d), of one prefix run at batch 1 with ``adapter``: as a
        `prefill_block` of ``engine`` where it takes shared prefixes, else through the decoder's forward."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        if getattr(engine, "shares_prefixes", False):
            n = len(tokens)
            cache = engine.open_cache(1, n, self.model.get_output_embeddings().weight)
            with self._adapters_of(inj, [adapter], stacked):
                engine.prefill_block(cache, torch.zeros(1, dtype=torch.long, device=self.device), ids,
                                     torch.ones_like(ids, dtype=torch.bool), torch.arange(n, device=self.device)[None], 0)
            return [(k[:, :, :n], v[:, :, :n]) for k, v in zip(cache.keys, cache.values, strict=True)]
        return self._decoder_kv(ids, [adapter], inj, stacked)

    def _decoder_kv(self, ids: torch.Tensor, adapters, inj, stacked, mask=None, pos=None,
                    past=None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Run the decoder on ``ids`` (n, T) after ``past`` (a config-less `DynamicCache`: every layer full,
        sliding windows come from the mask) with the rows' own ``adapters``, then put the batch's adapters
        ``stacked`` back. Returns each layer's keys and values (n, h_kv, P + T, d), or None if the model's
        cache is not made of full `DynamicLayer`s (the caller then prefills plainly)."""
        from transformers import DynamicCache

        past = past if past is not None else DynamicCache()
        n_before = past.get_seq_length()
        with self._adapters_of(inj, adapters, stacked):
            self.model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                                     use_cache=True)
        if not _full_layers(past, n_before + ids.shape[1]):
            return None
        return [(layer.keys, layer.values) for layer in past.layers]

    # ------------------------------------------------------------------ scoring (teacher forcing)
    def score(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
              adapters: Sequence[RowAdapter | None] | None = None, target: LoraTarget | None = None,
              chunk_bytes: int = 128 * 2**20) -> torch.Tensor:
        """Summed log-probs of each completion given its prompt, with gradients to the adapters.

        Returns (b,). The head runs on chunks of at most ``chunk_bytes`` of logits, recomputed in
        backward (checkpointing), so peak memory holds one chunk, not (sum T, V).
        """
        if len(prompt_ids) != len(completion_ids):
            raise ConfigError(f"score: {len(prompt_ids)} prompts but {len(completion_ids)} completions.")
        empty = [i for i, p in enumerate(prompt_ids) if len(p) == 0]
        if empty:
            raise ConfigError(
                f"score: row {empty[0]} has an empty prompt; the first completion token needs at least one "
                "prompt token (e.g. BOS) to be predicted from."
            )
        seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
        ids, mask = self._left_pad(seqs)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        L = ids.shape[1]
        rows, cols, targets = [], [], []
        for i, c in enumerate(completion_ids):
            n = len(c)
            rows += [i] * n
            cols += list(range(L - 1 - n, L - 1))  # position t predicts token t+1
            targets += list(c)
        inj = None
        if adapters is not None and any(a is not None for a in adapters):
            if target is None:
                raise ConfigError("score: adapters given but no LoraTarget.")
            inj = self.injector(target)
        elif self._injector is not None:
            inj = self._injector
        try:
            if inj is not None:
                inj.set(inj.stack(adapters, self.device, self.model.dtype) if adapters is not None else None)
            hidden = self.model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos,
                                              use_cache=False).last_hidden_state  # (b, L, d)
        finally:
            if inj is not None:
                inj.set(None)
        if not targets:
            return hidden.new_zeros(len(seqs))
        h = hidden[torch.tensor(rows), torch.tensor(cols)]  # (N, d)
        tgt = torch.tensor(targets, device=h.device)  # (N,)
        head = self.model.get_output_embeddings()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        V = head.weight.shape[0]
        step = max(1, chunk_bytes // (V * 4 * 2))
        token_lp = torch.cat([
            _chunk_logprob(h[s:s + step], tgt[s:s + step], head, cap) for s in range(0, h.shape[0], step)
        ])  # (N,)
        out = hidden.new_zeros(len(seqs))
        return out.index_add(0, torch.tensor(rows, device=h.device), token_lp)


def _fill_holes(rows: list[int]) -> list[int]:
    """Batch rows to keep, in their new order: the m live rows (``rows[j] >= 0``) in slots 0..m-1, where each
    finished row below m is replaced by a live row from the end. Every ``keep[j] >= j``, so caches can move
    the few replacing rows in place instead of copying the batch."""
    m = sum(1 for i in rows if i >= 0)
    donors = iter(j for j in range(m, len(rows)) if rows[j] >= 0)
    return [j if rows[j] >= 0 else next(donors) for j in range(m)]


def _full_layers(cache, n: int) -> bool:
    """Whether every layer of ``cache`` is a plain `DynamicLayer` holding all ``n`` positions."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer and layer.keys.shape[2] == n for layer in cache.layers)


def _head_logprob(h: torch.Tensor, tgt: torch.Tensor, weight: torch.Tensor, bias, cap) -> torch.Tensor:
    logits = torch.nn.functional.linear(h, weight, bias).float()  # (n, V)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _chunk_logprob(h, tgt, head: nn.Linear, cap) -> torch.Tensor:
    if torch.is_grad_enabled() and h.requires_grad:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(_head_logprob, h, tgt, head.weight, head.bias, cap, use_reentrant=False)
    return _head_logprob(h, tgt, head.weight, head.bias, cap)

