"""Benchmark problems: the `Problem` record, loaders and deterministic splits.

Sources, all producing the same `Problem` records:

- the embedded demo set (``load_problems(task)`` with no path): ~20 original items per task shipped
  in ``haps/demo_data/`` so that everything runs offline without the benchmark files;
- JSONL files in the shared formats (``load_problems(task, path)``; a file or a folder of ``*.jsonl``);
  see ``shared/data/README.md``. HotpotQA: the original distractor layout
  ``{id, question, answer, type, level, supporting_facts: [[title, i]], context: [[title, [sent]]]}``
  (the Hugging Face column layout and ``_id`` are accepted too). MMLU:
  ``{id, subject, question, choices: [4 strings], answer: "A".."D"}``;
- Hugging Face datasets (``load_hf``), only when online and ``datasets`` is installed.

A malformed record raises `DataError` naming the file, the line, the rule and the fix; with
``on_error="report"`` the loader keeps going, collects every bad record and reports them (a warning,
and the full list through `read_problems`). Records are never skipped silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from haps.errors import DataError

Task = Literal["hotpotqa", "mmlu"]
OnError = Literal["raise", "report"]
TASKS: tuple[str, ...] = ("hotpotqa", "mmlu")
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
DEMO_FILES = {"hotpotqa": "demo_hotpotqa.jsonl", "mmlu": "demo_mmlu.jsonl"}
# files of the shared data folder (see shared/data/README.md), relative to `data_root()`
SHARED_FILES = {
    ("hotpotqa", "dev"): "hotpotqa/dev_distractor.jsonl",
    ("mmlu", "dev"): "mmlu/dev.jsonl",
    ("mmlu", "val"): "mmlu/val.jsonl",
    ("mmlu", "test"): "mmlu/test.jsonl",
}


class DataWarning(UserWarning):
    """Bad records were found and reported (``on_error="report"``)."""


@dataclass
class Problem:
    """One benchmark item.

    ``gold`` is the answer text (HotpotQA) or the letter "A".."D" (MMLU). ``context`` is the list of
    (title, [sentence, ...]) paragraphs of a HotpotQA item, sentences as in the source (leading spaces
    kept, so ``"".join(sentences)`` is the paragraph text). ``meta`` holds the rest: for HotpotQA
    ``type``, ``level``, ``supporting_facts``; always ``source`` ("file:line" or "demo"/"hf").
    """

    id: str
    task: Task
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

    def to_record(self) -> dict[str, Any]:
        """The record in the shared JSONL format of its task (inverse of the loader)."""
        if self.task == "mmlu":
            return {"id": self.id, "subject": self.subject, "question": self.question,
                    "choices": list(self.choices or []), "answer": self.gold}
        rec = {"id": self.id, "question": self.question, "answer": self.gold,
               "type": self.meta.get("type"), "level": self.meta.get("level"),
               "supporting_facts": [list(x) for x in self.meta.get("supporting_facts", [])],
               "context": [[t, list(s)] for t, s in (self.context or [])]}
        return rec


@dataclass
class RecordError:
    """One bad record: where it is and what is wrong with it."""

    source: str  # file path, or "demo"/"hf:..."
    line: int  # 1-based line number (row number for HF)
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.message}"


@dataclass
class LoadReport:
    """What a load produced: the good problems and every bad record (empty when all were good)."""

    problems: list[Problem]
    errors: list[RecordError] = field(default_factory=list)


# --------------------------------------------------------------------------- record validation


class _Bad(Exception):
    """Internal: one record is invalid (the message says why and how to fix it)."""


def _need(rec: dict, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in rec:
        raise _Bad(f"missing field {key!r} ({what}); every record needs it")
    val = rec[key]
    if not isinstance(val, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _Bad(f"field {key!r} must be {names} ({what}), got {type(val).__name__}: {str(val)[:60]!r}")
    return val


def _nonempty_str(rec: dict, key: str, what: str) -> str:
    val = _need(rec, key, str, what)
    if not val.strip():
        raise _Bad(f"field {key!r} is empty ({what}); give a non-empty string")
    return val


def _hotpot_from_hf_layout(rec: dict) -> dict:
    """Accept the Hugging Face column layout: context {title: [...], sentences: [[...]]}."""
    out = dict(rec)
    if "_id" in out and "id" not in out:
        out["id"] = out.pop("_id")
    ctx = out.get("context")
    if isinstance(ctx, dict) and "title" in ctx and "sentences" in ctx:
        out["context"] = [[t, s] for t, s in zip(ctx["title"], ctx["sentences"], strict=False)]
    sf = out.get("supporting_facts")
    if isinstance(sf, dict) and "title" in sf and "sent_id" in sf:
        out["supporting_facts"] = [[t, i] for t, i in zip(sf["title"], sf["sent_id"], strict=False)]
    return out


def _parse_hotpotqa(rec: dict) -> Problem:
    rec = _hotpot_from_hf_layout(rec)
    pid = _need(rec, "id", (str, int), "the question id")
    question = _nonempty_str(rec, "question", "the question text")
    answer = _need(rec, "answer", str, "the gold answer text")
    ctx = _need(rec, "context", list, "[[title, [sentence, ...]], ...] paragraphs")
    if not ctx:
        raise _Bad("field 'context' is empty; a distractor item needs its paragraphs [[title, [sentence, ...]], ...]")
    context: list[tuple[str, list[str]]] = []
    for j, para in enumerate(ctx):
        ok = (isinstance(para, list | tuple) and len(para) == 2 and isinstance(para[0], str)
              and isinstance(para[1], list) and all(isinstance(s, str) for s in para[1]))
        if not ok:
            raise _Bad(f"context[{j}] must be [title, [sentence, ...]], got {str(para)[:80]!r}")
        context.append((para[0], list(para[1])))
    sf = rec.get("supporting_facts", [])
    if not isinstance(sf, list) or not all(
        isinstance(x, list | tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], int) for x in sf
    ):
        raise _Bad("field 'supporting_facts' must be [[title, sentence_index], ...]")
    titles = {t for t, _ in context}
    missing = sorted({t for t, _ in sf} - titles)
    if missing:
        raise _Bad(f"supporting_facts name titles absent from the context: {missing}; "
                   "this is not a distractor-setting item (its gold paragraphs must be in 'context')")
    meta = {"type": rec.get("type"), "level": rec.get("level"), "supporting_facts": [(t, i) for t, i in sf]}
    return Problem(id=str(pid), task="hotpotqa", question=question, gold=answer, context=context, meta=meta)


def _parse_mmlu(rec: dict) -> Problem:
    pid = _need(rec, "id", (str, int), "the question id, e.g. 'anatomy/test/3'")
    question = _nonempty_str(rec, "question", "the question text")
    subject = _need(rec, "subject", str, "the MMLU subject, e.g. 'anatomy'")
    choices = _need(rec, "choices", list, "the 4 answer options")
    if len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise _Bad(f"field 'choices' must hold exactly 4 strings (options A-D), got {len(choices)}: "
                   f"{str(choices)[:80]!r}")
    answer = rec.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < 4:
        answer = LETTERS[answer]  # Hugging Face / CSV style 0..3
    if not isinstance(answer, str) or answer.strip().upper() not in LETTERS:
        raise _Bad(f"field 'answer' must be a letter A-D (or an index 0-3), got {answer!r}")
    return Problem(id=str(pid), task="mmlu", question=question, gold=answer.strip().upper(), choices=list(choices),
                   subject=subject, meta={})


_PARSERS = {"hotpotqa": _parse_hotpotqa, "mmlu": _parse_mmlu}


def parse_record(task: str, rec: Any) -> Problem:
    """One record (a decoded JSON object) -> `Problem`; raises `DataError` naming the rule broken."""
    _check_task(task)
    if not isinstance(rec, dict):
        raise DataError(f"a {task} record must be a JSON object, got {type(rec).__name__}")
    try:
        return _PARSERS[task](rec)
    except _Bad as e:
        raise DataError(str(e)) from None


# --------------------------------------------------------------------------- loaders


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of {list(TASKS)}")


def _jsonl_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise DataError(f"folder {str(path)!r} holds no *.jsonl files; pass a JSONL file or a folder of them")
        return files
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist; pass a JSONL file or a folder of *.jsonl files "
                        "(the shared data lives under $HAPS_DATA, e.g. hotpotqa/dev_distractor.jsonl)")
    return [path]


def _iter_lines(source: str, lines: Iterator[str]) -> Iterator[tuple[str, int, str]]:
    for i, line in enumerate(lines, start=1):
        if line.strip():
            yield source, i, line


def _demo_lines(task: str) -> Iterator[tuple[str, int, str]]:
    from importlib.resources import files

    text = files("haps.demo_data").joinpath(DEMO_FILES[task]).read_text(encoding="utf-8")
    yield from _iter_lines(f"haps.demo_data/{DEMO_FILES[task]}", iter(text.splitlines()))


def _file_lines(files: list[Path]) -> Iterator[tuple[str, int, str]]:
    for f in files:
        with f.open(encoding="utf-8") as fh:
            yield from _iter_lines(str(f), fh)


def read_problems(task: str, path: str | os.PathLike | None = None, limit: int | None = None,
                  on_error: OnError = "raise") -> LoadReport:
    """Load problems and report every bad record (see `load_problems`).

    With ``on_error="raise"`` the first bad record raises `DataError` ("<file>:<line>: <what> ...");
    with ``"report"`` all bad records are collected in ``LoadReport.errors`` and the good ones returned.
    Duplicate ids are bad records too (splits are keyed by id). ``limit`` keeps the first ``limit`` good
    problems in file order (files of a folder in sorted order).
    """
    _check_task(task)
    if on_error not in ("raise", "report"):
        raise DataError(f"on_error must be 'raise' or 'report', got {on_error!r}")
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0 or None, got {limit}")
    lines = _demo_lines(task) if path is None else _file_lines(_jsonl_files(Path(path)))
    report = LoadReport(problems=[])
    seen: dict[str, str] = {}
    for source, lineno, line in lines:
        if limit is not None and len(report.problems) >= limit:
            break
        try:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON "
                                "object") from None
            prob = parse_record(task, rec)
            if prob.id in seen:
                raise DataError(f"duplicate id {prob.id!r} (first at {seen[prob.id]}); ids must be unique")
        except DataError as e:
            err = RecordError(source, lineno, f"{e}. Fix or remove this line.")
            if on_error == "raise":
                raise DataError(f"{err} (or load with on_error='report' to collect all bad records)") from None
            report.errors.append(err)
            continue
        prob.meta["source"] = f"{source}:{lineno}"
        seen[prob.id] = prob.meta["source"]
        report.problems.append(prob)
    return report


def load_problems(task: str, path: str | os.PathLike | None = None, limit: int | None = None,
                  on_error: OnError = "raise", sample_seed: int | None = None) -> list[Problem]:
    """Problems of ``task`` ("hotpotqa" | "mmlu") from ``path`` (a JSONL file or a folder of them).

    ``path=None`` loads the embedded demo set. Bad records raise `DataError` with file and line; with
    ``on_error="report"`` they are collected and reported in one `DataWarning` (use `read_problems`
    to get them as a list) and the good problems are returned. With ``sample_seed``, ``limit`` takes a
    seeded subset spread over the whole file (ordered by a hash of seed and id) instead of the first
    N: files sorted by subject, like MMLU's, then give a mix of subjects.
    """
    report = read_problems(task, path, limit=None if sample_seed is not None else limit, on_error=on_error)
    if sample_seed is not None and limit is not None:
        report.problems = sorted(
            report.problems, key=lambda p: hashlib.sha256(f"{sample_seed}:{p.id}".encode()).hexdigest()
        )[:limit]
    if report.errors:
        shown = "\n".join(f"  {e}" for e in report.errors[:20])
        more = f"\n  ... and {len(report.errors) - 20} more" if len(report.errors) > 20 else ""
        warnings.warn(f"{len(report.errors)} bad {task} record(s) were not loaded "
                      f"({len(report.problems)} loaded):\n{shown}{more}", DataWarning, stacklevel=2)
    return report.problems


def data_root() -> Path:
    """The shared benchmark data folder: ``$HAPS_DATA`` (holding ``hotpotqa/`` and ``mmlu/``)."""
    env = os.environ.get("HAPS_DATA")
    if not env:
        raise DataError("HAPS_DATA is not set; set it to the benchmark data folder holding hotpotqa/ and mmlu/ "
                        "(e.g. export HAPS_DATA=/path/to/shared/data), or pass a file path explicitly")
    root = Path(env).expanduser()
    if not root.is_dir():
        raise DataError(f"HAPS_DATA={env!r} is not a folder; point it at the folder holding hotpotqa/ and mmlu/")
    return root


def shared_file(task: str, split: str) -> Path:
    """Path of a shared data file under `data_root()`, e.g. ``shared_file("mmlu", "test")``."""
    _check_task(task)
    key = (task, split)
    if key not in SHARED_FILES:
        valid = [s for t, s in SHARED_FILES if t == task]
        raise DataError(f"no shared {task} split {split!r}; valid splits: {valid}")
    return data_root() / SHARED_FILES[key]


# --------------------------------------------------------------------------- Hugging Face

HF_DATASETS = {"hotpotqa": ("hotpot_qa", "distractor"), "mmlu": ("cais/mmlu", "all")}
_HF_SPLIT_ALIASES = {"hotpotqa": {"dev": "validation", "valid": "validation"},
                     "mmlu": {"val": "validation", "valid": "validation", "dev": "dev"}}


def load_hf(task: str, split: str, limit: int | None = None, on_error: OnError = "raise") -> list[Problem]:
    """Problems from the Hugging Face hub: ``hotpot_qa`` (distractor) or ``cais/mmlu`` (all).

    Needs the ``datasets`` package and network access; offline, use `load_problems` on the shared
    JSONL files instead. MMLU ids are ``<subject>/<split>/<row>`` (row within the subject), as in the
    shared files. ``split`` accepts "dev"/"valid" as aliases of "validation" (HotpotQA).
    """
    _check_task(task)
    try:
        import datasets  # lazy: optional dependency
    except ImportError:
        raise DataError("load_hf needs the 'datasets' package: pip install datasets (or, offline, load the "
                        "shared JSONL files with load_problems(task, path))") from None
    name, config = HF_DATASETS[task]
    hf_split = _HF_SPLIT_ALIASES[task].get(split, split)
    try:
        ds = datasets.load_dataset(name, config, split=hf_split)
    except Exception as e:  # offline, unknown split, hub errors: one actionable message
        raise DataError(f"could not load Hugging Face dataset {name}/{config} split {hf_split!r}: "
                        f"{type(e).__name__}: {e}. Check the split name and network access; offline, use "
                        "load_problems(task, path) on the shared JSONL files") from e
    problems: list[Problem] = []
    errors: list[RecordError] = []
    rows: dict[str, int] = {}
    source = f"hf:{name}/{config}/{hf_split}"
    for i, rec in enumerate(ds, start=1):
        if limit is not None and len(problems) >= limit:
            break
        rec = dict(rec)
        if task == "mmlu":
            subj = rec.get("subject", "")
            row = rows.get(subj, 0)
            rows[subj] = row + 1
            rec.setdefault("id", f"{subj}/{split}/{row}")
        try:
            prob = parse_record(task, rec)
        except DataError as e:
            err = RecordError(source, i, str(e))
            if on_error == "raise":
                raise DataError(str(err)) from None
            errors.append(err)
            continue
        prob.meta["source"] = f"{source}:{i}"
        problems.append(prob)
    if errors:
        warnings.warn(f"{len(errors)} bad records from {source} were not loaded:\n"
                      + "\n".join(f"  {e}" for e in errors[:20]), DataWarning, stacklevel=2)
    return problems


# --------------------------------------------------------------------------- splits


def _rank(seed: int, pid: str) -> str:
    return hashlib.sha256(f"{seed}\x00{pid}".encode()).hexdigest()


def split_problems(problems: Sequence[Problem], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0,
                   stratify_by: str | None = None) -> dict[str, list[Problem]]:
    """Deterministic train/valid/test split keyed by problem id.

    Problems are ordered by sha256(seed, id) and cut by ``fractions`` (rounded; test takes the rest),
    so the split depends only on the set of ids and the seed, never on input order. With
    ``stratify_by="subject"`` (or any Problem attribute) each group is split on its own and the
    parts merged, keeping every group's share (the paper stratifies MMLU by subject).
    """
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise DataError(f"fractions must be three non-negative numbers (train, valid, test) summing to 1, "
                        f"got {tuple(fractions)}")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise DataError(f"problem ids must be unique to split deterministically; repeated: {dup}")
    if stratify_by is not None and not all(hasattr(p, stratify_by) for p in problems):
        raise DataError(f"stratify_by={stratify_by!r} is not a Problem attribute (try 'subject' or 'task')")
    groups: dict[Any, list[Problem]] = {}
    for p in problems:
        groups.setdefault(getattr(p, stratify_by) if stratify_by else None, []).append(p)
    out: dict[str, list[Problem]] = {"train": [], "valid": [], "test": []}
    for key in sorted(groups, key=str):
        ordered = sorted(groups[key], key=lambda p: _rank(seed, p.id))
        n = len(ordered)
        n_train = round(fr[0] * n)
        n_valid = min(n - n_train, round(fr[1] * n))
        out["train"] += ordered[:n_train]
        out["valid"] += ordered[n_train:n_train + n_valid]
        out["test"] += ordered[n_train + n_valid:]
    if stratify_by is not None:  # merged groups: restore one seed-determined order per split
        for k in out:
            out[k].sort(key=lambda p: _rank(seed, p.id))
    return out
