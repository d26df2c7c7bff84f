"""The server's one error body, its exception -> status mapping, and secret redaction.

Every error answers ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape). Statuses:
bad input 400, no or wrong bearer token 401, unknown route 404, wrong method 405, body too large 413,
still loading 503, a closed model's endpoint failing after its retries 502, anything else 500 (a bug or a
local backend failure: never the answer to client input).

Messages never carry a secret: `Redactor` replaces the API keys of the pool's closed models and the
server's own bearer token wherever they would appear (an upstream error that echoes the key, a log line).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from haps.api import BudgetError
from haps.errors import ConfigError, DataError, HapsError, ShapeError
from haps.serve.schemas import ErrorInfo, ErrorResponse


class InvalidRequest(HapsError):
    """The request is well-formed JSON but asks for something this server does not do (400)."""

    status = 400

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class PayloadTooLarge(InvalidRequest):
    status = 413


class Unauthorized(InvalidRequest):
    status = 401


class NotReady(HapsError):
    """The models are still loading (or failed to load): 503."""


class GenerationError(HapsError):
    """A local backend failed while generating (500)."""


class UpstreamError(HapsError):
    """A closed model's endpoint failed after the client's retries (502)."""


class ClientDisconnected(HapsError):
    """The client went away before its answer was ready (logged as 499; nobody reads the response)."""


# exception -> (HTTP status, OpenAI error type); first match wins
_STATUS: list[tuple[type[BaseException], int, str]] = [
    (PayloadTooLarge, 413, "invalid_request_error"),
    (Unauthorized, 401, "authentication_error"),
    (InvalidRequest, 400, "invalid_request_error"),
    (BudgetError, 400, "invalid_request_error"),
    (RequestValidationError, 400, "invalid_request_error"),
    (ConfigError, 400, "invalid_request_error"),
    (ShapeError, 400, "invalid_request_error"),
    (DataError, 400, "invalid_request_error"),
    (NotReady, 503, "service_unavailable"),
    (UpstreamError, 502, "upstream_error"),
    (ClientDisconnected, 499, "client_closed_request"),
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


class Redactor:
    """Replaces every secret it holds (API keys, the bearer token) by ``[redacted]``."""

    MARK = "[redacted]"

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # longest first, so a key that contains another is replaced whole; short strings are not secrets
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for s in self.secrets:
            if s in text:
                text = text.replace(s, self.MARK)
        return text


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the secrets from every record passing a handler."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__("haps-redact")
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        if self.redact.secrets:
            msg = record.getMessage()
            clean = self.redact(msg)
            if clean != msg:
                record.msg, record.args = clean, None
            if record.exc_text:
                record.exc_text = self.redact(record.exc_text)
        return True


def install_log_redaction(redact: Redactor, loggers: Iterable[str] = ("", "haps", "uvicorn", "uvicorn.error",
                                                                       "uvicorn.access")) -> list[logging.Handler]:
    """Add a `RedactingFilter` to the handlers of ``loggers`` (once each); returns the handlers filtered."""
    done = []
    for name in loggers:
        for h in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in h.filters):
                h.addFilter(RedactingFilter(redact))
                done.append(h)
    return done


def error_body(exc: BaseException, redact: Redactor | None = None) -> tuple[int, dict]:
    """(status, the one error body) of an exception."""
    status, kind = error_status(exc)
    param = code = None
    if isinstance(exc, InvalidRequest):
        message, param, code = str(exc), exc.param, exc.code
    elif isinstance(exc, BudgetError):
        message, param, code = str(exc), "max_cost", "max_cost_too_low"
    elif isinstance(exc, RequestValidationError):
        message, param = validation_message(exc)
    elif isinstance(exc, StarletteHTTPException):
        message = str(exc.detail)
        if status == 405:
            message = f"{message}: see GET /openapi.json for the methods of each route."
    else:
        message = str(exc) or type(exc).__name__
    if redact is not None:
        message = redact(message)
    message = message.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate echoed from the input
    body = ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))
    return status, body.model_dump()


def error_response(exc: BaseException, redact: Redactor | None = None, headers: dict | None = None) -> JSONResponse:
    status, body = error_body(exc, redact)
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    if status == 503:
        headers = {**(headers or {}), "Retry-After": "5"}
    return JSONResponse(body, status_code=status, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "constrained-str", "constrained-int"}


def _clean_loc(loc) -> list[str]:
    """A validation error's path without ``body`` and pydantic's union-member tags (``list[constrained-str]``)."""
    return [str(p) for p in loc if p != "body" and not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first validation problem as one line naming the field, plus the field path (``param``)."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx", {}).get("error", "")
        return f"request body is not valid JSON ({ctx}); send a JSON object.", None
    # a union (e.g. stop: str | list[str]) reports one error per member: say the one about the member the input
    # matched (not "should be a valid string" for a list), at the field's own path
    field = _clean_loc(first.get("loc", ()))[:1]
    same = [e for e in errors if _clean_loc(e.get("loc", ()))[:1] == field]
    first = next((e for e in same if not str(e.get("type", "")).endswith("_type")), first)
    loc = _clean_loc(first.get("loc", ()))
    param = ".".join(loc) or None
    kind = first.get("type")
    msg = first.get("msg", "invalid value")
    if kind == "extra_forbidden":
        msg = "unknown field; see GET /openapi.json for the fields this server takes"
    elif kind == "missing" and not loc:
        msg = "the request body is empty; send a JSON object"
    elif param and "input" in first and kind != "missing":
        got = repr(first["input"])
        msg = f"{msg} (got {got[:77] + '...' if len(got) > 80 else got})"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param
