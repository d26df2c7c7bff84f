"""`haps bench serve`: requests/s and latency of a live `haps serve` under N concurrent openai clients,
dynamic batching on vs off, side by side in one run.

For each mode (``on``: the server's batching defaults; ``off``: ``--no-batching``, every request its own
router pass and generate call) a `haps serve` process is started on a free 127.0.0.1 port and waited for
(GET /health), warmed up with a few requests, then for each client count N: N asyncio tasks, each an
official ``openai.AsyncOpenAI`` client sending ``requests_per_client`` chat requests one after another
(distinct prompts, greedy, ``max_tokens`` tokens) for each model asked for (default ``haps``, routed, and the
pool's first model by name, no router). Recorded per (model, mode, N):
requests/s over the wall time, p50/p99/mean latency, errors, and the router's share of latency (the
``haps`` object's ``router_ms + queue_ms`` over the request's latency, mean over requests). The server is
stopped with SIGTERM (graceful) before the next mode.

The JSON records the CPU (``lscpu`` model name and the flags that decide which dtypes run fast), the
settings and the on/off ratio per N.
"""

from __future__ import annotations

import asyncio
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from haps.bench.machine import cpu_info
from haps.errors import HapsError

FIRST_MODEL = "*"

TOPICS = ["photosynthesis", "the French revolution", "prime numbers", "the water cycle", "black holes",
          "the printing press", "plate tectonics", "vaccines", "the stock market", "jazz", "volcanoes", "DNA"]


@dataclass
class ServeBenchConfig:
    pool: str = "tiny"
    router: str | None = None  # None: the untrained router (as `haps serve` without --router)
    # what the clients ask for, each measured on its own: `haps` (routed: router pass + one call) and "*" (the
    # pool's first model by name: batching of the decode alone); haps/<workflow> and pool model names work too
    models: list[str] = field(default_factory=lambda: ["haps", FIRST_MODEL])
    clients: list[int] = field(default_factory=lambda: [1, 8, 32])
    requests_per_client: int = 4
    max_tokens: int = 16
    warmup: int = 4
    modes: list[str] = field(default_factory=lambda: ["on", "off"])
    batch_window_ms: float | None = None  # None: the server's default
    router_dtype: str = "auto"  # `haps serve --router-dtype` (auto: bf16 where native, haps.dtypes)
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    extra_args: list[str] = field(default_factory=list)  # more `haps serve` options


def quick_config() -> ServeBenchConfig:
    """A smoke run: 1 and 2 clients, 2 requests each, 4 tokens."""
    return ServeBenchConfig(clients=[1, 2], requests_per_client=2, max_tokens=4, warmup=1)


def _resolve(models: list[str], url: str) -> list[str]:
    """`FIRST_MODEL` -> the first pool model the server lists (GET /v1/models)."""
    import httpx

    names = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
    plain = [n for n in names if n != "haps" and not n.startswith("haps/")]
    return [(plain[0] if plain else "haps") if m == FIRST_MODEL else m for m in models]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int) -> list[str]:
    return [f"In two sentences, what should a student know about {TOPICS[i % len(TOPICS)]}? (question {i})"
            for i in range(n)]


class ServerProcess:
    """`haps serve` in a subprocess on a free loopback port; stopped with SIGTERM (graceful)."""

    def __init__(self, cfg: ServeBenchConfig, batching: bool, log_path: Path | None = None) -> None:
        self.port = _free_port()
        cmd = [sys.executable, "-m", "haps", "serve", "--pool", cfg.pool, "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning", "--batching" if batching else "--no-batching",
               "--max-tokens-limit", str(cfg.max_tokens), "--default-max-tokens", str(cfg.max_tokens), *cfg.extra_args]
        if cfg.router:
            cmd += ["--router", cfg.router]
        if cfg.batch_window_ms is not None:
            cmd += ["--batch-window-ms", str(cfg.batch_window_ms)]
        cmd += ["--router-dtype", cfg.router_dtype]
        self.cmd = cmd
        self.log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HapsError(f"`{' '.join(self.cmd)}` exited with status {self.proc.returncode} before it was "
                                "ready; run it by hand (or pass --logs DIR) to see why.")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise HapsError(f"the server was not ready after {timeout_s:.0f} s.")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log not in (None, subprocess.DEVNULL):
            self.log.close()
        return self.proc.returncode


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def _load(base_url: str, cfg: ServeBenchConfig, n_clients: int, texts: list[str], model: str) -> dict[str, Any]:
    import openai

    lat: list[float] = []
    shares: list[float] = []
    router_ms: list[float] = []
    errors: list[str] = []

    async def one_client(c: int) -> None:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=cfg.request_timeout_s)
        try:
            for r in range(cfg.requests_per_client):
                text = texts[(c * cfg.requests_per_client + r) % len(texts)]
                t0 = time.perf_counter()
                try:
                    resp = await client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": text}], max_tokens=cfg.max_tokens,
                        temperature=0)
                except Exception as e:  # noqa: BLE001 - counted, the run goes on
                    errors.append(f"{type(e).__name__}: {e}"[:200])
                    continue
                dt = time.perf_counter() - t0
                lat.append(dt)
                info = (resp.model_extra or {}).get("haps") or {}
                if info.get("router_ms") is not None:
                    routed = info["router_ms"] + (info.get("queue_ms") or 0.0)
                    router_ms.append(routed)
                    shares.append(routed / 1000 / dt)
        finally:
            await client.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(n_clients)))
    wall = time.perf_counter() - t0
    n = len(lat)
    return {"model": model, "clients": n_clients, "requests": n + len(errors), "ok": n, "errors": len(errors),
            "first_error": errors[0] if errors else None, "wall_s": round(wall, 3),
            "requests_per_s": round(n / wall, 3) if wall > 0 else 0.0,
            "p50_ms": _ms(_percentile(lat, 0.5)), "p99_ms": _ms(_percentile(lat, 0.99)),
            "mean_ms": _ms(statistics.fmean(lat) if lat else None),
            "router_ms_mean": round(statistics.fmean(router_ms), 2) if router_ms else None,
            "router_share": round(statistics.fmean(shares), 4) if shares else None}


