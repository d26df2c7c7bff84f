"""`haps bench serve`: a live `haps serve` under 1, 8 and 32 concurrent openai clients, dynamic batching on vs
off side by side (`haps.bench.serve`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from haps.cli import bench_app
from haps.cli.common import check_out
from haps.files import write_json_atomic


def results_table(data: dict) -> Table:
    from haps.bench.serve import find

    cpu = data["cpu"]
    t = Table(title=f"haps serve, {data['config']['max_tokens']} tokens per request ({cpu.get('model_name')}, "
                    f"{cpu.get('cpus')} CPUs)")
    for col in ("model", "clients", "on req/s", "off req/s", "x", "on p50/p99 ms", "off p50/p99 ms", "errors",
                "router share on/off", "rows/call on"):
        t.add_column(col, justify="left" if col == "model" else "right")
    recs = data["records"]
    for model in dict.fromkeys(r["model"] for r in recs):
        for n in data["config"]["clients"]:
            on = find(recs, model, "on", n) or {}
            off = find(recs, model, "off", n) or {}

            def share(r):
                return "-" if r.get("router_share") is None else f"{100 * r['router_share']:.0f}%"

            t.add_row(model, str(n), str(on.get("requests_per_s", "-")), str(off.get("requests_per_s", "-")),
                      str(data["speedup_on_vs_off"].get(model, {}).get(str(n), "-")),
                      f"{on.get('p50_ms', '-')}/{on.get('p99_ms', '-')}",
                      f"{off.get('p50_ms', '-')}/{off.get('p99_ms', '-')}",
                      str(on.get("errors", 0) + off.get("errors", 0)), f"{share(on)}/{share(off)}",
                      str(on.get("rows_per_generate", "-")))
    return t


def _csv_ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}.") from None
    if not vals or any(v < 1 for v in vals):
        raise typer.BadParameter(f"expected client counts >= 1, got {text!r}.")
    return vals


@bench_app.command("serve")
def bench_serve(
    out: Path = typer.Option(Path("benchmarks/results/serve.json"), "--out", help="JSON file to write."),
    quick: bool = typer.Option(False, "--quick", help="Smoke run: 1 and 2 clients, 2 requests each, 4 tokens."),
    pool: str = typer.Option(None, help="Built-in pool name or pool YAML file (default tiny)."),
    router: str = typer.Option(None, help="Router checkpoint folder (default: the untrained router)."),
    model: str = typer.Option(None, help="Comma-separated models the clients ask for, each measured on its own "
                                         "(default: haps and '*', the pool's first model; haps/<workflow> works too)."),
    clients: str = typer.Option(None, help="Comma-separated concurrent client counts (default 1,8,32)."),
    requests_per_client: int = typer.Option(None, min=1, help="Requests each client sends in turn (default 4)."),
    max_tokens: int = typer.Option(None, min=1, help="max_tokens of every request (default 16)."),
    batch_window_ms: float = typer.Option(None, min=0.0, help="--batch-window-ms of the 'on' server (default: the "
                                                              "server's)."),
    router_dtype: str = typer.Option(None, help="The servers' --router-dtype (default auto: bf16 where bf16 "
                                                "matmuls are native, else float32)."),
    logs: Path = typer.Option(None, help="Folder for the two servers' logs (default: none kept)."),
) -> None:
    """Requests/s and p50/p99 latency of a live server, dynamic batching on vs off, with the openai client."""
    from haps.bench.serve import ServeBenchConfig, quick_config, run_bench

    cfg = quick_config() if quick else ServeBenchConfig()
    if model:
        cfg.models = [m.strip() for m in model.split(",") if m.strip()]
    for key, value in (("pool", pool), ("router", router), ("requests_per_client", requests_per_client), ("max_tokens", max_tokens),
                       ("batch_window_ms", batch_window_ms), ("router_dtype", router_dtype)):
        if value is not None:
            setattr(cfg, key, value)
    if clients:
        cfg.clients = _csv_ints(clients)
    check_out(out)
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)

    def progress(rec: dict) -> None:
        console.print(f"{rec['model']}: batching {rec['batching']:>3}, {rec['clients']:>3} clients: "
                      f"{rec['requests_per_s']} req/s, "
                      f"p50 {rec['p50_ms']} ms, p99 {rec['p99_ms']} ms, {rec['errors']} errors")

    data = run_bench(cfg, log_dir=logs, progress=progress)
    write_json_atomic(out, data)
    Console().print(results_table(data))
    console.print(f"wrote {out}")
    if data["errors"]:
        console.print(f"[red]{data['errors']} requests failed[/red]; first: "
                      f"{next(r['first_error'] for r in data['records'] if r['first_error'])}")
        raise typer.Exit(1)
