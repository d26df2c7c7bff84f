"""Every file haps writes goes through here: a reader or a killed run never sees a half-written file.

Two kinds of output:

- whole files and folders (reports, manifests, checkpoints, caches) are written under a temporary name
  beside the target, fsync'd and renamed onto it (`atomic_path`, `atomic_dir`, `write_json_atomic`,
  `write_text_atomic`): a failure leaves the old content (or nothing), never a partial one;
- append-only JSONL logs (`JsonlAppender`) get one whole line per record, flushed and fsync'd, so a kill
  loses at most the line in flight; `repair_jsonl` cuts such a torn last line off before a resume and
  `read_jsonl` skips it while a run is in progress. The file is created on the first record, so a run
  that fails before producing one leaves no empty log behind.

`check_writable` reports an output path that cannot be written (its parent is a file, no permission,
read-only disk) before any work starts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from haps.errors import ConfigError, DataError

__all__ = [
    "JsonlAppender", "atomic_dir", "atomic_path", "check_writable", "read_jsonl", "repair_jsonl",
    "write_json_atomic", "write_text_atomic",
]


def _fsync_path(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file name beside ``path`` (parents created) for the caller to write; on success it
    is fsync'd, made world-readable and renamed onto ``path``; on an exception it is removed.

    For writers that want a file name (``safetensors.save_file``); see `write_text_atomic` for text.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be read by others
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file, fsync and rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` (parents created) via a temp file, fsync and rename.
    Values JSON cannot encode are written as their ``str``."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary folder beside ``path`` for the caller to fill; on success it replaces ``path``
    (an existing folder is moved aside first and removed after the rename); on an exception it is removed
    and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_path(f)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class JsonlAppender:
    """Append one JSON object per line with flush + fsync (a kill loses at most the line in flight).

    The file (and its folders) is created on the first `write`, so nothing is left behind by a run that
    fails before its first record.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._f = None

    def write(self, rec: Any) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def repair_jsonl(path: str | os.PathLike) -> int:
    """Cut a torn last line (no trailing newline or not valid JSON) off ``path``; returns bytes removed.

    Only the last line can be torn (records are appended whole and fsynced); a bad line elsewhere is
    corruption and raises DataError naming the line.
    """
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    lines = data[:keep].split(b"\n")[:-1]
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:  # a complete-looking but torn last line: drop it too
            keep -= len(lines[-1]) + 1
            lines = lines[:-1]
    for i, ln in enumerate(lines):
        try:
            json.loads(ln)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i + 1}: not valid JSON ({e.msg}); only a torn last line is repaired. "
                            "Fix or remove that line.") from None
    removed = len(data) - keep
    if removed:
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return removed


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The records of a JSONL file written by `JsonlAppender`; a torn last line (a run in progress or
    killed) is skipped, not repaired; a bad line elsewhere raises DataError naming it."""
    path = Path(path)
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    out = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # torn tail
                break
            raise DataError(f"{path}:{i + 1}: not valid JSON ({e.msg}).") from None
    return out


def check_writable(path: str | os.PathLike, *, folder: bool = False, what: str = "--out") -> None:
    """Raise ConfigError (naming ``what``, the path and the fix) when ``path`` cannot be written as a file
    (``folder=False``) or a folder: it exists as the other kind, an ancestor is a file, or the nearest
    existing ancestor is not writable (no permission, read-only disk). Creates nothing."""
    path = Path(path)
    fix = f"choose another {what}"
    if path.exists():
        if folder and not path.is_dir():
            raise ConfigError(f"{what} {str(path)!r} is a file, not a folder; {fix} or remove the file.")
        if not folder and path.is_dir():
            raise ConfigError(f"{what} {str(path)!r} is a folder, not a file; {fix} (a file name).")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{what} {str(path)!r} is not writable (permission or a read-only disk); {fix}.")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a folder; {fix}.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {str(path)!r}: cannot create it in {str(parent)!r} (permission or a "
                          f"read-only disk); {fix}.")
