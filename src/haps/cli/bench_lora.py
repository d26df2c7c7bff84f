"""`haps bench lora`: decode tokens/s with per-request LoRA (bmm injection vs row loop vs PEFT)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from haps.cli import bench_app
from haps.cli.common import check_out
from haps.files import write_json_atomic
from haps.progress import progress_bar


def results_table(data: dict) -> Table:
    t = Table(title=f"decode tokens/s (fp32 sgemm roofline {data['roofline_gflops']:.0f} GFLOP/s)")
    for col in ("model", "batch", "mode", "k", "tok/s", "x base", "roofline", "tokens equal"):
        t.add_column(col, justify="right" if col not in ("model", "mode") else "left")
    for r in data["records"]:
        same = r.get("same_tokens_as") or {}
        eq = f"{same['rows_equal']}/{same['rows']} vs {next(iter(same))}" if same else ""
        t.add_row(r["model"], str(r["batch"]), r["mode"] + (" (" + r["note"][:40] + ")" if r["note"] else ""),
                  str(r["layers"] or "-"), f"{r['tokens_per_s']:.1f}",
                  f"{r['ratio_to_base']:.3f}" if r["ratio_to_base"] else "-",
                  f"{100 * r['roofline_frac']:.1f}%" if r["roofline_frac"] else "-", eq)
    return t


def _csv(text: str, kind: type) -> list:
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"expected comma-separated {kind.__name__} values, got {text!r}.") from e


@bench_app.command("lora")
def bench_lora(
    out: Path = typer.Option(..., "--out", help="JSON file to write (one record per measurement)."),
    quick: bool = typer.Option(False, "--quick", help="Small subset (SmolLM2, batch 1 and 8, 8 tokens) for CI."),
    new_tokens: int = typer.Option(None, min=1, help="Tokens generated per row (default 32, quick 8)."),
    rounds: int = typer.Option(None, min=1, help="Interleaved rounds per batch; the best round is kept."),
    pool: str = typer.Option(None, help="Built-in pool name or pool YAML file (default tiny)."),
    models: str = typer.Option(None, help="Comma-separated pool model names (default: SmolLM2 and Gemma 3)."),
    batches: str = typer.Option(None, help="Comma-separated batch sizes (default 1,8,32,64)."),
    modes: str = typer.Option(None, help="Comma-separated modes out of base,base_hf,bmm,loop,peft."),
    layers: str = typer.Option(None, help="Comma-separated numbers of adapted last layers (default 1,2)."),
    dtype_batches: str = typer.Option(None, help="Comma-separated batches for the bf16 comparison ('' for none)."),
) -> None:
    """Decode tokens/s: no adapter vs per-request LoRA (batched matmul, row loop, PEFT), ratios to no adapter."""
    from haps.bench.lora import MODES, BenchConfig, quick_config, run_bench

    cfg = quick_config() if quick else BenchConfig()
    if pool:
        cfg.pool = pool
    if new_tokens:
        cfg.new_tokens = new_tokens
    if rounds:
        cfg.rounds = rounds
    if models:
        cfg.models = _csv(models, str)
    if batches:
        cfg.batches = _csv(batches, int)
    if modes:
        cfg.modes = _csv(modes, str)
        unknown = set(cfg.modes) - set(MODES)
        if unknown:
            raise typer.BadParameter(f"unknown modes {sorted(unknown)}; choose from {','.join(MODES)}.",
                                     param_hint="--modes")
        if "base" not in cfg.modes:
            cfg.modes.insert(0, "base")  # every ratio is to base
    if layers:
        cfg.layers = _csv(layers, int)
    if dtype_batches is not None:
        cfg.dtype_batches = _csv(dtype_batches, int) if dtype_batches.strip() else []
    check_out(out)
    console = Console()
    with progress_bar(console=console) as prog:
        n_modes = sum(1 if m in ("base", "base_hf") else len(cfg.layers) for m in cfg.modes)
        total = cfg.rounds * sum(len(cfg.batches) * n_modes + (len(cfg.dtype_batches) if i == 0 else 0)
                                 for i, _ in enumerate(cfg.models))
        task = prog.add_task("bench lora", total=total)

        def step(desc: str) -> None:
            prog.update(task, description=desc, advance=1)

        data = run_bench(cfg, progress=step, on_result=lambda d: write_json_atomic(out, d))
    write_json_atomic(out, data)
    console.print(results_table(data))
    console.print(f"wrote {out}")
