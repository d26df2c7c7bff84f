"""What the serving tests share: a live uvicorn server in a thread on a free 127.0.0.1 port (ready once
/health says so), the tiny random models as a routed pool, and a fake OpenAI-compatible upstream for
closed models that fails on purpose."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from haps.api import HapsRouter
from haps.config import LoraTarget, ModelSpec, PoolConfig
from haps.models.pool import ModelPool
from haps.workflows import get_workflow
from rl_toy import toy_router

PRICES = {"tiny-llama": (1.0, 2.0), "tiny-gemma3": (3.0, 4.0)}  # USD per 1M tokens (in, out)
MMLU_Q = "Which gas do plants absorb from the air?\nA. Oxygen\nB. Carbon dioxide\nC. Nitrogen\nD. Helium"


class LiveServer:
    """uvicorn serving ``app`` from a background thread on a socket bound to a free loopback port; entering
    waits until GET /health answers 200 (``ready=False``: only until the server listens)."""

    def __init__(self, app, ready: bool = True, timeout_graceful_shutdown: float | None = None) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.wait_ready = ready
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=timeout_graceful_shutdown))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        while self.wait_ready:
            if httpx.get(f"{self.url}/health", timeout=10).status_code == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("test server did not become ready")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True  # what uvicorn's SIGTERM / SIGINT handler sets
        self.thread.join(timeout=60)
        self.sock.close()

    def __exit__(self, *exc) -> None:
        self.stop()


# the user text as it is (no role tags, no assistant header): a tiny random model then answers with text that
# depends on the prompt's last tokens, so distinct prompts get distinct answers (with a chat template every prompt
# ends with the same header tokens, and the random model repeats the same token for all of them)
RAW_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% if not loop.last %}\n{% endif %}{% endfor %}"


def raw_models(tokenizer) -> dict:
    """The tiny random Llama and Gemma 3 (conftest's weights) on a copy of ``tokenizer`` with `RAW_TEMPLATE`."""
    import copy

    from conftest import build_tiny_gemma3, build_tiny_llama
    from haps.models.local import LocalModel

    out = {}
    for name, build, (p_in, p_out) in (("tiny-llama", build_tiny_llama, PRICES["tiny-llama"]),
                                       ("tiny-gemma3", build_tiny_gemma3, PRICES["tiny-gemma3"])):
        tok = copy.deepcopy(tokenizer)
        base = build(tok)
        spec = ModelSpec(name=name, source_kind="folder", source="/nonexistent", chat_template=RAW_TEMPLATE,
                         price_in=p_in, price_out=p_out)
        out[name] = LocalModel(spec, base.model, tok)
    return out


def tiny_pool(tiny_llama, tiny_gemma3, extra: list[ModelSpec] | None = None) -> ModelPool:
    """The two tiny random models (plus ``extra`` specs, e.g. a closed model) as one pool."""
    specs = [*(ModelSpec(name=n, source_kind="folder", source="/nonexistent", price_in=p_in, price_out=p_out)
               for n, (p_in, p_out) in PRICES.items()), *(extra or [])]
    return ModelPool(PoolConfig(name="toy", models=specs, lora=LoraTarget(last_k_layers=1, rank=4, alpha=1.0)),
                     backends={"tiny-llama": tiny_llama, "tiny-gemma3": tiny_gemma3})


def tiny_router(tok, pool: ModelPool, workflow: str = "mmlu", seed: int = 0) -> HapsRouter:
    """An untrained hierarchical router on a tiny random backbone (fresh heads: zero first update)."""
    return HapsRouter(toy_router(tok, pool, get_workflow(workflow), seed=seed), pool, workflow=workflow,
                      trained=False)


class Upstream:
    """A fake OpenAI-compatible endpoint for a closed model. ``mode``: ``ok`` (answers "upstream says hi"),
    ``500`` (always fails), ``slow`` (sleeps ``delay_s`` first), ``hold`` (answers once ``release`` is set),
    ``echo-key`` (401 whose message repeats the
    bearer token it got, as a careless provider might). Counts the calls and keeps the last token seen."""

    def __init__(self, mode: str = "ok", delay_s: float = 1.0) -> None:
        self.mode = mode
        self.delay_s = delay_s
        self.calls = 0
        self.holding = 0
        self.release = threading.Event()
        self.tokens: list[str] = []
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            self.calls += 1
            token = request.headers.get("authorization", "").removeprefix("Bearer ")
            self.tokens.append(token)
            if self.mode == "500":
                return JSONResponse({"error": {"message": "upstream exploded", "type": "server_error"}}, 500)
            if self.mode == "echo-key":
                return JSONResponse({"error": {"message": f"Incorrect API key provided: {token}",
                                               "type": "invalid_request_error"}}, 401)
            if self.mode == "slow":
                await asyncio.sleep(self.delay_s)
            if self.mode == "hold":  # until the test releases it
                self.holding += 1
                await asyncio.to_thread(self.release.wait, 60)
                self.holding -= 1
            return {"id": "x", "object": "chat.completion", "created": 0, "model": "remote",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "upstream says hi"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}

        self.server = LiveServer(app, ready=False)

    def __enter__(self) -> Upstream:
        self.server.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()

    def spec(self, name: str = "remote", **kw) -> ModelSpec:
        args = dict(name=name, backend="api", open_weights=False, base_url=self.server.base_url, source="remote",
                    price_in=10.0, price_out=20.0, timeout_s=5.0, max_retries=1)
        return ModelSpec(**{**args, **kw})
