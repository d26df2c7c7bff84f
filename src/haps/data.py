"""Benchmark problems: loaders and deterministic splits (the `Problem` record is `haps.problem`'s).

Each workflow owns its data format: ``Workflow.load_record`` turns one decoded JSON object into a
`Problem` (see `haps.workflows.base.Workflow`), and ``Workflow.demo_data`` names its embedded demo set.
The loaders here are task-independent; ``load_problems(task, ...)`` asks the workflow registry
(`haps.workflows.load_workflow_class`: a registered name, a plugin or ``path/to/file.py:ClassName``) for
the loader. Sources, all producing the same `Problem` records:

- the embedded demo set (``load_problems(task)`` with no path): ~20 original items per built-in task
  shipped in ``haps/demo_data/`` so that everything runs offline without the benchmark files;
- JSONL files (``load_problems(task, path)``; a file or a folder of ``*.jsonl``), one record per line
  in the workflow's format; the built-in formats are in ``shared/data/README.md``;
- Hugging Face datasets (``load_hf``) of the built-in benchmarks, only when online and ``datasets`` is
  installed.

A malformed record raises `DataError` naming the file, the line, the rule and the fix; with
``on_error="report"`` the loader keeps going, collects every bad record and reports them (a warning,
and the full list through `read_problems`). Records are never skipped silently. A source without a
single record (an empty file) is an error too.
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
from haps.problem import Problem, need, need_text  # noqa: F401  (re-exported)

OnError = Literal["raise", "report"]
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


def problem_record(problem: Problem) -> dict[str, Any]:
    """``problem`` as a record of its workflow's JSONL format (the inverse of the loader)."""
    return _workflow_class(problem.task).dump_record(problem)


def _workflow_class(task: str):
    """The workflow class that owns ``task``'s data format; an unknown task is a DataError here."""
    from haps.errors import ConfigError
    from haps.workflows.loader import load_workflow_class

    try:
        return load_workflow_class(task)
    except ConfigError as e:
        raise DataError(str(e)) from e


def parse_record(task: str, rec: Any) -> Problem:
    """One record (a decoded JSON object) -> `Problem` by the loader of workflow ``task``; raises
    `DataError` naming the rule broken."""
    cls = _workflow_class(task)
    if not isinstance(rec, dict):
        raise DataError(f"a {task} record must be a JSON object, got {type(rec).__name__}")
    prob = cls.load_record(rec)
    if not isinstance(prob, Problem):
        raise DataError(f"workflow {cls.name!r}: load_record returned {type(prob).__name__}, not a Problem; "
                        "return haps.data.Problem(...)")
    return prob


# --------------------------------------------------------------------------- loaders


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

    cls = _workflow_class(task)
    if not cls.demo_data:
        raise DataError(f"workflow {cls.name!r} ships no demo set; pass a JSONL file of problems (--data FILE)")
    package, _, name = cls.demo_data.partition(":")
    text = files(package).joinpath(name).read_text(encoding="utf-8")
    yield from _iter_lines(f"{package}/{name}", iter(text.splitlines()))


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
    problems in file order (files of a folder in sorted order). A source with no record at all (an
    empty file) raises `DataError`.
    """
    _workflow_class(task)  # an unknown task fails here, before any file is read
    if on_error not in ("raise", "report"):
        raise DataError(f"on_error must be 'raise' or 'report', got {on_error!r}")
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0 or None, got {limit}")
    lines = _demo_lines(task) if path is None else _file_lines(_jsonl_files(Path(path)))
    report = LoadReport(problems=[])
    seen: dict[str, str] = {}
    n_records = 0
    for source, lineno, line in lines:
        if limit is not None and len(report.problems) >= limit:
            break
        n_records += 1
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
    if n_records == 0 and limit != 0:
        where = "the demo set" if path is None else repr(str(path))
        raise DataError(f"{where} holds no {task} records (empty or blank lines only); give a JSONL file with one "
                        "JSON object per line")
    return report


def load_problems(task: str, path: str | os.PathLike | None = None, limit: int | None = None,
                  on_error: OnError = "raise", sample_seed: int | None = None) -> list[Problem]:
    """Problems of workflow ``task`` (a name or ``file.py:Class``) from ``path`` (a JSONL file or a folder).

    ``path=None`` loads the workflow's embedded demo set. Bad records raise `DataError` with file and
    line; with ``on_error="report"`` they are collected and reported in one `DataWarning` (use
    `read_problems` to get them as a list) and the good problems are returned. With ``sample_seed``,
    ``limit`` takes a seeded subset spread over the whole file (ordered by a hash of seed and id) instead
    of the first N: files sorted by subject, like MMLU's, then give a mix of subjects.
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
    tasks = sorted({t for t, _ in SHARED_FILES})
    if task not in tasks:
        raise DataError(f"the shared data folder holds no {task!r} files; it has {tasks} (other tasks: pass "
                        "the file path)")
    key = (task, split)
    if key not in SHARED_FILES:
        valid = [s for t, s in SHARED_FILES if t == task]
        raise DataError(f"no shared {task} split {split!r}; valid splits: {valid}")
    return data_root() / SHARED_FILES[key]


# --------------------------------------------------------------------------- Hugging Face

HF_DATASETS = {"hotpotqa": ("hotpot_qa", "distractor"), "mmlu": ("cais/mmlu", "all")}
_HF_SPLIT_ALIASES = {"hotpotqa": {"dev": "validation", "valid": "validation"},
                     "mmlu": {"val": "validation", "valid": "validation", "dev": "dev"}}
# datasets without ids: "<column>/<split>/<row within that column's value>", as in the shared files
_HF_ID_GROUP = {"mmlu": "subject"}


def load_hf(task: str, split: str, limit: int | None = None, on_error: OnError = "raise") -> list[Problem]:
    """Problems from the Hugging Face hub: ``hotpot_qa`` (distractor) or ``cais/mmlu`` (all).

    Needs the ``datasets`` package and network access; offline, use `load_problems` on the shared
    JSONL files instead. MMLU ids are ``<subject>/<split>/<row>`` (row within the subject), as in the
    shared files. ``split`` accepts "dev"/"valid" as aliases of "validation" (HotpotQA).
    """
    if task not in HF_DATASETS:
        raise DataError(f"no Hugging Face dataset is known for task {task!r}; known: {sorted(HF_DATASETS)} (other "
                        "tasks: export the records to JSONL and use load_problems(task, path))")
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
        if task in _HF_ID_GROUP:
            group = rec.get(_HF_ID_GROUP[task], "")
            row = rows.get(group, 0)
            rows[group] = row + 1
            rec.setdefault("id", f"{group}/{split}/{row}")
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