def _ms(s: float | None) -> float | None:
    return None if s is None else round(1000 * s, 1)


def _batch_sums(url: str) -> dict[str, float]:
    """The server's running sums and counts of rows per generate call and per router batch (/metrics)."""
    import httpx

    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    sums: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("haps_batch_size", "haps_router_batch_size"):
            for suffix in ("_sum", "_count"):
                if line.startswith(name + suffix):
                    sums[name + suffix] = sums.get(name + suffix, 0.0) + float(line.rsplit(" ", 1)[1])
    return sums


def _batch_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean rows per generate call / per router batch between two `_batch_sums`."""
    out = {}
    for name, key in (("haps_batch_size", "rows_per_generate"), ("haps_router_batch_size", "rows_per_router_batch")):
        calls = after.get(name + "_count", 0) - before.get(name + "_count", 0)
        if calls:
            out[key] = round((after.get(name + "_sum", 0) - before.get(name + "_sum", 0)) / calls, 2)
    return out


def find(records: list[dict], model: str, mode: str, clients: int) -> dict | None:
    return next((r for r in records if r["model"] == model and r["batching"] == mode and r["clients"] == clients),
                None)


def run_bench(cfg: ServeBenchConfig, log_dir: Path | None = None, progress=None) -> dict[str, Any]:
    """Both modes, every client count (see the module docstring); the JSON-ready result."""
    texts = prompts(max(cfg.clients) * cfg.requests_per_client + cfg.warmup)
    records: list[dict[str, Any]] = []
    for mode in cfg.modes:
        server = ServerProcess(cfg, batching=mode == "on",
                               log_path=(log_dir / f"serve-{mode}.log") if log_dir else None)
        try:
            t_load = time.perf_counter()
            server.wait_ready(cfg.startup_timeout_s)
            load_s = time.perf_counter() - t_load
            base = f"{server.url}/v1"
            models = _resolve(cfg.models, server.url)
            for model in models:
                if cfg.warmup:  # first calls pay for lazy set-up (LoRA wrapping, kernels)
                    asyncio.run(_load(base, ServeBenchConfig(**{**asdict(cfg), "requests_per_client": 1}),
                                      cfg.warmup, texts[-cfg.warmup:], model))
                for n in cfg.clients:
                    before = _batch_sums(server.url)
                    rec = asyncio.run(_load(base, cfg, n, texts, model))
                    rec.update(batching=mode, load_s=round(load_s, 1), **_batch_means(before, _batch_sums(server.url)))
                    records.append(rec)
                    if progress is not None:
                        progress(rec)
        finally:
            rc = server.stop()
        for rec in records:
            if rec["batching"] == mode:
                rec["server_exit"] = rc
    ratios: dict[str, dict[str, float]] = {}
    for model in dict.fromkeys(r["model"] for r in records):
        for n in cfg.clients:
            on = find(records, model, "on", n)
            off = find(records, model, "off", n)
            if on and off and off["requests_per_s"]:
                ratios.setdefault(model, {})[str(n)] = round(on["requests_per_s"] / off["requests_per_s"], 3)
    return {"benchmark": "serve", "config": asdict(cfg), "cpu": cpu_info(), "python": platform.python_version(),
            "records": records, "speedup_on_vs_off": ratios,
            "errors": sum(r["errors"] for r in records)}
