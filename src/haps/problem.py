"""`Problem`, the record every workflow reads and writes, and the field checks of record loaders.

This module sits below the workflows (which own the data formats: `Workflow.load_record`) and the loaders
of `haps.data` (which ask the workflows for them); it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from haps.errors import DataError


@dataclass
class Problem:
    """One benchmark item.

    ``task`` is the name of the workflow whose loader made it. ``gold`` is the reference answer as the
    workflow scores it (HotpotQA: the answer text; MMLU: the letter "A".."D"). ``context`` is the list of
    (title, [sentence, ...]) paragraphs of a HotpotQA item, sentences as in the source (leading spaces
    kept, so ``"".join(sentences)`` is the paragraph text). ``meta`` holds the rest: for HotpotQA
    ``type``, ``level``, ``supporting_facts``; always ``source`` ("file:line" or "demo"/"hf").
    """

    id: str
    task: str
    question: str
    gold: str
    choices: list[str] | None = None
    subject: str | None = None
    context: list[tuple[str, list[str]]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def supporting_titles(self) -> list[str]:
        """Titles of the gold paragraphs (HotpotQA), in first-mention order; [] otherwise."""
        seen: list[str] = []
        for title, _ in self.meta.get("supporting_facts", []):
            if title not in seen:
                seen.append(title)
        return seen

    def paragraphs(self) -> list[tuple[str, str]]:
        """(title, paragraph text) for each context paragraph."""
        return [(t, "".join(sents)) for t, sents in (self.context or [])]


# --------------------------------------------------------------------------- record validation
# helpers for `Workflow.load_record` implementations: each raises DataError saying what is wrong


def need(rec: dict, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """``rec[key]``, which must exist and be of type ``kind`` (``what`` says what it holds)."""
    if key not in rec:
        raise DataError(f"missing field {key!r} ({what}); every record needs it")
    val = rec[key]
    if not isinstance(val, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"field {key!r} must be {names} ({what}), got {type(val).__name__}: {str(val)[:60]!r}")
    return val


def need_text(rec: dict, key: str, what: str) -> str:
    """``rec[key]`` as a non-empty string."""
    val = need(rec, key, str, what)
    if not val.strip():
        raise DataError(f"field {key!r} is empty ({what}); give a non-empty string")
    return val
