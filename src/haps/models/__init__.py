"""Model pool, backends (local transformers, OpenAI-compatible API) and per-request LoRA."""
