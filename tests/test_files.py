"""haps.files: atomic files and folders, the JSONL appender, torn-line repair, output path checks."""

from __future__ import annotations

import json
import os

import pytest

from haps.errors import ConfigError, DataError
from haps.files import (
    JsonlAppender,
    atomic_dir,
    atomic_path,
    check_writable,
    read_jsonl,
    repair_jsonl,
    write_json_atomic,
    write_text_atomic,
)


def test_atomic_file_replaces_or_keeps_the_old_content(tmp_path):
    p = tmp_path / "sub" / "r.json"
    write_json_atomic(p, {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1} and oct(p.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert json.loads(p.read_text()) == {"a": 1}
    write_text_atomic(p, "new\n")
    assert p.read_text() == "new\n"
    assert sorted(x.name for x in p.parent.iterdir()) == ["r.json"]  # no temporary files left


def test_atomic_dir_replaces_a_folder_as_a_whole(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_dir(d) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    with pytest.raises(ValueError), atomic_dir(d) as tmp:
        (tmp / "w.bin").write_bytes(b"2")
        raise ValueError("save failed")
    assert (d / "w.bin").read_bytes() == b"1"
    with atomic_dir(d) as tmp:
        (tmp / "other").write_text("x")
    assert sorted(x.name for x in d.iterdir()) == ["other"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt"]


def test_appender_creates_its_file_on_the_first_record_only(tmp_path):
    p = tmp_path / "logs" / "e.jsonl"
    with JsonlAppender(p):
        pass
    assert not p.exists() and not p.parent.exists()
    with JsonlAppender(p) as app:
        app.write({"a": 1})
        app.write({"b": "é"})
    with JsonlAppender(p) as app:
        app.write({"c": 3})
    assert read_jsonl(p) == [{"a": 1}, {"b": "é"}, {"c": 3}]


def test_repair_and_read_skip_only_a_torn_last_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]
    assert repair_jsonl(p) == len('{"a": ') and p.read_text() == '{"a": 1}\n{"a": 2}\n'
    p.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(DataError, match="x.jsonl:2"):
        read_jsonl(p)


def test_check_writable_names_the_option_and_the_fix(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    check_writable(tmp_path / "new" / "deeper" / "out.jsonl")  # missing folders are fine
    with pytest.raises(ConfigError, match=r"--out .*is a file, not a folder; choose another --out"):
        check_writable(f / "out.jsonl")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_writable(f, folder=True)
    with pytest.raises(ConfigError, match="--json .* is a folder, not a file"):
        check_writable(tmp_path, what="--json")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(ConfigError, match="permission or a read-only disk"):
                check_writable(ro / "out", folder=True)
        finally:
            ro.chmod(0o700)
