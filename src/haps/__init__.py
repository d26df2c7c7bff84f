"""haps: hierarchical routing of multi-agent LLM workflows over models and per-request LoRA parameters."""

__version__ = "0.1.0"
