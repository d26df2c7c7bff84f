"""`haps serve`: an OpenAI-compatible routing server (FastAPI + uvicorn).

- `haps.serve.app`: the app (`create_app`), its routes and the gate in front of them (auth, body size);
- `haps.serve.service`: what a request does (limits, routing, answers, workflow episodes, streaming);
- `haps.serve.batching`: dynamic batching across requests (router lane, one lane per model);
- `haps.serve.settings`: `ServeSettings`; `haps.serve.schemas`: request and response schemas;
  `haps.serve.errors`: the one error body, statuses, secret redaction; `haps.serve.metrics`: Prometheus.

Exports are lazy (importing `haps.serve.settings` loads no web framework).
"""

_EXPORTS = {"create_app": "haps.serve.app", "ServeSettings": "haps.serve.settings",
            "InvalidRequest": "haps.serve.errors", "error_response": "haps.serve.errors",
            "error_status": "haps.serve.errors"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'haps.serve' has no attribute {name!r}")
