"""Closed models of a mixed setting: pool models served by `haps serve` on 127.0.0.1 and reached through the
OpenAI-compatible API backend (paper Fig. 5's open/closed pool, run end to end on one machine).

    pool, served = mixed_pool(base, closed=["smollm2-135m"], port=port)   # api specs + the pool to serve
    with ClosedServer(served, port, log=...) as server:                     # started, waited for, stopped
        ... ModelPool(pool) ...

The served pool holds the closed models' local specs; the experiment's pool holds them as ``backend: api``,
``open_weights: false``, ``source`` the served name and the same prices, so their calls carry no adapter,
give no gradient, and are priced from the API's reported token usage.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from haps.config import ModelSpec, PoolConfig
from haps.errors import ConfigError, HapsError

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def base_url(port: int, host: str = HOST) -> str:
    return f"http://{host}:{port}/v1"


def mixed_pool(pool: PoolConfig, closed: list[str], port: int) -> tuple[PoolConfig, PoolConfig]:
    """(the pool with ``closed`` models as API models at ``port``, the pool of their local specs to serve)."""
    names = pool.names
    unknown = [c for c in closed if c not in names]
    if unknown:
        raise ConfigError(f"closed: {unknown} are not models of the pool ({names}); name models of the setting's "
                          "pool.")
    if len(closed) == len(names):
        raise ConfigError("closed: every model of the pool is closed; keep at least one open (local) model, which "
                          "receives the generated adapters.")
    served, models = [], []
    for m in pool.models:
        if m.name not in closed:
            models.append(m)
            continue
        if m.backend != "local":
            raise ConfigError(f"closed: {m.name!r} is already an API model; list only local models to serve.")
        served.append(m)
        models.append(ModelSpec(name=m.name, backend="api", open_weights=False, source=m.name,
                                base_url=base_url(port), price_in=m.price_in, price_out=m.price_out,
                                completion_style=m.completion_style, description=m.description))
    mixed = pool.model_copy(update={"models": models, "name": pool.name})
    return mixed, PoolConfig(name=f"{pool.name}-served", models=served, cache_dir=pool.cache_dir)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: SIGTERM the server when the experiment dies (even by SIGKILL), so no server outlives it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ClosedServer:
    """`haps serve --pool FILE --host 127.0.0.1 --port PORT` as a child process: started and waited for on
    entry (until ``GET /v1/models`` answers), stopped on exit (SIGTERM, then SIGKILL after ``grace_s``)."""

    def __init__(self, pool_file: str | Path, port: int, *, log: str | Path, options: dict | None = None,
                 timeout_s: float = 600.0, grace_s: float = 15.0) -> None:
        self.pool_file, self.port, self.log = str(pool_file), port, Path(log)
        self.options = dict(options or {})
        self.timeout_s, self.grace_s = timeout_s, grace_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return base_url(self.port)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "haps", "serve", "--pool", self.pool_file, "--host", HOST, "--port",
               str(self.port), "--log-level", "warning"]
        for k, v in self.options.items():
            flag = "--" + k.replace("_", "-")
            cmd += [flag] if v is True else [f"--no-{k.replace('_', '-')}"] if v is False else [flag, str(v)]
        return cmd

    def start(self) -> ClosedServer:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        out.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""
                raise HapsError(f"the closed-model server (`{' '.join(self.command()[2:])}`) exited with status "
                                f"{self.proc.returncode} before it was ready; its log {self.log}: {' '.join(tail.split())}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise HapsError(f"the closed-model server at {self.url} did not answer within {self.timeout_s:.0f} s; see "
                        f"{self.log}.")

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(self.grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def __enter__(self) -> ClosedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
