"""Library chatter off for commands that print their own story (`haps demo`, `haps experiment`).

transformers prints a progress bar for every model load and save ("Loading weights", "Writing model
shards") and warnings meant for library developers; huggingface_hub prints download bars; tokenizers warns
when a process forks (the closed-model server). `quiet_libraries()` turns these off for the rest of the
process (call it in a command, never at import time). Errors still print.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the fork warning (children inherit it too)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as tf_logging

        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
    for name in ("sentence_transformers", "torch_geometric", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|torch|huggingface_hub)\b")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(transformers|torch|huggingface_hub)\b")


@contextmanager
def peft_deprecations() -> Iterator[None]:
    """Around PEFT model construction: peft calls transformers' deprecated ``is_gradient_checkpointing``
    alias (a FutureWarning about code that is not ours); every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
