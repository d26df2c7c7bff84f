"""The FastAPI app of `haps serve`: routes, the gate in front of them, loading and shutdown.

Routes:

- ``POST /v1/chat/completions`` (OpenAI schema; ``model``: ``haps``, ``haps/<workflow>`` or a pool model;
  ``stream: true`` for server-sent events; a ``haps`` object in every answer; optional ``max_cost``)
- ``POST /v1/route``: the assignment, P(z|p) and adapter norms of a problem, nothing generated
- ``GET /v1/models`` (503 until loaded), ``GET /health`` (200 once loaded, 503 before; carries the
  untrained-router warning),
  ``GET /metrics`` (Prometheus text)

The gate (`Gate`, pure ASGI, in front of everything) checks, before a byte of the body is read: the
bearer token (``api_key``; constant-time comparison; every route but /health), then the body size
(``Content-Length``, and the bytes actually received). It also counts every request by route and status
and times it (`haps.serve.metrics`).

Loading runs after the server listens: ``/health`` answers 503 ``loading`` until every model and the
router are loaded, then 200 (or 503 ``failed`` with the error). Shutdown is graceful: uvicorn stops
accepting, waits for the requests in flight (their rows stay in the lanes, which keep running until
then), and only then the lanes close. All state lives on ``app.state``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from haps.errors import HapsError
from haps.serve.errors import (
    ClientDisconnected,
    PayloadTooLarge,
    Redactor,
    Unauthorized,
    error_body,
    error_response,
    install_log_redaction,
)
from haps.serve.metrics import CONTENT_TYPE, ServeMetrics
from haps.serve.schemas import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    RouteRequest,
    RouteResponse,
)
from haps.serve.service import Service
from haps.serve.settings import ServeSettings

log = logging.getLogger("haps.serve")

OPEN_PATHS = frozenset({"/health"})  # answered without the bearer token (load balancers' probes)
KNOWN_PATHS = frozenset({"/v1/chat/completions", "/v1/route", "/v1/models", "/health", "/metrics", "/openapi.json",
                         "/docs", "/docs/oauth2-redirect", "/redoc"})
DISCONNECT_POLL_S = 0.05


class Gate:
    """ASGI middleware: bearer token, body size limit, request metrics (see the module docstring)."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics: ServeMetrics,
                 redact: Redactor) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.redact = redact

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in KNOWN_PATHS else "other"
        status = {"code": 500}
        started = {"yes": False}
        t0 = time.perf_counter()

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                started["yes"] = True
            await send(message)

        self.metrics.in_flight.inc()
        try:
            problem = self._refuse(scope, path)
            if problem is not None:
                await self._answer(problem, scope, sending)
                return
            await self._limited(scope, receive, sending)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)

    def _refuse(self, scope, path: str) -> HapsError | None:
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and path not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if not auth:
                self.metrics.rejected.labels("auth").inc()
                return Unauthorized("missing bearer token: send the header 'Authorization: Bearer <key>' (the key is "
                                    "the value of the environment variable named by the server's --api-key-env).")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                self.metrics.rejected.labels("auth").inc()
                return Unauthorized("invalid bearer token: send 'Authorization: Bearer <key>' with the server's key.")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return PayloadTooLarge("the Content-Length header is not a number; send a valid request.",
                                       param=None)
            if n > self.max_body_bytes:
                return self._too_large(n)
        return None

    def _too_large(self, n: int | None) -> PayloadTooLarge:
        self.metrics.rejected.labels("body").inc()
        got = f"{n} bytes" if n is not None else "more bytes than that"
        return PayloadTooLarge(f"the request body has {got}, above this server's limit of {self.max_body_bytes} "
                               "bytes (--max-body-bytes); send a shorter request.", param=None,
                               code="request_too_large")

    async def _answer(self, exc: BaseException, scope, send) -> None:
        response = error_response(exc, self.redact)
        await response(scope, _no_receive, send)

    async def _limited(self, scope, receive, send) -> None:
        """Run the app, counting the body bytes it receives; past the limit the body stops there and the
        answer is a 413 (whatever the app would have said)."""
        seen = {"n": 0, "over": False}

        async def receiving():
            if seen["over"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen["n"] += len(message.get("body", b""))
                if seen["n"] > self.max_body_bytes:
                    seen["over"] = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        answered = {"yes": False}

        async def sending(message) -> None:
            if seen["over"]:
                if not answered["yes"]:
                    answered["yes"] = True
                    await self._answer(self._too_large(None), scope, send)
                return
            await send(message)

        await self.app(scope, receiving, sending)
        if seen["over"] and not answered["yes"]:
            await self._answer(self._too_large(None), scope, send)


async def _no_receive():  # pragma: no cover - error responses never read the body
    return {"type": "http.disconnect"}


def create_app(pool=None, *, backends: Mapping[str, Any] | None = None, router=None,
               settings: ServeSettings | None = None, api_key: str | None = None, secrets: tuple[str, ...] = (),
               on_load_error: Callable[[BaseException], None] | None = None, **overrides: Any) -> FastAPI:
    """The server app over ``pool`` (every model: local ones batched, closed ones per call) and/or ``backends``
    (name -> backend, served by name only).

    ``router``: a `haps.api.HapsRouter`, a `HierarchicalRouter`, a checkpoint folder, None (an untrained
    router: the backbone of `HighLevelRouterConfig` and fresh heads; a warning says so) or False (no
    routing). ``settings`` / ``overrides``: `ServeSettings` fields. ``api_key``: the bearer token clients must
    send (None: no auth). ``secrets``: more strings never to echo (the closed models' keys are added from the
    environment). Nothing is loaded here: loading starts with the server (``/health`` says when it is done).
    """
    import os

    settings = ServeSettings.model_validate({**(settings.model_dump() if settings else {}), **overrides})
    keys = [os.environ.get(m.api_key_env, "") for m in (pool.config.models if pool is not None else [])
            if m.api_key_env]
    redact = Redactor([*keys, *(secrets or ()), *([api_key] if api_key else [])])
    metrics = ServeMetrics()
    service = Service(pool, backends, router, settings, metrics=metrics, redact=redact)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        install_log_redaction(redact)
        await service.start()
        loader = asyncio.create_task(_load(service, on_load_error))
        app.state.loader = loader
        try:
            yield
        finally:
            if not loader.done():
                loader.cancel()
            await service.close()

    app = FastAPI(title="haps", version="1", lifespan=lifespan,
                  description="OpenAI-compatible routing server: `haps` (routed, generated adapter), "
                              "`haps/<workflow>` (a whole multi-agent workflow), or a pool model by name.")
    app.state.service = service
    app.state.served = service  # (names) for callers of the first version
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.redact = redact

    async def _handle(request: Request, exc: Exception) -> JSONResponse:
        status, _ = error_body(exc)
        if status >= 500 and status not in (502, 503):
            log.error("%s %s failed: %s", request.method, request.url.path, redact(f"{type(exc).__name__}: {exc}"),
                      exc_info=not isinstance(exc, HapsError))
        return error_response(exc, redact)

    for cls in (RequestValidationError, StarletteHTTPException, HapsError, Exception):
        app.add_exception_handler(cls, _handle)

    errors = {code: {"model": ErrorResponse} for code in (400, 401, 413, 499, 500, 502, 503)}
    stream_doc = {"text/event-stream": {"schema": {"type": "string", "description": "data: <chunk JSON> events "
                                                   "(" + ChatCompletionChunk.__name__ + "), then data: [DONE]"}}}
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], response_model=ChatCompletionResponse,
                      responses={200: {"content": stream_doc}, **errors})
    app.add_api_route("/v1/route", route, methods=["POST"], response_model=RouteResponse, responses=errors)
    app.add_api_route("/v1/models", list_models, methods=["GET"], response_model=ModelList,
                      responses={401: errors[401], 503: errors[503]})
    app.add_api_route("/health", health, methods=["GET"], response_model=Health, responses={503: {"model": Health}})
    app.add_api_route("/metrics", metrics_text, methods=["GET"], response_class=Response,
                      responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, 401: errors[401]})
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=settings.max_body_bytes, metrics=metrics, redact=redact)
    app.openapi = lambda: _openapi(app, service, settings)
    return app


def _openapi(app: FastAPI, service: Service, settings: ServeSettings) -> dict:
    """FastAPI's schema plus what this server's settings fix: the served model names and workflows, the limits on
    messages and max_tokens, and 400 (not 422) for invalid bodies."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    comps = schema.get("components", {}).get("schemas", {})
    chat = comps.get("ChatCompletionRequest", {}).get("properties", {})
    if "model" in chat:
        chat["model"]["enum"] = service.served_models()
    if "messages" in chat:
        chat["messages"]["maxItems"] = settings.max_messages
    for name in ("max_tokens", "max_completion_tokens"):
        if name in chat:
            chat[name]["maximum"] = settings.max_tokens_limit
    route_props = comps.get("RouteRequest", {}).get("properties", {})
    if "workflow" in route_props and service.workflows:
        route_props["workflow"]["enum"] = [*service.workflows, None]
    if "max_tokens" in route_props:
        route_props["max_tokens"]["maximum"] = settings.max_tokens_limit
    for path in schema.get("paths", {}).values():
        for op in path.values():
            op.get("responses", {}).pop("422", None)  # validation errors answer 400 in the one error body
    comps.pop("HTTPValidationError", None)
    comps.pop("ValidationError", None)
    app.openapi_schema = schema
    return schema


async def _load(service: Service, on_error: Callable[[BaseException], None] | None) -> None:
    t0 = time.perf_counter()
    try:
        await asyncio.to_thread(service.load)
    except Exception as e:  # noqa: BLE001 - reported by /health and the log; the caller may stop the server
        log.error("loading failed: %s", service.error)
        if on_error is not None:
            on_error(e)
        return
    log.info("ready in %.1f s: serving %s", time.perf_counter() - t0, service.served_models())


async def until_done_or_gone(request: Request, work) -> Any:
    """``await work``, cancelled when the client disconnects first (its rows are then freed)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientDisconnected("the client disconnected before its answer was ready.")


async def chat_completions(body: ChatCompletionRequest, request: Request):
    service: Service = request.app.state.service
    gone = asyncio.Event()
    out = await until_done_or_gone(request, service.chat(body, gone=gone))
    if isinstance(out, ChatCompletionResponse):
        return JSONResponse(out.model_dump(mode="json", exclude_none=False))
    return StreamingResponse(_watched(out, request, gone), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _watched(events, request: Request, gone: asyncio.Event):
    """``events`` while a watcher sets ``gone`` when the client disconnects (a stream learns it from that, not
    from a failed write, which may come late or never)."""
    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        gone.set()

    watcher = asyncio.ensure_future(watch())
    try:
        async for chunk in events:
            yield chunk
    finally:
        watcher.cancel()
        await events.aclose()


async def route(body: RouteRequest, request: Request) -> RouteResponse:
    service: Service = request.app.state.service
    return await until_done_or_gone(request, service.route(body))


async def list_models(request: Request) -> ModelList:
    service: Service = request.app.state.service
    service.require_ready()  # 503 while loading: a client that waits for the listing waits for the models
    return ModelList(data=[ModelCard(id=n, created=service.created) for n in service.served_models()])


async def health(request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    body = Health.model_validate(service.health())
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.ready else 503)


async def metrics_text(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
