"""OpenAI-compatible server over the pool's local models (`haps serve`; the API backend's tests).

Endpoints: ``POST /v1/chat/completions`` (one choice, no streaming) and ``GET /v1/models``.

Requests that arrive together are batched: a per-model micro-batcher takes the first waiting
request, waits ``batch_window_ms`` for companions, then runs everything queued (up to
``max_batch_size``, split by seed) as one ``generate`` call in a worker thread. Calls to one model
run one at a time; requests that arrive meanwhile form the next batch.

Semantics, per model::

    loop:
        batch = [await queue.get()]; sleep(window)
        batch += queue.drain(max_batch_size - 1)
        for seed, rows in group_by_seed(batch):
            gens = await in_thread(backend.generate(rows, seed=seed))
            answer each waiting request with its row

Errors have one body, ``{"error": {"message", "type", "param", "code"}}``, and one status mapping
(`error_status`): bad input 400, unknown route 404, anything else 500. All state lives on
``app.state``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from haps.errors import ConfigError, DataError, HapsError, ShapeError
from haps.models.pool import Backend, ModelPool
from haps.models.types import Generation, GenRequest
from haps.serve_schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)

log = logging.getLogger(__name__)


class InvalidRequest(HapsError):
    """The request is well-formed JSON but asks for something this server does not do (400)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class GenerationError(HapsError):
    """The backend failed while generating (500)."""


# exception -> (HTTP status, OpenAI error type); first match wins
_STATUS: list[tuple[type[BaseException], int, str]] = [
    (InvalidRequest, 400, "invalid_request_error"),
    (RequestValidationError, 400, "invalid_request_error"),
    (ConfigError, 400, "invalid_request_error"),
    (ShapeError, 400, "invalid_request_error"),
    (DataError, 400, "invalid_request_error"),
    (Exception, 500, "internal_server_error"),
]


def error_status(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and OpenAI error type of an exception."""
    if isinstance(exc, StarletteHTTPException):
        return exc.status_code, "invalid_request_error" if exc.status_code < 500 else "internal_server_error"
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            return status, kind
    return 500, "internal_server_error"


def error_response(exc: BaseException) -> JSONResponse:
    status, kind = error_status(exc)
    param = code = None
    if isinstance(exc, InvalidRequest):
        message, param, code = str(exc), exc.param, exc.code
    elif isinstance(exc, RequestValidationError):
        message, param = _validation_message(exc)
    elif isinstance(exc, StarletteHTTPException):
        message = str(exc.detail)
    else:
        message = str(exc) or type(exc).__name__
    body = ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx", {}).get("error", "")
        return f"request body is not valid JSON ({ctx}); send a JSON object.", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if param and "input" in first and first.get("type") != "missing":
        msg = f"{msg} (got {first['input']!r})"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


# ---------------------------------------------------------------------- served models
class ServedModels:
    """Names -> backends: the pool's local models (loaded on first use) plus explicitly given backends."""

    def __init__(self, pool: ModelPool | None = None, backends: Mapping[str, Backend] | None = None) -> None:
        self._pool = pool
        self._given = dict(backends or {})
        local = [n for n in pool.names if pool.spec(n).backend == "local"] if pool is not None else []
        self.names: list[str] = list(dict.fromkeys([*local, *self._given]))
        if not self.names:
            raise ConfigError("nothing to serve: give a pool with at least one local model, or backends={name: model}.")

    def check(self, name: str) -> None:
        if name not in self.names:
            raise InvalidRequest(f"unknown model {name!r}; this server has: {self.names}.", param="model",
                                 code="model_not_found")

    def backend(self, name: str) -> Backend:
        self.check(name)
        if name in self._given:
            return self._given[name]
        assert self._pool is not None
        return self._pool.backend(name)

    def generate(self, name: str, requests: Sequence[GenRequest], seed: int | None) -> list[Generation]:
        return self.backend(name).generate(requests, seed=seed)


# ---------------------------------------------------------------------- micro-batcher
@dataclass
class _Item:
    request: GenRequest
    seed: int | None
    future: asyncio.Future


class MicroBatcher:
    """Collects concurrent requests per model into one ``run(name, requests, seed)`` call in a thread."""

    def __init__(self, run: Callable[[str, list[GenRequest], int | None], list[Generation]], *,
                 executor: ThreadPoolExecutor, max_batch_size: int, window_s: float) -> None:
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self._queues: dict[str, asyncio.Queue[_Item]] = {}
        self._workers: dict[str, asyncio.Task] = {}
        self.calls = 0  # generate calls made
        self.rows = 0  # requests answered by them

    async def submit(self, name: str, request: GenRequest, seed: int | None = None) -> Generation:
        if name not in self._queues:
            self._queues[name] = asyncio.Queue()
            self._workers[name] = asyncio.create_task(self._worker(name), name=f"batcher-{name}")
        fut = asyncio.get_running_loop().create_future()
        self._queues[name].put_nowait(_Item(request, seed, fut))
        return await fut

    async def _worker(self, name: str) -> None:
        q = self._queues[name]
        loop = asyncio.get_running_loop()
        while True:
            batch = [await q.get()]
            if self.window_s > 0 and q.qsize() < self.max_batch_size - 1:
                await asyncio.sleep(self.window_s)  # let companions arrive
            while len(batch) < self.max_batch_size and not q.empty():
                batch.append(q.get_nowait())
            live = [it for it in batch if not it.future.done()]  # a client that went away
            groups: dict[int | None, list[_Item]] = {}
            for it in live:
                groups.setdefault(it.seed, []).append(it)
            for seed, items in groups.items():
                try:
                    gens = await loop.run_in_executor(self._executor, self._run, name,
                                                      [it.request for it in items], seed)
                    if len(gens) != len(items):
                        raise GenerationError(f"model {name!r} returned {len(gens)} results for {len(items)} requests.")
                except Exception as e:  # noqa: BLE001 - every waiting request gets the failure
                    for it in items:
                        if not it.future.done():
                            it.future.set_exception(e)
                    continue
                self.calls += 1
                self.rows += len(items)
                for it, g in zip(items, gens, strict=True):
                    if not it.future.done():
                        it.future.set_result(g)

    async def close(self) -> None:
        for t in self._workers.values():
            t.cancel()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)
        for q in self._queues.values():
            while not q.empty():
                it = q.get_nowait()
                if not it.future.done():
                    it.future.set_exception(GenerationError("server is shutting down"))


