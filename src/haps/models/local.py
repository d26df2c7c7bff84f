"""Local backend: any Hugging Face causal LM through transformers, batched, with per-request LoRA.

`LocalModel.generate` turns requests into rows of a batch and rows into generations: it renders and
tokenises each prompt, rejects a row whose prompt plus ``max_new_tokens`` exceeds the model's context
window (or trims the prompt's middle when the request allows it), stacks the rows' adapters into one
`AdapterBatch`, and runs the decode loop over a `haps.models.engine.DecodeEngine` (prefill, then one
token per step; every row finishes on its own at EOS, a stop string or its token limit; finished rows
leave the batch; greedy or temperature/top-p sampling per row; per-token log-probs when asked for).

`LocalModel.score` recomputes summed log-probs of given completions with gradients to the adapters
(teacher forcing), with the vocabulary projection chunked and checkpointed so a 262k-token head never
holds (T, V) logits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch
from torch import nn

from haps.config import LoraTarget, ModelSpec
from haps.errors import ConfigError, ModelLoadError
from haps.models.adapters import AdapterBatch, adapters_in_scope
from haps.models.engine import DecodeEngine, DecodeOptions, plan_prefill
from haps.models.engines import make_engine
from haps.models.lora import LoraSites, changes_keys_values, inject, lora_sites
from haps.models.padding import left_pad
from haps.models.picking import token_logprobs
from haps.models.rows import Row, context_window, fill_holes, fit_to_window, kept_states, stop_tail
from haps.models.sources import resolve
from haps.models.substack import hidden_from_states
from haps.models.templates import PLAIN_CHAT_TEMPLATE
from haps.models.types import Generation, GenRequest, ModelInfo, RowAdapter


class LocalModel:
    """One loaded transformers causal LM plus its tokenizer; wraps LoRA targets on first use."""

    def __init__(self, spec: ModelSpec, model: nn.Module, tokenizer, max_batch_size: int = 64,
                 options: DecodeOptions | None = None) -> None:
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.options = options or DecodeOptions()
        self.context_window = context_window(model)
        self._wrap_lock = threading.Lock()
        self._stats_lock = threading.Lock()
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
                src.path, gguf_file=src.gguf_file, dtype=getattr(torch, spec.weights_dtype)
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
        d_out, d_in = lora_sites(self.model, LoraTarget(last_k_layers=1)).shapes[-1]
        return ModelInfo(
            name=self.spec.name, model_type=cfg.model_type, layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
            params=sum(p.numel() for p in self.model.parameters()), o_proj_in=d_in, o_proj_out=d_out,
            context_window=self.context_window or 0,
        )

    # ------------------------------------------------------------------ adapters
    def lora_sites(self, target: LoraTarget) -> LoraSites:
        """Where ``target``'s adapters go in this model: layer indices and (d_out, d_in) of each projection."""
        return lora_sites(self.model, target)

    def adapter_batch(self, adapters: Sequence[RowAdapter | None], target: LoraTarget | None) -> AdapterBatch | None:
        """The rows' adapters stacked for one call (None when no row has one); wraps ``target``'s sites once."""
        if all(a is None for a in adapters):
            return None
        self._check_adapters(target)
        with self._wrap_lock:  # wrapping changes the module tree: once per target, never during a forward
            sites = inject(self.model, target)
        return AdapterBatch.from_rows(adapters, sites.layers, sites.shapes, target.alpha, target.rank,
                                      device=self.device, dtype=self.model.dtype, strategy=self.options.lora_strategy)

    def _check_adapters(self, target: LoraTarget | None) -> None:
        if not self.spec.open_weights:
            raise ConfigError(f"model {self.spec.name!r} is closed: it takes no adapters.")
        if target is None:
            raise ConfigError("requests carry adapters but no LoraTarget was given.")

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

    def fit_context(self, req: GenRequest, ids: list[int]) -> tuple[list[int], str | None]:
        """``ids`` fitted to this model's context window (`haps.models.rows.fit_to_window`)."""
        return fit_to_window(ids, req, self.context_window, self.spec.name)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, requests: Sequence[GenRequest], target: LoraTarget | None = None,
                 seed: int | None = None) -> list[Generation]:
        """Generate for all requests, in length-sorted chunks of at most ``max_batch_size`` rows. A request
        that does not fit the context window gets an error `Generation`; the other rows are unaffected."""
        if not requests:
            return []
        if any(r.adapter is not None for r in requests):
            self._check_adapters(target)
        results: list[Generation | None] = [None] * len(requests)
        rows: dict[int, Row] = {}
        for i, req in enumerate(requests):
            text, ids = self.encode(req)
            if not ids:
                raise ConfigError(f"request {i} renders to an empty prompt (no tokens; this tokenizer adds no BOS): "
                                  "give a non-empty prompt or messages.")
            ids, error = self.fit_context(req, ids)
            if error is not None:
                results[i] = Generation(text="", model=self.spec.name, prompt_tokens=len(ids), finish_reason="error",
                                        error=error, prompt_text=text)
            else:
                rows[i] = Row(text, ids)
        order = sorted(rows, key=lambda i: len(rows[i].prompt_ids))
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        else:
            gen.seed()  # non-deterministic, and leaves the global torch RNG alone
        for start in range(0, len(order), self.max_batch_size):
            idx = order[start:start + self.max_batch_size]
            outs = self._generate_batch([requests[i] for i in idx], [rows[i] for i in idx], target, gen)
            for i, o in zip(idx, outs, strict=True):
                results[i] = o
        return results  # type: ignore[return-value]

    def _generate_batch(self, reqs: list[GenRequest], rows: list[Row], target: LoraTarget | None,
                        gen: torch.Generator) -> list[Generation]:
        adapters = self.adapter_batch([r.adapter for r in reqs], target)
        keep = any(r.keep_states and r.adapter is not None for r in reqs)
        first = min(self.lora_sites(target).layers) if keep else None
        engine = make_engine(self.model, self.options.engine, max(r.max_new_tokens for r in reqs),
                             self.tokenizer.pad_token_id, first)
        t0 = time.perf_counter()
        plan = plan_prefill([r.prompt_ids for r in rows], self.options, adapters,
                            target is None or changes_keys_values(target))
        out = engine.prefill(plan, adapters)
        if keep and engine.captures_states:
            for row, state in zip(rows, engine.prompt_states, strict=True):
                row.states.append(state)
        t_prefill = time.perf_counter()
        steps = self._decode(engine, out, reqs, rows, adapters, gen)
        self._record_stats({"engine": type(engine).__name__, "rows": len(rows), **plan.stats(),
                            "inlined_prefixes": engine.inlined_prefixes, "prefill_s": t_prefill - t0,
                            "decode_s": time.perf_counter() - t_prefill, "decode_steps": steps,
                            "decode_tokens": sum(len(r.out_ids) for r in rows) - len(rows),
                            "prompt_tokens": sum(len(r.prompt_ids) for r in rows)})
        return [self._generation(req, row, first if keep and engine.captures_states else None)
                for req, row in zip(reqs, rows, strict=True)]

    def _decode(self, engine: DecodeEngine, out: torch.Tensor, reqs: list[GenRequest], rows: list[Row],
                adapters: AdapterBatch | None, gen: torch.Generator) -> int:
        """Pick and step until every row has finished; returns the number of decode steps.

        ``batch[j]`` is the request index of batch row j. Finished rows leave the batch (`fill_holes`) at once
        where the engine compacts in place, else once they are an eighth of it (a full cache copy costs more
        than carrying a few idle rows, which feed their last token back meanwhile).
        """
        temps = torch.tensor([max(r.temperature, 0.0) for r in reqs])
        top_ps = torch.tensor([r.top_p for r in reqs])
        batch = list(range(len(reqs)))
        live = [True] * len(reqs)
        steps = 0
        while True:
            idx = [j for j, on in enumerate(live) if on]
            req_idx = [batch[j] for j in idx]
            want_lp = any(reqs[i].logprobs for i in req_idx)
            picked = engine.pick(out if len(idx) == len(batch) else out[idx], temps[req_idx], top_ps[req_idx], gen,
                                 want_lp)
            tokens = [rows[i].out_ids[-1] if rows[i].out_ids else 0 for i in batch]
            for j, t, lp in zip(idx, *picked, strict=True):
                tokens[j] = t
                live[j] = self._append(reqs[batch[j]], rows[batch[j]], t, lp)
            if not any(live):
                return steps
            n_idle = live.count(False)
            if n_idle and (engine.compacts_in_place or n_idle * 8 >= len(batch)):
                keep_l = fill_holes(live)
                keep = torch.tensor(keep_l, device=self.device)
                batch, tokens, live = [batch[j] for j in keep_l], [tokens[j] for j in keep_l], [True] * len(keep_l)
                engine.select_rows(keep)
                adapters = None if adapters is None else adapters.select(keep)
            out = engine.step(torch.tensor(tokens, dtype=torch.long, device=self.device), adapters)
            if engine.step_states is not None:  # the fed tokens' kept states (every row here is live)
                for j, i in enumerate(batch):
                    rows[i].states.append(engine.step_states[j:j + 1])
            steps += 1

    def _append(self, req: GenRequest, row: Row, token: int, logprob: float) -> bool:
        """Add one generated token to ``row``; returns whether the row goes on."""
        row.out_ids.append(token)
        row.out_lp.append(logprob)
        if token in self.eos_ids:
            row.finish = "eos"
        elif req.stop and any(s in self.tokenizer.decode(row.out_ids[-stop_tail(req):]) for s in req.stop):
            row.finish = "stop"
        elif len(row.out_ids) >= req.max_new_tokens:
            row.finish = "length"
        if req.on_token is not None and req.on_token(token, row.finish is not None) is False and row.finish is None:
            row.finish = "length"  # stopped by its caller: nobody reads the rest
        return row.finish is None

    def _generation(self, req: GenRequest, row: Row, states_layer: int | None) -> Generation:
        body = row.out_ids[:-1] if row.finish == "eos" else row.out_ids
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        if row.finish == "stop":
            cut = min((text.find(s) for s in req.stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
        n_in, n_out = len(row.prompt_ids), len(row.out_ids)
        return Generation(text=text, model=self.spec.name, token_ids=row.out_ids,
                          logprobs=row.out_lp if req.logprobs else [], prompt_tokens=n_in, completion_tokens=n_out,
                          finish_reason=row.finish or "length", cost=self.spec.cost(n_in, n_out),
                          prompt_text=row.prompt_text, prompt_ids=row.prompt_ids,
                          **kept_states(req, row, states_layer))

    def _record_stats(self, stats: dict) -> None:
        """This batch's timings for benchmarks (prefill includes the first token), and the running totals."""
        with self._stats_lock:
            self.last_stats = stats
            for key in ("rows", "prefill_tokens", "prompt_tokens", "prefill_s", "decode_s", "decode_steps",
                        "decode_tokens"):
                self.totals[key] = self.totals.get(key, 0) + stats[key]
            self.totals["batches"] = self.totals.get("batches", 0) + 1

    # ------------------------------------------------------------------ scoring (teacher forcing)
    def score(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
              adapters: Sequence[RowAdapter | None] | None = None, target: LoraTarget | None = None,
              chunk_bytes: int = 128 * 2**20, temperature: float = 1.0, top_p: float = 1.0,
              states: Sequence[torch.Tensor] | None = None, states_layer: int | None = None) -> torch.Tensor:
        """Summed log-probs of each completion given its prompt, with gradients to the adapters.

        Returns (b,). Log-probs are those of the distribution sampling draws from: ``softmax(logits /
        temperature)`` renormalised over its top-``top_p`` nucleus (`haps.models.picking.token_logprobs`). The
        head runs on chunks of at most ``chunk_bytes`` of logits, recomputed in backward (checkpointing), so
        peak memory holds one chunk, not (sum T, V). With ``states`` (each row's kept `Generation.states`,
        entering decoder layer ``states_layer``, which must come before every adapted layer) only the layers
        from there on run (`haps.models.substack`): the same log-probs, up to float rounding.
        """
        if len(prompt_ids) != len(completion_ids):
            raise ConfigError(f"score: {len(prompt_ids)} prompts but {len(completion_ids)} completions.")
        empty = [i for i, p in enumerate(prompt_ids) if len(p) == 0]
        if empty:
            raise ConfigError(
                f"score: row {empty[0]} has an empty prompt; the first completion token needs at least one "
                "prompt token (e.g. BOS) to be predicted from."
            )
        if temperature <= 0:
            raise ConfigError(f"score: temperature must be > 0 (greedy decoding has no log-probs to train), "
                              f"got {temperature}.")
        batch = self.adapter_batch(list(adapters) if adapters is not None else [None] * len(prompt_ids), target)
        if states is not None:
            first = None if target is None else min(self.lora_sites(target).layers)
            hidden = hidden_from_states(self.model, prompt_ids, completion_ids, states, states_layer, first, batch)
            L, shift = hidden.shape[1], 0
        else:
            seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
            ids, mask = left_pad(seqs, self.tokenizer.pad_token_id, self.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            L, shift = ids.shape[1], 1
            with adapters_in_scope(batch):
                hidden = self.model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos,
                                                  use_cache=False).last_hidden_state  # (b, L, d)
        rows, cols, targets = [], [], []
        for i, c in enumerate(completion_ids):
            n = len(c)
            rows += [i] * n
            cols += list(range(L - shift - n, L - shift))  # position t predicts token t+1
            targets += list(c)
        if not targets:
            return hidden.new_zeros(len(prompt_ids), dtype=torch.float32)
        h = hidden[torch.tensor(rows), torch.tensor(cols)]  # (N, d)
        token_lp = token_logprobs(self.model.get_output_embeddings(), h, torch.tensor(targets, device=h.device),
                                  getattr(self.model.config, "final_logit_softcapping", None), temperature,
                                  top_p, chunk_bytes)  # (N,)
        out = token_lp.new_zeros(len(prompt_ids))  # fp32 (token_logprobs' dtype), whatever the model's
        return out.index_add(0, torch.tensor(rows, device=h.device), token_lp)
