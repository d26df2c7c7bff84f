"""Request and result types shared by every backend (local transformers, OpenAI-compatible API)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

FinishReason = Literal["eos", "stop", "length", "error"]


@dataclass
class RowAdapter:
    """Per-request LoRA for one model: one (A, B) pair per injected layer, last-k order.

    A: (d_out, r), B: (r, d_in), so that the update is ``alpha * A @ B`` (shape of the base weight W,
    which is (d_out, d_in)). Tensors may carry gradients (they come from the low-level router).
    """

    A: list[torch.Tensor]
    B: list[torch.Tensor]

    def __post_init__(self) -> None:
        if len(self.A) != len(self.B):
            from haps.errors import ShapeError

            raise ShapeError(f"RowAdapter needs as many A as B matrices, got {len(self.A)} A and {len(self.B)} B.")

    def update_norm(self, alpha: float) -> float:
        """Frobenius norm of the whole weight update, sqrt(sum_l ||alpha A_l B_l||_F^2), via the r x r products
        ||A B||_F^2 = sum((A^T A) * (B B^T)) (no (d_out, d_in) matrix is formed)."""
        import torch

        with torch.no_grad():
            sq = sum(float(((A.T @ A) * (B @ B.T)).sum()) for A, B in zip(self.A, self.B, strict=True))
        return abs(alpha) * max(sq, 0.0) ** 0.5


@dataclass
class GenRequest:
    """One generation request: chat ``messages`` or a raw completion ``prompt`` (exactly one)."""

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    adapter: RowAdapter | None = None
    tag: str = ""  # free text for the caller (episode id, role)
    # text the reply must start with: the model continues it (the generated text excludes it)
    response_prefix: str = ""
    # record each generated token's log-prob (`Generation.logprobs`); False spares the local backend the
    # log-sum-exp over the vocabulary at every step
    logprobs: bool = True
    # a prompt that leaves no room for max_new_tokens in the model's context window: "error" (the row fails
    # with a message saying so) or "middle" (its middle tokens are cut; the start and the end are kept)
    truncation: Literal["error", "middle"] = "error"
    # keep the hidden states entering the first adapted layer (`Generation.states`) when the row has an adapter
    # and the engine can: re-scoring for RL then runs only the adapted layers (`haps.models.substack`)
    keep_states: bool = False
    # called from the decoding thread after each generated token as on_token(token_id, finished); returning
    # False stops the row (e.g. its client went away). Local backends only; API backends answer whole texts.
    on_token: Callable[[int, bool], Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            from haps.errors import ConfigError

            raise ConfigError("GenRequest takes exactly one of `messages` (chat) or `prompt` (completion).")
        if self.max_new_tokens < 1:
            from haps.errors import ConfigError

            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")


@dataclass
class Generation:
    """Result of one request. ``token_ids`` and ``logprobs`` are aligned (one log-prob per generated
    token, under the unmodified model distribution at temperature 1; empty when the request asked for
    none); ``text`` is cut before a stop string. API models report token counts but no ids or log-probs."""

    text: str
    model: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason = "length"
    cost: float = 0.0
    error: str | None = None
    prompt_text: str = ""  # exactly what the model saw (after templating); used to re-score for RL
    prompt_ids: list[int] = field(default_factory=list)  # the prompt's token ids as fed (local models; for RL)
    # keep_states: (prompt + completion - 1, d) hidden states entering layer `states_layer` (in memory only)
    states: torch.Tensor | None = field(default=None, repr=False)
    states_layer: int | None = None


@dataclass
class ModelInfo:
    """What `haps models` shows of a local model."""

    name: str
    model_type: str
    layers: int
    hidden_size: int
    vocab_size: int
    params: int
    o_proj_in: int
    o_proj_out: int
    context_window: int
