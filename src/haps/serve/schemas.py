"""Request and response schemas of `haps serve` (the OpenAI chat-completions subset it implements, plus
`/v1/route`, `/health` and the ``haps`` object of routed answers).

Unknown fields are refused (400 naming the field). Fields of OpenAI's schema that change nothing here
(``user``, ``metadata``, ``store``, ...) are accepted and ignored; the ones whose meaning this server does
not implement (``tools``, ``logprobs: true``, penalties other than 0, ...) are refused by the server with
a 400 that says what is supported (`haps.serve.service.check_supported`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

SEED_MAX = 2**63 - 1
MAX_STOPS = 16
MAX_STOP_CHARS = 256
Stop = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


def _only(*values: Any) -> dict[str, Any]:
    """Schema of a field accepted only at its no-op values (other values: a 400 naming what is supported)."""
    return {"enum": list(values)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="`developer` is treated as `system`."
    )
    content: str | list[TextPart] = Field(description="Text, or a list of text parts (joined).")
    name: str | None = Field(default=None, description="Accepted and ignored.")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = Field(default=False, description="Send a last chunk with the usage (choices: []).")


class ChatCompletionRequest(_Strict):
    model: str = Field(description="`haps` (routed, with a generated adapter), `haps/<workflow>` (the whole "
                       "multi-agent workflow) or a pool model name (GET /v1/models).")
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation, oldest first.")
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate (per call of a workflow).")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Alias of max_tokens (newer name).")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 = greedy. Workflows always decode "
                               "greedily.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    n: int = Field(default=1, description="Choices per request; only 1 is supported.")
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = Field(
        default=None, description="Stop strings (cut from the returned text).")
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX,
                             description="Sampling seed (requests batch only with the same seed).")
    stream: bool = Field(default=False, description="Server-sent events in OpenAI's chunk format.")
    stream_options: StreamOptions | None = Field(default=None, description="stream=true only.")
    max_cost: float | None = Field(default=None, ge=0, description="haps extension, `haps` and `haps/<workflow>`: "
                                   "the most expected cost (USD) the routed assignment may have (README: expected "
                                   "cost); 400 naming the cheapest cost when none fits.")
    # OpenAI fields accepted and ignored (they change nothing here)
    user: str | None = Field(default=None, description="Accepted and ignored.")
    metadata: dict[str, str] | None = Field(default=None, description="Accepted and ignored.")
    store: bool | None = Field(default=None, description="Accepted and ignored.")
    service_tier: str | None = Field(default=None, description="Accepted and ignored.")
    prompt_cache_key: str | None = Field(default=None, description="Accepted and ignored.")
    safety_identifier: str | None = Field(default=None, description="Accepted and ignored.")
    parallel_tool_calls: bool | None = Field(default=None, description="Accepted and ignored (no tools).")
    # OpenAI fields accepted only at their no-op value
    logprobs: bool | None = Field(default=None, description="Only false is supported.",
                                  json_schema_extra=_only(False, None))
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="Only 0 is supported.",
                                     json_schema_extra=_only(0, None))
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, description="Only 0 is supported.",
                                            json_schema_extra=_only(0, None))
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, description="Only 0 is supported.",
                                           json_schema_extra=_only(0, None))
    logit_bias: dict[str, float] | None = Field(default=None, description="Only an empty map is supported.",
                                                json_schema_extra={"maxProperties": 0})
    response_format: dict[str, Any] | None = Field(
        default=None, description="Only {\"type\": \"text\"}.",
        json_schema_extra={"properties": {"type": {"enum": ["text"]}}, "additionalProperties": False})
    tools: list[dict[str, Any]] | None = Field(default=None, description="Not supported (give none).",
                                               json_schema_extra={"maxItems": 0})
    tool_choice: str | dict[str, Any] | None = Field(default=None, description="Only \"none\" is supported.",
                                                     json_schema_extra=_only("none", None))

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    stop_reason: str | None = Field(
        default=None, description="The stop string that ended the text (vLLM's extension); null at end of turn."
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CallInfo(BaseModel):
    """One model call behind an answer."""

    role: str | None = Field(description="Workflow role of the call (null for a plain model request).")
    model: str
    kind: str = Field(default="answer", description="act | summary | answer.")
    round: int = 0
    tokens_in: int
    tokens_out: int
    cost: float = Field(description="USD, from the pool's prices.")
    adapter_norm: float | None = Field(description="||alpha A B||_F of the generated adapter (null: none).")
    finish_reason: str


class HapsInfo(BaseModel):
    """The ``haps`` object of a response: what was routed where, and what it cost."""

    route: Literal["haps", "workflow", "model"] = Field(description="`haps`: one routed call; `workflow`: a whole "
                                                        "workflow; `model`: a pool model by name (no routing).")
    workflow: str | None = Field(default=None, description="The workflow whose routing prompt was used / run.")
    assignment: dict[str, str] | None = Field(default=None, description="Model per role.")
    answered_by: str | None = Field(default=None, description="`haps`: the role whose model answered.")
    probs: dict[str, float] | None = Field(default=None, description="P(z | p) of every assignment.")
    adapter_norms: dict[str, float | None] | None = None
    expected_cost: float | None = Field(default=None, description="USD, the cost model's (README).")
    cheapest_cost: float | None = None
    max_cost: float | None = None
    trained: bool | None = Field(default=None, description="false: untrained router (no --router).")
    prediction: str | None = Field(default=None, description="Workflow: the parsed final answer.")
    calls: list[CallInfo] = Field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    router_ms: float | None = Field(default=None, description="Router batch time of this request, ms.")
    queue_ms: float | None = Field(default=None, description="Waiting for the router batch, ms.")
    warnings: list[str] = Field(default_factory=list)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    haps: HapsInfo | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer (``data: <chunk>``; the stream ends with ``data: [DONE]``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    haps: HapsInfo | None = None


class RouteRequest(_Strict):
    """`POST /v1/route`: one problem, as messages (the last user message is the problem) or as text."""

    messages: list[ChatMessage] | None = Field(default=None, min_length=1, description="The last user message is "
                                               "the problem (give this or input).")
    input: str | None = Field(default=None, description="The problem text (give this or messages).")
    workflow: str | None = Field(default=None, description="Whose routing prompt and text format (default: the "
                                 "server's; GET /v1/models lists haps/<workflow>).")
    max_cost: float | None = Field(default=None, ge=0, description="Budget (USD) of the expected cost.")
    max_tokens: int | None = Field(default=None, ge=1, description="Tokens per call the cost model assumes.")
    single: bool = Field(default=False, description="Cost model of one `haps` call (true) or a whole workflow.")


class RouteResponse(BaseModel):
    object: Literal["haps.route"] = "haps.route"
    workflow: str
    assignment: dict[str, str]
    probs: dict[str, float]
    adapter_norms: dict[str, float | None]
    expected_cost: float | None
    cheapest_cost: float | None
    max_cost: float | None
    trained: bool
    router_ms: float
    warnings: list[str] = Field(default_factory=list)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "haps"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "loading", "failed"]
    ready: bool
    router: dict[str, Any] | None = Field(default=None, description="source, trained, task, workflow.")
    models: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    error: str | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The one error body of the server: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo
