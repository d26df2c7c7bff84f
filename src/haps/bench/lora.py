"""Decode throughput with per-request LoRA: our batched-matmul injection against the alternatives.

For each model and batch size, in rounds (modes interleaved, in an order rotated every round, best
round kept, so that load from other processes and drift hit every mode alike), it times the decode
steps of `LocalModel.generate` (prefill excluded; every row generates exactly ``new_tokens`` tokens:
EOS is disabled for the run) in modes:

- ``base``: no adapter (the lean engine where the model family has one).
- ``base_hf``: no adapter, the reference transformers-forward engine (`DecodeOptions(engine="hf")`).
- ``bmm``: one random adapter per row in one `AdapterBatch` (two batched matmuls per wrapped layer).
- ``loop``: the same adapters applied row by row inside each wrapped layer (the naive way:
  ``y[i] = x[i] @ (W + alpha A_i B_i)^T`` for each row i, i.e. `reference_lora_forward`; the
  ``row_loop`` strategy of `DecodeOptions.lora_strategy`).
- ``peft``: PEFT LoRA layers on the same ``o_proj`` modules, one named adapter per row, mixed-batch
  inference (``adapter_names``) driven through the same decode loop.
- ``base_bf16``: no adapter, weights cast to bfloat16 (dtype comparison, first model only).

Each round also times a large fp32 sgemm; the best GFLOP/s of the run is the roofline, and each record
gives ``roofline_frac = tokens_per_s * 2 * params / roofline``. Greedy tokens are compared between
modes that must agree (base vs base_hf; bmm vs loop vs peft) and recorded.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from haps.bench.machine import cpu_info
from haps.config import LoraTarget
from haps.models.types import GenRequest, RowAdapter

PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
    "List three prime numbers.", "Who wrote Hamlet?", "Translate 'good morning' to Spanish.",
    "What is 17 times 23?", "Describe a cat in one sentence.",
]


# the modes a config may name (``base_bf16`` is added by ``dtype_batches``)
MODES = ("base", "base_hf", "bmm", "loop", "peft")


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["smollm2-135m", "gemma3-270m"])
    batches: list[int] = field(default_factory=lambda: [1, 8, 32, 64])
    layers: list[int] = field(default_factory=lambda: [1, 2])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    new_tokens: int = 32
    rounds: int = 2
    rank: int = 8
    dtype_batches: list[int] = field(default_factory=lambda: [1, 32])  # base_bf16, first model only
    gemm_n: int = 1536
    pool: str = "tiny"


@dataclass
class Record:
    model: str
    batch: int
    mode: str
    layers: int
    tokens_per_s: float
    ratio_to_base: float | None = None
    roofline_frac: float | None = None
    decode_s: float = 0.0
    decode_tokens: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    engine: str = ""
    dtype: str = "float32"
    same_tokens_as: dict = field(default_factory=dict)
    note: str = ""


def sgemm_gflops(n: int = 1536, reps: int = 3) -> float:
    """Best GFLOP/s of an (n x n) @ (n x n) fp32 matmul on this machine now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def _requests(batch: int, new_tokens: int, adapters: Sequence[RowAdapter | None] | None = None) -> list[GenRequest]:
    return [GenRequest(messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_new_tokens=new_tokens,
                       adapter=adapters[i] if adapters else None) for i in range(batch)]


def random_adapters(shapes: list[tuple[int, int]], batch: int, rank: int, seed: int = 0) -> list[RowAdapter]:
    g = torch.Generator().manual_seed(seed)
    return [RowAdapter(A=[torch.randn(o, rank, generator=g) * 0.05 for o, _ in shapes],
                       B=[torch.randn(rank, i, generator=g) * 0.05 for _, i in shapes]) for _ in range(batch)]


@contextmanager
def _no_eos(m):
    saved = m.eos_ids
    m.eos_ids = set()
    try:
        yield
    finally:
        m.eos_ids = saved


@contextmanager
def _options(m, **updates):
    """``m`` decodes with its `DecodeOptions` changed by ``updates`` inside the block."""
    saved = m.options
    m.options = saved.model_copy(update=updates)
    try:
        yield
    finally:
        m.options = saved


