"""API backend: closed models behind an OpenAI-compatible chat-completions endpoint.

`ApiModel.generate` sends each request as one chat completion (a raw ``prompt`` request becomes a
single user message: closed chat APIs have no raw-completion endpoint), up to ``max_concurrency``
at once from a thread pool. Retries are the openai client's own (``max_retries=spec.max_retries``):
connection errors, timeouts, 408, 409, 429 and 5xx, with exponential backoff and jitter, honouring the
server's Retry-After; never other 4xx (the same request would fail again). A failed request affects
only its own row: its Generation has ``finish_reason="error"``, the message (with the number of
attempts) in ``error`` and empty text.

Semantics, per row::

    try: response = client.chat.completions.create(...)     # the client retries as above
    except error e: error row "<HTTP status | error type> (after n attempts): <message>"
    text, usage, finish_reason <- response   (a malformed response is an error row too)
    cost = spec.cost(usage.prompt_tokens, usage.completion_tokens)

API models report token counts but no token ids, log-probs or rendered prompt.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from haps.config import LoraTarget, ModelSpec
from haps.errors import ConfigError
from haps.models.types import FinishReason, Generation, GenRequest

# Sent as the bearer token when the spec names no key variable (local OpenAI-compatible servers
# accept any key). A placeholder, so that a key in OPENAI_API_KEY never leaks to such a server.
NO_KEY = "no-key"


class ApiModel:
    """One closed model served by an OpenAI-compatible HTTP API (model id: ``spec.source`` or ``spec.name``)."""

    def __init__(self, spec: ModelSpec) -> None:
        if spec.backend != "api" or not spec.base_url:
            raise ConfigError(f"model {spec.name!r}: ApiModel needs backend 'api' and a base_url, got backend "
                              f"{spec.backend!r}, base_url {spec.base_url!r}.")
        import openai

        self.spec = spec
        self.client = openai.OpenAI(api_key=self._api_key(spec), base_url=spec.base_url, timeout=spec.timeout_s,
                                    max_retries=spec.max_retries)

    @staticmethod
    def _api_key(spec: ModelSpec) -> str:
        if not spec.api_key_env:
            return NO_KEY
        key = os.environ.get(spec.api_key_env)
        if not key:
            raise ConfigError(
                f"model {spec.name!r}: its API key is read from the environment variable {spec.api_key_env!r}, "
                f"which is not set. Export {spec.api_key_env}=<key>, or remove api_key_env from the pool config "
                "for a server that needs no key."
            )
        return key

    @property
    def model_id(self) -> str:
        return self.spec.source or self.spec.name

    # ------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenRequest], target: LoraTarget | None = None,
                 seed: int | None = None) -> list[Generation]:
        """One Generation per request, in order; a failed request gives an error row, never an exception.

        ``target`` is accepted for the Backend interface and ignored: requests must carry no adapter.
        """
        if any(r.adapter is not None for r in requests):
            raise ConfigError(f"model {self.spec.name!r} is closed (API): requests for it must carry no adapter.")
        if not requests:
            return []
        workers = min(self.spec.max_concurrency, len(requests))
        if workers == 1:
            return [self._one(r, seed) for r in requests]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"api-{self.spec.name}") as ex:
            return list(ex.map(lambda r: self._one(r, seed), requests))

    def _one(self, req: GenRequest, seed: int | None) -> Generation:
        messages = req.messages if req.messages is not None else [{"role": "user", "content": req.prompt}]
        if req.response_prefix:  # assistant prefill: servers that support it continue this message
            messages = [*messages, {"role": "assistant", "content": req.response_prefix}]
        kwargs = dict(model=self.model_id, messages=messages, max_tokens=req.max_new_tokens,
                      temperature=req.temperature, top_p=req.top_p)
        if req.stop:
            kwargs["stop"] = list(req.stop)
        if seed is not None:
            kwargs["seed"] = seed
        try:
            resp = self.client.chat.completions.create(**kwargs)
        except Exception as e:  # noqa: BLE001 - a failed request becomes its own error row
            return Generation(text="", model=self.spec.name, finish_reason="error", error=_describe(e))
        try:
            choice = resp.choices[0]
            text = choice.message.content or ""
            usage = resp.usage
            n_in = int(usage.prompt_tokens) if usage is not None else 0
            n_out = int(usage.completion_tokens) if usage is not None else 0
        except (AttributeError, IndexError, TypeError, ValueError) as e:
            return Generation(text="", model=self.spec.name, finish_reason="error",
                              error=f"malformed response from {self.spec.base_url}: {e}")
        return Generation(
            text=text, model=self.spec.name, prompt_tokens=n_in, completion_tokens=n_out,
            finish_reason=map_finish_reason(choice.finish_reason, getattr(choice, "stop_reason", None)),
            cost=self.spec.cost(n_in, n_out),
        )


def _attempts(e: Exception) -> int | None:
    """How many times the client sent the request that failed: the retry count it sends as a header."""
    request = getattr(e, "request", None)
    try:
        return int(request.headers["x-stainless-retry-count"]) + 1  # type: ignore[union-attr]
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _describe(e: Exception) -> str:
    n = _attempts(e)
    attempts = f" (after {n} attempt{'s' if n != 1 else ''})" if n is not None else ""
    status = getattr(e, "status_code", None)
    body = getattr(e, "body", None)
    msg = str(e)
    if isinstance(body, dict):  # OpenAI-shaped error body: {"error": {"message": ...}} or its inner dict
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            msg = str(inner["message"])
    head = f"HTTP {status}" if status is not None else type(e).__name__
    return f"{head}{attempts}: {msg}"


def map_finish_reason(reason: str | None, stop_reason: object = None) -> FinishReason:
    """OpenAI finish reasons -> ours.

    ``length`` -> length. ``stop`` means "end of turn or a stop string": servers that say which
    (vLLM and haps serve put the matched string in ``stop_reason``) give ``stop``; otherwise it is
    ``eos``. Anything else (``content_filter``, ``tool_calls``) stopped the text early: ``stop``.
    """
    if reason == "length":
        return "length"
    if reason == "stop" or reason is None:
        return "stop" if isinstance(stop_reason, str) else "eos"
    return "stop"
