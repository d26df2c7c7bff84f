"""The command line's user errors, each in a subprocess: exit status 2, exactly one line on stderr naming
the problem and the fix, no traceback, and nothing left behind; `--debug` shows the traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MMLU_OK = {"id": "s/test/0", "subject": "s", "question": "Q?", "choices": ["w", "x", "y", "z"], "answer": "C"}


def haps(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="80")  # narrow: a long message must still be one line
    return subprocess.run([sys.executable, "-m", "haps", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def one_line_error(res: subprocess.CompletedProcess, *fragments: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in res.stderr, line
    for f in fragments:
        assert f in line, (f, line)
    return line


@pytest.fixture()
def files(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "empty.jsonl").write_text("\n\n")
    (d / "bad.jsonl").write_text(json.dumps(MMLU_OK) + "\n{oops\n")
    (d / "one.jsonl").write_text(json.dumps(MMLU_OK) + "\n")
    (d / "pool_bad_yaml.yaml").write_text("models: [\n  - name: x\n")
    (d / "pool_bad_field.yaml").write_text("models:\n  - name: x\n    source: /nowhere\n    price_in: -1\n")
    (d / "pool_missing.yaml").write_text("models:\n  - name: gone\n    source_kind: folder\n    source: /nonexistent/m\n")
    (d / "a_file").write_text("x")
    return d


CASES = {
    "unknown task": (["run", "--task", "gsm8k"], ["unknown task or workflow 'gsm8k'", "hotpotqa", "file.py:ClassName"]),
    "unknown model": (["run", "--task", "mmlu", "--assign", "teacher=gpt-9,student=smollm2-135m"],
                      ["--assign", "unknown model 'gpt-9'", "smollm2-135m"]),
    "partial assign": (["run", "--task", "mmlu", "--assign", "teacher=smollm2-135m"],
                       ["--assign", "no model for role(s) ['student']", "teacher=smollm2-135m,student="]),
    "unknown pool": (["run", "--task", "mmlu", "--pool", "tiyn"], ["unknown pool 'tiyn'", "['tiny', 'tiny-auto']", "YAML"]),
    "missing data": (["run", "--task", "mmlu", "--data", "{d}/nope.jsonl"], ["does not exist", "nope.jsonl"]),
    "malformed data": (["run", "--task", "mmlu", "--data", "{d}/bad.jsonl"], ["bad.jsonl:2:", "not valid JSON",
                                                                              "Fix or remove this line"]),
    "empty data": (["run", "--task", "mmlu", "--data", "{d}/empty.jsonl"], ["empty.jsonl", "holds no mmlu records"]),
    "bad pool yaml": (["run", "--task", "mmlu", "--pool", "{d}/pool_bad_yaml.yaml"],
                      ["pool_bad_yaml.yaml:", "not valid YAML", "fix the file"]),
    "bad pool field": (["models", "--pool", "{d}/pool_bad_field.yaml"], ["pool_bad_field.yaml", "is invalid",
                                                                          "price_in", "greater than or equal to 0"]),
    "limit 0": (["run", "--task", "mmlu", "--limit", "0"], ["'--limit'", "greater than or equal to 1", "--help"]),
    "max-new-tokens 0": (["collect", "--task", "mmlu", "--out", "{d}/c", "--max-new-tokens", "0"],
                         ["'--max-new-tokens'", "greater than or equal to 1"]),
    "out under a file": (["run", "--task", "mmlu", "--out", "{d}/a_file/log.jsonl"],
                         ["--out", "a_file' is a file, not a folder", "choose another --out"]),
    "collect out is a file": (["collect", "--task", "mmlu", "--out", "{d}/a_file"],
                              ["--out", "is a file, not a folder"]),
    "empty split": (["collect", "--task", "mmlu", "--data", "{d}/one.jsonl", "--out", "{d}/c"],
                    ["1 problem(s) leave the valid/test split empty", "each subject split on its own"]),
    "too few problems": (["collect", "--task", "hotpotqa", "--limit", "2", "--out", "{d}/c"],
                         ["2 problem(s) leave the valid split empty", "--limit", "fraction 0"]),
    "bad option": (["collect", "--task", "hotpotqa", "--out", "{d}/c", "-o", "budgt=2"],
                   ["workflow 'hotpotqa': invalid options", "budgt", "Valid options: budget"]),
    "bad config value": (["sft", "--actions", "{d}", "--out", "{d}/ck", "--tie", "sometimes"],
                         ["'--tie'", "'sometimes'"]),
    "model load fails": (["run", "--task", "mmlu", "--pool", "{d}/pool_missing.yaml", "--limit", "1",
                          "--max-new-tokens", "2", "--out", "{d}/run/log.jsonl", "--no-progress"], ["gone"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_line_with_exit_2_and_leave_nothing(case, files):
    args, fragments = CASES[case]
    before = sorted(p.name for p in files.rglob("*"))
    res = haps(*[a.format(d=files) for a in args])
    one_line_error(res, *fragments)
    assert sorted(p.name for p in files.rglob("*")) == before  # no empty or partial output left behind


def test_debug_shows_the_traceback():
    res = haps("--debug", "run", "--task", "gsm8k")
    assert res.returncode != 0 and "Traceback" in res.stderr and "unknown task or workflow" in res.stderr


def test_help_and_missing_command_exit_as_click_does():
    assert haps("--help").returncode == 0
    res = haps("nosuch")
    one_line_error(res, "No such command 'nosuch'", "haps --help")