@contextmanager
def _peft(m, adapters: list[RowAdapter], target: LoraTarget):
    """PEFT LoRA on the same o_proj modules, one adapter per row, mixed-batch hooks active."""
    from peft import LoraConfig, get_peft_model

    from haps.models.lora import _decoder_layers, detach_lora
    from haps.quiet import peft_deprecations

    detach_lora(m.model)
    n_layers = len(_decoder_layers(m.model))
    idx = list(range(n_layers - target.last_k_layers, n_layers))
    names = [f"layers.{i}.{target.module_name}" for i in idx]
    cfg = LoraConfig(r=target.rank, lora_alpha=target.alpha * target.rank, target_modules=names, lora_dropout=0.0)
    with peft_deprecations():
        pm = get_peft_model(m.model, cfg, adapter_name="row0")
    for r in range(1, len(adapters)):
        pm.add_adapter(f"row{r}", cfg)
    mods = [pm.base_model.model.get_submodule(f"model.layers.{i}.{target.module_name}") for i in idx]
    with torch.no_grad():
        for r, a in enumerate(adapters):
            for li, mod in enumerate(mods):
                mod.lora_A[f"row{r}"].weight.copy_(a.B[li])  # (r, d_in): shrink
                mod.lora_B[f"row{r}"].weight.copy_(a.A[li])  # (d_out, r): expand
    pm.eval()
    try:  # PEFT's mixed-batch hooks need whole-batch forwards: no shared prefixes
        with _options(m, share_prefix=False), pm.base_model._enable_peft_forward_hooks(
                adapter_names=[f"row{r}" for r in range(len(adapters))]):
            yield
    finally:
        pm.base_model.unload()


def _timed_generate(m, reqs, target=None) -> tuple[list, dict]:
    with _no_eos(m):
        out = m.generate(reqs, target=target, seed=0)
    return out, dict(m.last_stats)


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None,
              on_result: Callable[[dict], None] | None = None) -> dict:
    """Run the benchmark; returns {"config", "roofline_gflops", "records": [Record as dict, ...]}."""
    from haps.config import load_pool
    from haps.models.pool import ModelPool

    pool = ModelPool(load_pool(cfg.pool))
    gemm: list[float] = []
    records: list[Record] = []
    for mi, name in enumerate(cfg.models):
        m = pool.backend(name)
        _params[name] = sum(p.numel() for p in m.model.parameters())
        for batch in cfg.batches:
            plan: list[tuple[str, int]] = []
            for mode in cfg.modes:
                if mode in ("base", "base_hf"):
                    plan.append((mode, 0))
                else:
                    plan += [(mode, k) for k in cfg.layers]
            if mi == 0 and batch in cfg.dtype_batches:
                plan.append(("base_bf16", 0))
            best: dict[tuple[str, int], Record] = {}
            tokens: dict[tuple[str, int], list] = {}
            # untimed warm-up at this batch size: the first timed mode must not pay one-time costs
            # (allocator growth, kernel/primitive setup for new shapes)
            _run_mode(m, "base", 0, batch, cfg)
            for rnd in range(cfg.rounds):
                gemm.append(sgemm_gflops(cfg.gemm_n))
                for mode, k in plan[rnd % len(plan):] + plan[:rnd % len(plan)]:  # rotated: no mode always first
                    if progress:
                        progress(f"{name} b={batch} {mode}{f' k={k}' if k else ''} round {rnd + 1}/{cfg.rounds}")
                    rec = Record(model=name, batch=batch, mode=mode, layers=k, tokens_per_s=0.0,
                                 new_tokens=cfg.new_tokens)
                    try:
                        out, st = _run_mode(m, mode, k, batch, cfg)
                    except Exception as e:  # record why a mode could not run, keep going
                        rec.note = f"failed: {type(e).__name__}: {e}"[:300]
                        best.setdefault((mode, k), rec)
                        continue
                    rec.decode_s, rec.decode_tokens = st["decode_s"], st["decode_tokens"]
                    rec.prompt_tokens, rec.engine = st["prompt_len"], st["engine"]
                    rec.tokens_per_s = st["decode_tokens"] / st["decode_s"] if st["decode_s"] > 0 else 0.0
                    rec.dtype = "bfloat16" if mode == "base_bf16" else str(m.model.dtype).replace("torch.", "")
                    tokens[(mode, k)] = [o.token_ids for o in out]
                    if (mode, k) not in best or rec.tokens_per_s > best[(mode, k)].tokens_per_s:
                        best[(mode, k)] = rec
            base = best.get(("base", 0))
            for (mode, k), rec in best.items():
                if base and base.tokens_per_s and rec.tokens_per_s:
                    rec.ratio_to_base = rec.tokens_per_s / base.tokens_per_s
                ref = {"base_hf": ("base", 0), "base_bf16": ("base", 0), "loop": ("bmm", k),
                       "peft": ("bmm", k)}.get(mode)
                if ref and ref in tokens and (mode, k) in tokens:
                    a, b = tokens[(mode, k)], tokens[ref]
                    rec.same_tokens_as = {f"{ref[0]}{f'_k{k}' if ref[1] else ''}": a == b,
                                          "rows_equal": sum(x == y for x, y in zip(a, b, strict=True)), "rows": len(a)}
                records.append(rec)
            if on_result:  # partial results after every (model, batch) group
                on_result(_result(cfg, gemm, records))
    return _result(cfg, gemm, records)