# ---------------------------------------------------------------------- app
def create_app(pool: ModelPool | None = None, *, backends: Mapping[str, Backend] | None = None,
               max_batch_size: int = 16, batch_window_ms: float = 5.0, default_max_tokens: int = 256,
               max_tokens_limit: int = 4096) -> FastAPI:
    """The server app over ``pool``'s local models and/or ``backends`` (name -> backend; wins on a clash).

    ``max_batch_size``: most requests per generate call; ``batch_window_ms``: how long the first
    request of a batch waits for companions; ``default_max_tokens``: when a request gives none;
    ``max_tokens_limit``: the most a request may ask for.
    """
    if max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}.")
    if batch_window_ms < 0:
        raise ConfigError(f"batch_window_ms must be >= 0, got {batch_window_ms}.")
    if not 1 <= default_max_tokens <= max_tokens_limit:
        raise ConfigError(f"need 1 <= default_max_tokens <= max_tokens_limit, got {default_max_tokens} and "
                          f"{max_tokens_limit}.")
    served = ServedModels(pool, backends)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        executor = ThreadPoolExecutor(max_workers=len(served.names), thread_name_prefix="haps-generate")
        app.state.batcher = MicroBatcher(served.generate, executor=executor, max_batch_size=max_batch_size,
                                         window_s=batch_window_ms / 1000)
        try:
            yield
        finally:
            await app.state.batcher.close()
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="haps", lifespan=lifespan)
    app.state.served = served
    app.state.created = int(time.time())
    app.state.default_max_tokens = default_max_tokens
    app.state.max_tokens_limit = max_tokens_limit

    async def _handle(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    for cls in (RequestValidationError, StarletteHTTPException, HapsError, Exception):
        app.add_exception_handler(cls, _handle)

    app.add_api_route("/v1/models", list_models, methods=["GET"], response_model=ModelList)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"],
                      response_model=ChatCompletionResponse, responses={400: {"model": ErrorResponse},
                                                                        500: {"model": ErrorResponse}})
    return app


async def list_models(request: Request) -> ModelList:
    st = request.app.state
    return ModelList(data=[ModelCard(id=n, created=st.created) for n in st.served.names])


async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletionResponse:
    st = request.app.state
    st.served.check(body.model)
    gen_request = to_gen_request(body, st.default_max_tokens, st.max_tokens_limit)
    try:
        gen = await st.batcher.submit(body.model, gen_request, body.seed)
    except HapsError:
        raise
    except Exception as e:
        log.exception("generation failed for model %r", body.model)
        raise GenerationError(f"generation failed for model {body.model!r}: {type(e).__name__}: {e}") from e
    if gen.finish_reason == "error":
        raise GenerationError(f"generation failed for model {body.model!r}: {gen.error}")
    stop_reason = None
    if gen.finish_reason == "stop":
        stop_reason = _matched_stop(st.served.backend(body.model), gen, gen_request.stop)
    n_in, n_out = gen.prompt_tokens, gen.completion_tokens
    return ChatCompletionResponse(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
        choices=[Choice(index=0, message=AssistantMessage(content=gen.text),
                        finish_reason="length" if gen.finish_reason == "length" else "stop",
                        stop_reason=stop_reason)],
        usage=Usage(prompt_tokens=n_in, completion_tokens=n_out, total_tokens=n_in + n_out),
    )


def to_gen_request(body: ChatCompletionRequest, default_max_tokens: int, max_tokens_limit: int) -> GenRequest:
    """Validate what the schema cannot and build the backend request."""
    if body.model_extra:
        log.warning("ignoring unsupported request fields: %s", sorted(body.model_extra))
    if body.n != 1:
        raise InvalidRequest(f"n={body.n} is not supported: this server returns one choice per request. Send n=1 "
                             "(or omit it) and repeat the request for more samples.", param="n")
    if body.stream:
        raise InvalidRequest("stream=true is not supported by this server; send stream=false (or omit it).",
                             param="stream")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens > max_tokens_limit:
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        raise InvalidRequest(f"{param}={max_tokens} is above this server's limit of {max_tokens_limit}; ask for "
                             "fewer tokens.", param=param)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    return GenRequest(messages=messages, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                      stop=body.stop_list())


def _matched_stop(backend: Backend, gen: Generation, stops: Sequence[str]) -> str | None:
    """The stop string that ended ``gen``: the one that follows the returned text in the full decode."""
    if len(stops) == 1:
        return stops[0]
    tok = getattr(backend, "tokenizer", None)
    if tok is not None and gen.token_ids:
        full = tok.decode(gen.token_ids, skip_special_tokens=True)
        for s in stops:
            if full.startswith(s, len(gen.text)):
                return s
    return stops[0] if stops else None
