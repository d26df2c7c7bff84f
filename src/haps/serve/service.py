"""What the server does with a request, independent of HTTP: limits, routing, answers, workflow episodes.

Three kinds of chat request (``model``):

- ``haps``: the last user message is routed as a problem of the default workflow (its routing prompt; the
  router's task, else the first served workflow); the model the router picks for the answering role
  (``answer_role``, default the workflow's last role: the Student) answers the whole conversation with
  the adapter generated for it.
- ``haps/<workflow>``: the last user message is parsed in the workflow's text format
  (`haps.workflows.from_text`), routed, and the whole episode runs (every call through the model lanes);
  the answer is the episode's prediction. Workflows decode greedily.
- a pool model name: that model answers, no routing.

Limits are checked before any tensor is built: message count, ``max_tokens``, stop strings, then prompt
tokens (a tokenizer pass, no tensor) against ``max_prompt_tokens``, the router backbone's context window
(for routed requests) and the answering model's (``LocalModel.fit_context``). The HTTP layer checks the
body size and the bearer token before the body is read (`haps.serve.app`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from haps.api import HapsRouter, load_router
from haps.errors import ConfigError, DataError
from haps.models.local import LocalModel
from haps.models.types import Generation, GenRequest
from haps.problem import Problem
from haps.serve.batching import ModelLane, Routed, RouterLane, with_callback
from haps.serve.errors import (
    GenerationError,
    InvalidRequest,
    NotReady,
    Redactor,
    UpstreamError,
    error_body,
)
from haps.serve.schemas import (
    MAX_STOP_CHARS,
    MAX_STOPS,
    AssistantMessage,
    CallInfo,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    Delta,
    HapsInfo,
    RouteRequest,
    RouteResponse,
    Usage,
)
from haps.serve.settings import ServeSettings

log = logging.getLogger("haps.serve")

ROUTED = "haps"


def check_supported(body: ChatCompletionRequest) -> None:
    """400 for OpenAI fields this server takes only at their no-op value."""
    def no(param: str, what: str) -> InvalidRequest:
        return InvalidRequest(f"{param}: {what}", param=param)

    if body.n != 1:
        raise no("n", f"n={body.n} is not supported: this server returns one choice per request. Send n=1 (or "
                 "omit it) and repeat the request for more samples.")
    if body.logprobs:
        raise no("logprobs", "log-probabilities are not returned by this server; send logprobs=false or omit it.")
    if body.top_logprobs:
        raise no("top_logprobs", "top_logprobs is not supported; omit it.")
    for p in ("frequency_penalty", "presence_penalty"):
        if getattr(body, p):
            raise no(p, f"{p} is not supported; send 0 or omit it.")
    if body.logit_bias:
        raise no("logit_bias", "logit_bias is not supported; omit it.")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise no("response_format", "only {\"type\": \"text\"} is supported.")
    if body.tools:
        raise no("tools", "tool calls are not supported; send no tools.")
    if body.tool_choice not in (None, "none"):
        raise no("tool_choice", "tool calls are not supported; send tool_choice=\"none\" or omit it.")
    if body.stream_options is not None and not body.stream:
        raise no("stream_options", "stream_options needs stream=true.")
    stops = body.stop_list()
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops) or any(not s for s in stops):
        raise no("stop", f"give at most {MAX_STOPS} non-empty stop strings of at most {MAX_STOP_CHARS} characters.")
    for i, s in enumerate(stops):
        _check_unicode(s, f"stop[{i}]" if isinstance(body.stop, list) else "stop")


def _check_unicode(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{param}: not valid Unicode text (a lone surrogate); send UTF-8 text.",
                             param=param) from None


def messages_of(body_messages, max_messages: int) -> list[dict[str, str]]:
    if len(body_messages) > max_messages:
        raise InvalidRequest(f"messages: {len(body_messages)} messages, above this server's limit of {max_messages} "
                             "(--max-messages); send fewer.", param="messages", code="too_many_messages")
    out = []
    for i, m in enumerate(body_messages):
        text = m.text()
        _check_unicode(text, f"messages.{i}.content")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    return out


def last_user(messages: list[dict[str, str]]) -> str:
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    raise InvalidRequest("messages: a routed request needs a user message (its last one is the problem).",
                         param="messages")


def _finish(gen: Generation) -> str:
    return "length" if gen.finish_reason == "length" else "stop"


def _sse(obj: BaseModel | dict) -> bytes:
    """One server-sent event; a chunk's deltas leave out their null fields (as OpenAI's do)."""
    data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
    for choice in data.get("choices") or []:
        if isinstance(choice.get("delta"), dict):
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


class Service:
    """Models, router, lanes and the request logic of one server (``app.state.service``)."""

    def __init__(self, pool=None, backends: Mapping[str, Any] | None = None, router=None,
                 settings: ServeSettings | None = None, metrics=None, redact: Redactor | None = None) -> None:
        self.pool = pool
        self.settings = settings or ServeSettings()
        self.metrics = metrics
        self.redact = redact or Redactor()
        self.given = dict(backends or {})
        pool_names = list(pool.names) if pool is not None else []
        self.names: list[str] = list(dict.fromkeys([*pool_names, *self.given]))
        if not self.names:
            raise ConfigError("nothing to serve: give a pool with at least one model, or backends={name: model}.")
        self.routing = bool(self.settings.routing and pool is not None and router is not False)
        self._router_spec = router
        self.router: HapsRouter | None = None
        self.workflows: list[str] = list(self.settings.workflows) if self.routing else []
        self.default_workflow: str | None = None
        self.answer_role: str | None = None
        self.status = "loading"
        self.error: str | None = None
        self.warnings: list[str] = []
        self.lanes: dict[str, ModelLane] = {}
        self.router_lane: RouterLane | None = None
        self._wf_exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="haps-workflow")
        self._live: dict[str, int] = {}
        self.created = int(time.time())

    # ------------------------------------------------------------------ lifecycle
    @property
    def ready(self) -> bool:
        return self.status == "ok"

    def served_models(self) -> list[str]:
        routed = ([ROUTED] + [f"{ROUTED}/{w}" for w in self.workflows]) if self.routing else []
        return routed + self.names

    def is_closed(self, name: str) -> bool:
        if name in self.given:
            return type(self.given[name]).__name__ == "ApiModel"
        return self.pool.spec(name).backend == "api"

    def backend(self, name: str):
        return self.given[name] if name in self.given else self.pool.backend(name)

    def _generate(self, name: str, requests: list[GenRequest], seed: int | None) -> list[Generation]:
        if name in self.given:
            return self.given[name].generate(requests, seed=seed)
        return self.pool.generate(name, requests, seed=seed)

    async def start(self) -> None:
        """Make the lanes (on the running loop)."""
        s = self.settings
        window = s.batch_window_ms / 1000 if s.batching else 0.0
        for name in self.names:
            closed = self.is_closed(name)
            workers = self.pool.spec(name).max_concurrency if closed and name not in self.given else 8
            self.lanes[name] = ModelLane(name, self._generate, batched=not closed,
                                         max_batch_size=s.max_batch_size if s.batching else 1, window_s=window,
                                         workers=workers, metrics=self.metrics)
        if self.routing:
            self.router_lane = RouterLane(self._decide, max_batch_size=s.router_batch_size if s.batching else 1,
                                          window_s=window, metrics=self.metrics)

    def load(self) -> None:
        """Load every model and the router (blocking: run it in a thread); sets ``status``."""
        try:
            for name in self.names:
                self.backend(name)  # loads it
            if self.routing:
                self._load_router()
            self.status = "ok"
        except Exception as e:
            self.status, self.error = "failed", self.redact(f"{type(e).__name__}: {e}")
            raise

    def _load_router(self) -> None:
        s = self.settings
        spec = self._router_spec
        first = s.default_workflow or (s.workflows[0] if s.workflows else None)
        if isinstance(spec, HapsRouter):
            router = spec
        elif isinstance(spec, str | Path):
            router = load_router(spec, self.pool, workflow=s.default_workflow, workflow_options=s.workflow_options,
                                 dtype=s.router_dtype)
        elif spec is None:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # said once, below, in the log and /health
                router = load_router(None, self.pool, workflow=first, seed=s.seed, workflow_options=s.workflow_options,
                                     dtype=s.router_dtype)
        else:  # a HierarchicalRouter built by the caller
            router = HapsRouter(spec, self.pool, workflow=first, workflow_options=s.workflow_options,
                                dtype=s.router_dtype)
        if s.call_overhead_tokens is not None:
            router.call_overhead_tokens = s.call_overhead_tokens
        for k, v in s.workflow_options.items():
            router.workflow_options.setdefault(k, dict(v))
        self.router = router
        self.default_workflow = s.default_workflow or router.task or first or router.default_workflow
        for w in dict.fromkeys([*self.workflows, self.default_workflow]):
            router.workflow(w)  # roles checked now, not at the first request
        roles = router.space.roles
        self.answer_role = s.answer_role or roles[-1]
        if self.answer_role not in roles:
            raise ConfigError(f"answer_role {self.answer_role!r} is not a role of the router: {list(roles)}.")
        if router.task and any(w != router.task for w in self.workflows):
            self.warnings.append(f"the router was trained for {router.task!r}; requests for other workflows use "
                                 "its routing all the same")
        for w in router.warnings:
            self.warnings.insert(0, w)
        for w in self.warnings:
            log.warning("%s", w)

    async def close(self) -> None:
        for lane in self.lanes.values():
            await lane.close()
        if self.router_lane is not None:
            await self.router_lane.close()
        self._wf_exec.shutdown(wait=False, cancel_futures=True)

    def require_ready(self) -> None:
        if self.status == "loading":
            raise NotReady("the server is still loading its models; retry when GET /health says ready.")
        if self.status == "failed":
            raise NotReady(f"the server failed to load: {self.error}")

    def health(self) -> dict[str, Any]:
        router = None
        if self.router is not None:
            router = {"source": self.router.source, "trained": self.router.trained, "task": self.router.task,
                      "workflow": self.default_workflow, "answer_role": self.answer_role}
        return {"status": self.status, "ready": self.ready, "router": router, "models": self.served_models(),
                "warnings": list(self.warnings), "error": self.error}

    # ------------------------------------------------------------------ checks
    def _max_tokens(self, requested: int | None, param: str) -> int:
        if requested is None:
            return self.settings.default_max_tokens
        if requested > self.settings.max_tokens_limit:
            self._reject("max_tokens")
            raise InvalidRequest(f"{param}={requested} is above this server's limit of {self.settings.max_tokens_limit} "
                                 "(--max-tokens-limit); ask for fewer tokens.", param=param)
        return requested

    def _reject(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason).inc()

    def _prompt_limit(self, n: int, param: str = "messages") -> None:
        if n > self.settings.max_prompt_tokens:
            self._reject("prompt_tokens")
            raise InvalidRequest(f"{param}: the prompt has {n} tokens, above this server's limit of "
                                 f"{self.settings.max_prompt_tokens} (--max-prompt-tokens); shorten it.", param=param,
                                 code="context_length_exceeded")

    def count_text(self, text: str) -> int:
        """Tokens of ``text`` under the reference tokenizer (the router's, else a local model's; else ~4 bytes
        per token)."""
        if self.router is not None:
            return self.router.count_tokens(text)
        for name in self.names:
            tok = getattr(self.backend(name), "tokenizer", None)
            if tok is not None:
                return len(tok(text, add_special_tokens=False)["input_ids"])
        return len(text.encode()) // 4 + 1

    def prompt_tokens(self, model: str, req: GenRequest) -> int:
        """The prompt's tokens for ``model``, checked against the server's limit and the model's window."""
        be = self.backend(model)
        if hasattr(be, "encode") and hasattr(be, "fit_context"):
            _, ids = be.encode(req)
            self._prompt_limit(len(ids))
            _, err = be.fit_context(req, ids)
            if err is not None:
                self._reject("prompt_tokens")
                raise InvalidRequest(f"messages: {err}", param="messages", code="context_length_exceeded")
            return len(ids)
        msgs = req.messages or [{"role": "user", "content": req.prompt or ""}]
        n = sum(self.count_text(m["content"]) + 4 for m in msgs)
        self._prompt_limit(n)
        return n

    def _check_routing_prompt(self, query) -> None:
        router = self.router
        # tokenised here, not through the router's prompt cache: the router thread owns that cache
        out = router.tokenizer.apply_chat_template(query.prompt.messages, add_generation_prompt=True, tokenize=True)
        n = len(out["input_ids"] if hasattr(out, "keys") else out)
        window = router.context_window
        if window is not None and n > window:
            self._reject("prompt_tokens")
            raise InvalidRequest(f"messages: the routing prompt has {n} tokens, more than the router backbone's context "
                                 f"window of {window}; shorten the message.", param="messages",
                                 code="context_length_exceeded")

    def _classify(self, model: str) -> tuple[str, str | None]:
        if self.routing and model == ROUTED:
            return "haps", None
        if self.routing and model.startswith(ROUTED + "/") and model[len(ROUTED) + 1:] in self.workflows:
            return "workflow", model[len(ROUTED) + 1:]
        if model in self.names:
            return "model", model
        raise InvalidRequest(f"unknown model {model!r}; this server has: {self.served_models()}.", param="model",
                             code="model_not_found")

    # ------------------------------------------------------------------ routing
    def _decide(self, queries: list) -> list:
        return self.router.decide(queries)

    def _plan(self, text: str, workflow: str, *, max_cost: float | None, max_tokens: int, single: bool,
              tokens_in: int | None, strict: bool | None = None):
        """The routing query; ``strict`` (default: not ``single``) holds the text to the workflow's format (an
        episode is to run on it), else a text that does not fit it is routed as a plain question."""
        router = self.router
        wf = router.workflow(workflow)
        if not (strict if strict is not None else not single):
            from haps.workflows.from_text import problem_from_text

            try:
                problem = problem_from_text(wf, text)
            except DataError:
                problem = Problem(id="request", task=wf.name, question=text, gold="", meta={"source": "text"})
        else:
            problem = self._parse(wf, text)
        query = router.plan(problem, workflow, max_cost=max_cost, max_new_tokens=max_tokens,
                            answer_role=self.answer_role if single else None, tokens_in=tokens_in)
        self._check_routing_prompt(query)
        return query

    @staticmethod
    def _parse(wf, text: str) -> Problem:
        from haps.workflows.from_text import problem_from_text

        try:
            return problem_from_text(wf, text)
        except DataError as e:
            raise InvalidRequest(f"messages: {e}", param="messages", code="bad_problem_format") from None

    async def _route(self, query) -> Routed:
        routed = await self.router_lane.submit(query)
        if self.metrics is not None:
            self.metrics.selected(routed.decision.assignment)
        return routed

    async def route(self, body: RouteRequest) -> RouteResponse:
        self.require_ready()
        if not self.routing:
            raise InvalidRequest("this server does not route (no pool, or --no-routing).", param=None)
        if (body.messages is None) == (body.input is None):
            raise InvalidRequest("give exactly one of messages or input.", param="input")
        if body.input is not None:
            _check_unicode(body.input, "input")
            text = body.input
        else:
            text = last_user(messages_of(body.messages, self.settings.max_messages))
        workflow = body.workflow or self.default_workflow
        if workflow not in self.workflows and workflow != self.default_workflow:
            raise InvalidRequest(f"workflow {workflow!r} is not served here; served: {self.workflows}.",
                                 param="workflow")
        max_tokens = self._max_tokens(body.max_tokens, "max_tokens")
        n = await asyncio.to_thread(self.count_text, text)
        self._prompt_limit(n, "input" if body.input is not None else "messages")
        query = await asyncio.to_thread(self._plan, text, workflow, max_cost=body.max_cost, max_tokens=max_tokens,
                                        single=body.single, tokens_in=n, strict=False)
        routed = await self._route(query)
        d = routed.decision
        return RouteResponse(workflow=d.workflow, assignment=d.assignment, probs=d.probs, adapter_norms=d.norms,
                             expected_cost=d.expected_cost, cheapest_cost=d.cheapest_cost, max_cost=d.max_cost,
                             trained=d.trained, router_ms=1000 * routed.router_s, warnings=list(self.warnings))

    # ------------------------------------------------------------------ chat
    async def chat(self, body: ChatCompletionRequest, gone: asyncio.Event | None = None):
        """A `ChatCompletionResponse`, or an async iterator of SSE bytes when ``body.stream`` (it stops, and frees
        its row, once ``gone`` is set: the client disconnected)."""
        self.require_ready()
        check_supported(body)
        kind, target = self._classify(body.model)
        if kind == "model" and body.max_cost is not None:
            raise InvalidRequest("max_cost applies to routed requests (model 'haps' or 'haps/<workflow>').",
                                 param="max_cost")
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._max_tokens(body.max_completion_tokens or body.max_tokens, param)
        messages = messages_of(body.messages, self.settings.max_messages)
        if kind == "workflow":
            return await self._workflow(body, target, messages, max_tokens)
        info = HapsInfo(route="model")
        adapter = None
        model = target
        if kind == "haps":
            text = last_user(messages)
            n = await asyncio.to_thread(lambda: sum(self.count_text(m["content"]) + 4 for m in messages))
            self._prompt_limit(n)
            query = await asyncio.to_thread(self._plan, text, self.default_workflow, max_cost=body.max_cost,
                                            max_tokens=max_tokens, single=True, tokens_in=n)
            routed = await self._route(query)
            d = routed.decision
            model = d.assignment[self.answer_role]
            adapter = d.adapters.get(self.answer_role)
            info = HapsInfo(route="haps", workflow=d.workflow, assignment=d.assignment, answered_by=self.answer_role,
                            probs=d.probs, adapter_norms=d.norms, expected_cost=d.expected_cost,
                            cheapest_cost=d.cheapest_cost, max_cost=d.max_cost, trained=d.trained,
                            router_ms=1000 * routed.router_s, queue_ms=1000 * routed.queue_s,
                            warnings=list(self.warnings))
        req = GenRequest(messages=messages, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                         stop=body.stop_list(), adapter=adapter, logprobs=False)
        await asyncio.to_thread(self.prompt_tokens, model, req)
        if body.stream:
            return self._stream(body, model, req, info, gone)
        gen = self._checked(model, await self.lanes[model].submit(req, body.seed))
        self._account(model, gen)
        role = self.answer_role if kind == "haps" else None
        info.calls = [self._call_info(role, model, gen, adapter)]
        info.tokens_in, info.tokens_out, info.cost = gen.prompt_tokens, gen.completion_tokens, gen.cost
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
            choices=[Choice(index=0, message=AssistantMessage(content=gen.text), finish_reason=_finish(gen),
                            stop_reason=self._matched_stop(model, gen, req.stop))],
            usage=Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                        total_tokens=gen.prompt_tokens + gen.completion_tokens),
            haps=info)

    def _checked(self, model: str, gen: Generation) -> Generation:
        if gen.finish_reason == "error" or gen.error is not None:
            msg = self.redact(f"model {model!r} failed: {gen.error}")
            if self.is_closed(model):
                raise UpstreamError(msg + " (its endpoint failed after the client's retries)")
            raise GenerationError(msg)
        return gen

    def _account(self, model: str, gen: Generation) -> None:
        if self.metrics is not None:
            self.metrics.generation(model, gen.prompt_tokens, gen.completion_tokens, gen.cost)

    def _call_info(self, role, model, gen: Generation, adapter, kind: str = "answer", rnd: int = 0) -> CallInfo:
        norm = None if adapter is None else adapter.update_norm(self.pool.config.lora.alpha)
        return CallInfo(role=role, model=model, kind=kind, round=rnd, tokens_in=gen.prompt_tokens,
                        tokens_out=gen.completion_tokens, cost=gen.cost, adapter_norm=norm,
                        finish_reason=gen.finish_reason)

    def _matched_stop(self, model: str, gen: Generation, stops) -> str | None:
        """The stop string that ended ``gen``: the one that follows the returned text in the full decode."""
        if gen.finish_reason != "stop":
            return None
        if len(stops) == 1:
            return stops[0]
        tok = getattr(self.backend(model), "tokenizer", None)
        if tok is not None and gen.token_ids:
            full = tok.decode(gen.token_ids, skip_special_tokens=True)
            for s in stops:
                if full.startswith(s, len(gen.text)):
                    return s
        return stops[0] if stops else None

    # ------------------------------------------------------------------ streaming
    def _stream(self, body: ChatCompletionRequest, model: str, req: GenRequest, info: HapsInfo,
                gone: asyncio.Event | None = None) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[tuple[int, bool]] = asyncio.Queue()  # (token, the row ended with it)
        tok = getattr(self.backend(model), "tokenizer", None)
        live = isinstance(self.backend(model), LocalModel)  # it calls `GenRequest.on_token` per token
        if live:
            req = with_callback(req, lambda t, f: loop.call_soon_threadsafe(tokens.put_nowait, (t, f)))
        hold = max((len(s) for s in req.stop), default=1) - 1  # a stop string may be starting: not sent yet
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: Delta, finish=None, **kw) -> bytes:
            return _sse(ChatCompletionChunk(id=cid, created=created, model=body.model,
                                            choices=[ChunkChoice(delta=delta, finish_reason=finish)], **kw))

        async def events() -> AsyncIterator[bytes]:
            task = asyncio.ensure_future(self.lanes[model].submit(req, body.seed))
            left = asyncio.ensure_future((gone or asyncio.Event()).wait())
            try:
                yield chunk(Delta(role="assistant", content=""))
                detok = _Detokenizer(tok) if live else None
                sent = ""
                while not task.done() or not tokens.empty():
                    if tokens.empty():
                        getter = asyncio.ensure_future(tokens.get())
                        await asyncio.wait({task, getter, left}, return_when=asyncio.FIRST_COMPLETED)
                        if left.done():  # the client went away: stop (the finally frees the row)
                            getter.cancel()
                            return
                        if not getter.done():
                            getter.cancel()
                            continue
                        t, last = getter.result()
                    else:
                        t, last = tokens.get_nowait()
                    if detok is not None and not last:  # the last token may complete a stop string: the final
                        # text (cut before it) is sent instead
                        text = detok.add(t)
                        safe = text[:max(len(text) - hold, 0)]
                        if len(safe) > len(sent) and safe.startswith(sent):
                            yield chunk(Delta(content=safe[len(sent):]))
                            sent = safe
                try:
                    gen = self._checked(model, task.result())
                except Exception as e:  # noqa: BLE001 - the stream has started: the error is its last event
                    _, err = error_body(e, self.redact)
                    yield _sse(err)
                    yield b"data: [DONE]\n\n"
                    return
                self._account(model, gen)
                if gen.text.startswith(sent):
                    rest = gen.text[len(sent):]
                else:  # a tokenizer that cleans up spaces differently in a whole decode
                    log.warning("streamed text is not a prefix of the final text; sending the rest after the common part")
                    common = len(next((sent[:i] for i in range(len(sent), -1, -1) if gen.text.startswith(sent[:i])), ""))
                    rest = gen.text[common:]
                if rest:
                    yield chunk(Delta(content=rest))
                info.calls = [self._call_info(info.answered_by, model, gen, req.adapter)]
                info.tokens_in, info.tokens_out, info.cost = gen.prompt_tokens, gen.completion_tokens, gen.cost
                usage = Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                              total_tokens=gen.prompt_tokens + gen.completion_tokens)
                yield chunk(Delta(), finish=_finish(gen), haps=info)
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield _sse(ChatCompletionChunk(id=cid, created=created, model=body.model, choices=[], usage=usage))
                yield b"data: [DONE]\n\n"
            finally:
                left.cancel()
                if not task.done():
                    task.cancel()  # the client went away: its row stops at its next token

        return events()

    # ------------------------------------------------------------------ workflows
    async def _workflow(self, body: ChatCompletionRequest, workflow: str, messages, max_tokens: int):
        text = last_user(messages)
        n = await asyncio.to_thread(self.count_text, text)
        self._prompt_limit(n)
        query = await asyncio.to_thread(self._plan, text, workflow, max_cost=body.max_cost, max_tokens=max_tokens,
                                        single=False, tokens_in=n)
        routed = await self._route(query)
        d = routed.decision
        result = await self.run_episode(workflow, d, max_tokens)
        info = HapsInfo(route="workflow", workflow=workflow, assignment=d.assignment, probs=d.probs,
                        adapter_norms=d.norms, expected_cost=d.expected_cost, cheapest_cost=d.cheapest_cost,
                        max_cost=d.max_cost, trained=d.trained, prediction=result.prediction,
                        router_ms=1000 * routed.router_s, queue_ms=1000 * routed.queue_s, warnings=list(self.warnings),
                        calls=[CallInfo(role=t.role, model=t.model, kind=t.kind, round=t.round, tokens_in=t.tokens_in,
                                        tokens_out=t.tokens_out, cost=t.cost, adapter_norm=t.adapter_norm,
                                        finish_reason=t.finish_reason) for t in result.turns],
                        tokens_in=result.tokens_in, tokens_out=result.tokens_out, cost=result.cost)
        if result.failed:
            model = (result.failed_call or {}).get("model", "?")
            msg = self.redact(f"workflow {workflow!r} failed at its {(result.failed_call or {}).get('role')} call on "
                              f"model {model!r}: {result.error}")
            if model in self.names and self.is_closed(model):
                raise UpstreamError(msg + " (its endpoint failed after the client's retries)")
            raise GenerationError(msg)
        content = result.prediction or ""
        usage = Usage(prompt_tokens=result.tokens_in, completion_tokens=result.tokens_out,
                      total_tokens=result.tokens_in + result.tokens_out)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:  # the answer exists only at the end: one content chunk
            async def events() -> AsyncIterator[bytes]:
                def chunk(delta, finish=None, **kw):
                    return _sse(ChatCompletionChunk(id=cid, created=created, model=body.model,
                                                    choices=[ChunkChoice(delta=delta, finish_reason=finish)], **kw))
                yield chunk(Delta(role="assistant", content=""))
                if content:
                    yield chunk(Delta(content=content))
                yield chunk(Delta(), finish="stop", haps=info)
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield _sse(ChatCompletionChunk(id=cid, created=created, model=body.model, choices=[], usage=usage))
                yield b"data: [DONE]\n\n"

            return events()
        return ChatCompletionResponse(id=cid, created=created, model=body.model,
                                      choices=[Choice(index=0, message=AssistantMessage(content=content),
                                                      finish_reason="stop")], usage=usage, haps=info)

    async def run_episode(self, workflow: str, d, max_tokens: int):
        """One greedy episode whose calls go through the model lanes (the runner's rules, asynchronously):
        a failed call ends it as failed; each turn records its adapter's norm."""
        from haps.workflows.base import generation_failed
        from haps.workflows.runner import EpisodeJob, episode_result

        wf = self.router.workflow(workflow)
        loop = asyncio.get_running_loop()
        styles = {r: "completion" if self.pool.spec(m).completion_style else "chat" for r, m in d.assignment.items()}
        self._live[workflow] = self._live.get(workflow, 0) + 1
        try:
            state = wf.start(d.problem, styles)
            failure = None
            while failure is None and not wf.done(state):
                calls = wf.pending(state)
                if not calls:
                    break
                reqs = []
                for call in calls:
                    cap = max_tokens if call.max_new_tokens is None else min(max_tokens, call.max_new_tokens)
                    reqs.append(replace(call.request, max_new_tokens=cap, temperature=0.0, top_p=1.0,
                                        adapter=d.adapters.get(call.role), logprobs=False, keep_states=False))
                gens = await asyncio.gather(*(self.lanes[d.assignment[c.role]].submit(r) for c, r in
                                              zip(calls, reqs, strict=True)))
                for call, req, gen in zip(calls, reqs, gens, strict=True):
                    before = len(state.turns)
                    model = d.assignment[call.role]
                    self._account(model, gen)
                    if generation_failed(gen):
                        failure = wf.fail(state, call.role, gen)
                    else:
                        await loop.run_in_executor(self._wf_exec, wf.advance, state, call.role, gen)
                    norm = None if req.adapter is None else req.adapter.update_norm(self.pool.config.lora.alpha)
                    for turn in state.turns[before:]:
                        turn.adapter_norm = norm
                        turn.drop_rl()
                    if failure is not None:
                        break
            return episode_result(wf, EpisodeJob(d.problem, d.assignment, d.adapters), state, failure)
        finally:
            self._live[workflow] -= 1
            if not self._live[workflow]:  # per-request resources (HotpotQA: paragraph embeddings) are not needed again
                self._wf_exec.submit(wf.warm_up, [])


class _Detokenizer:
    """Incremental decode: the text of the tokens so far, decoding only a short window per token."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.prefix = 0  # window start
        self.read = 0  # tokens whose text is in self.text

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self.text