def _result(cfg: BenchConfig, gemm: list[float], records: list[Record]) -> dict:
    roof = max(gemm) if gemm else 0.0
    for rec in records:
        n = _params.get(rec.model)
        if n and roof and rec.tokens_per_s:
            rec.roofline_frac = rec.tokens_per_s * 2 * n / (roof * 1e9)
    return {"config": asdict(cfg), "roofline_gflops": roof, "sgemm_gflops_all": gemm, "params": dict(_params),
            "threads": torch.get_num_threads(), "cpu": cpu_info(), "records": [asdict(r) for r in records]}


_params: dict[str, int] = {}
_bf16_models: dict[str, object] = {}


def _run_mode(m, mode: str, k: int, batch: int, cfg: BenchConfig) -> tuple[list, dict]:
    from haps.models.local import LocalModel

    if mode == "base":
        return _timed_generate(m, _requests(batch, cfg.new_tokens))
    if mode == "base_hf":
        with _options(m, engine="hf"):
            return _timed_generate(m, _requests(batch, cfg.new_tokens))
    if mode == "base_bf16":
        if m.spec.name not in _bf16_models:
            from haps.models.lora import detach_lora

            model = copy.deepcopy(m.model).to(torch.bfloat16)
            detach_lora(model)
            _bf16_models[m.spec.name] = LocalModel(m.spec, model, m.tokenizer, m.max_batch_size)
        return _timed_generate(_bf16_models[m.spec.name], _requests(batch, cfg.new_tokens))
    target = LoraTarget(last_k_layers=k, rank=cfg.rank)
    adapters = random_adapters(list(m.lora_sites(target).shapes), batch, cfg.rank)
    if mode == "bmm":
        return _timed_generate(m, _requests(batch, cfg.new_tokens, adapters), target)
    if mode == "loop":
        with _options(m, lora_strategy="row_loop"):
            return _timed_generate(m, _requests(batch, cfg.new_tokens, adapters), target)
    if mode == "peft":
        with _peft(m, adapters, target):
            return _timed_generate(m, _requests(batch, cfg.new_tokens))
    raise ValueError(f"unknown mode {mode!r}")


def quick_config() -> BenchConfig:
    return BenchConfig(models=["smollm2-135m"], batches=[1, 8], layers=[1], modes=list(MODES),
                       new_tokens=8, rounds=1, dtype_batches=[8], gemm_n=1024)


def markdown_table(data: dict) -> str:
    """The records as a Markdown table (for README)."""
    lines = [f"fp32 sgemm roofline measured in the same run: {data['roofline_gflops']:.0f} GFLOP/s "
             f"({data.get('threads', '?')} threads); roofline = tokens/s x 2 x params / that.", "",
             "| model | batch | mode | last k | tokens/s | x base | roofline | greedy tokens equal |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in data["records"]:
        same = r.get("same_tokens_as") or {}
        eq = f"{same['rows_equal']}/{same['rows']} rows vs {next(iter(same))}" if same else ""
        mode = r["mode"] + (f" ({r['note']})" if r["note"] else "")
        lines.append(f"| {r['model']} | {r['batch']} | {mode} | {r['layers'] or '-'} | {r['tokens_per_s']:.1f} | "
                     + (f"{r['ratio_to_base']:.3f}" if r["ratio_to_base"] else "-") + " | "
                     + (f"{100 * r['roofline_frac']:.1f}%" if r["roofline_frac"] else "-") + f" | {eq} |")
    return "\n".join(lines)
