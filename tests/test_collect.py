"""Action-level data collection: resumable after SIGKILL, manifest checks, torn-line repair, sampling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from haps.errors import ConfigError, DataError
from haps.routing.space import AssignmentSpace
from haps.train.collect import CollectConfig, assignments_for, collect, read_actions, repair_jsonl

# A fake workflow, pool and runner (deterministic scores; optional delay per runner call), shared by the
# in-process tests and by the subprocess that gets killed.
FAKE = '''
import hashlib, json, sys, time
from types import SimpleNamespace
from haps.config import ModelSpec, PoolConfig
from haps.data import Problem
from haps.train.collect import CollectConfig, collect

class FakeWorkflow:
    name = "fake"
    roles = ("teacher", "student")
    stratify_by = None
    task_description = "Answer the question."
    role_definitions = {"student": "Answers.", "teacher": "Reviews."}
    def problem_text(self, p):
        return p.question

def fake_pool(k=2):
    models = [ModelSpec(name=f"m{i}", source_kind="folder", source="/none", price_in=i + 1.0) for i in range(k)]
    return SimpleNamespace(config=PoolConfig(name="fake", models=models))

def fake_problems(n):
    return [Problem(id=f"q{i:03d}", task="hotpotqa", question=f"question {i}?", gold="x") for i in range(n)]

def fake_runner(delay=0.0):
    def run(pool, workflow, jobs, *, sampling=None, log_path=None, progress=False, **kw):
        time.sleep(delay)
        out = []
        for j in jobs:
            key = ",".join(f"{r}={m}" for r, m in j.assignment.items())
            h = int(hashlib.sha256(f"{j.problem.id}|{key}".encode()).hexdigest()[:8], 16)
            res = SimpleNamespace(id=j.problem.id, assignment=dict(j.assignment), score=(h % 5) / 4, em=float(h % 5 == 4),
                                  tokens_in=100 + h % 50, tokens_out=10 + h % 7, cost=(h % 1000) / 1e6)
            if log_path is not None:
                with open(log_path, "a") as f:
                    f.write(json.dumps(dict(vars(res))) + "\\n")
            out.append(res)
        return out
    return run

def job(problem, assignment):
    return SimpleNamespace(problem=problem, assignment=assignment, adapters=None)

def run(out, n, delay=0.0, chunk=1, **cfg):
    c = CollectConfig(task="hotpotqa", chunk_size=chunk, **cfg)
    return collect(c, out, problems=fake_problems(n), pool=fake_pool(), workflow=FakeWorkflow(),
                   runner=fake_runner(delay), sampling={}, job_factory=job, progress=False)

if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
'''


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    (tmp_path / "fakecollect.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import fakecollect

    return importlib.reload(fakecollect)


def _content(out: Path) -> list[dict]:
    recs = read_actions(out)
    for r in recs:
        r.pop("episode_log")
    return sorted(recs, key=lambda r: (r["problem_id"], r["key"]))


def test_collect_writes_every_pair_once(fake, tmp_path):
    s = fake.run(tmp_path / "a", 5, chunk=2)
    recs = read_actions(tmp_path / "a")
    assert s.total == s.written == 20 and len(recs) == 20
    assert len({(r["problem_id"], r["key"]) for r in recs}) == 20
    r = recs[0]
    assert set(r) >= {"problem_id", "split", "assignment", "reward", "score", "tokens_in", "tokens_out", "cost",
                      "episode_log"}
    assert r["reward"] == r["score"]
    log = tmp_path / "a" / r["episode_log"]["file"]
    line = log.read_text().splitlines()[r["episode_log"]["line"] - 1]
    assert json.loads(line)["assignment"] == r["assignment"]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["config"]["task"] == "hotpotqa" and manifest["roles"] == ["teacher", "student"]
    # a second run finds everything done
    s2 = fake.run(tmp_path / "a", 5, chunk=2)
    assert s2.written == 0 and s2.done_before == 20 and len(read_actions(tmp_path / "a")) == 20


def test_resume_with_other_arguments_fails(fake, tmp_path):
    fake.run(tmp_path / "a", 3)
    with pytest.raises(ConfigError, match="seed: recorded 0, now 1"):
        fake.run(tmp_path / "a", 3, seed=1)


def test_resume_compares_only_what_changes_results(fake, tmp_path):
    from haps.train.collect import RESULT_FIELDS, RUN_FIELDS

    assert set(RESULT_FIELDS) | set(RUN_FIELDS) == set(CollectConfig.model_fields)
    assert not set(RESULT_FIELDS) & set(RUN_FIELDS) and all(RESULT_FIELDS.values()) and all(RUN_FIELDS.values())
    fake.run(tmp_path / "a", 4, chunk=1)
    s = fake.run(tmp_path / "a", 4, chunk=3)  # batching only: not a different collection
    assert s.done_before == 16 and s.written == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert [r["chunk_size"] for r in manifest["runs"]] == [1, 3]


def test_a_fresh_collection_that_fails_leaves_nothing(fake, tmp_path):
    def broken(*a, **k):
        raise RuntimeError("model load failed")

    out = tmp_path / "new" / "col"
    with pytest.raises(RuntimeError):
        collect(CollectConfig(task="hotpotqa"), out, problems=fake.fake_problems(2), pool=fake.fake_pool(),
                workflow=fake.FakeWorkflow(), runner=broken, sampling={}, job_factory=fake.job, progress=False)
    assert not out.exists()
    fake.run(tmp_path / "a", 2)  # an existing collection keeps its files when a resume fails
    with pytest.raises(RuntimeError):
        collect(CollectConfig(task="hotpotqa", chunk_size=1), tmp_path / "a", problems=fake.fake_problems(3),
                pool=fake.fake_pool(), workflow=fake.FakeWorkflow(), runner=broken, sampling={}, job_factory=fake.job,
                progress=False)
    assert len(read_actions(tmp_path / "a")) == 8


def test_repair_torn_last_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert repair_jsonl(p) == len('{"a": ')
    assert p.read_text() == '{"a": 1}\n{"a": 2}\n'
    assert repair_jsonl(p) == 0
    p.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(DataError, match="x.jsonl:2"):
        repair_jsonl(p)


def test_sampled_assignments_for_large_spaces():
    space = AssignmentSpace.of(["a", "b", "c"], [f"m{i}" for i in range(5)])  # 125 assignments
    cfg = CollectConfig(task="mmlu", max_enumerate=16, sample=6, seed=3)
    zs = assignments_for(space, "p1", cfg)
    assert len(zs) == len(set(zs)) == 6 and zs == assignments_for(space, "p1", cfg)
    assert zs != assignments_for(space, "p2", cfg)
    with pytest.raises(ConfigError, match="--sample"):
        assignments_for(space, "p1", CollectConfig(task="mmlu", max_enumerate=16))
    assert len(assignments_for(space, "p1", CollectConfig(task="mmlu", max_enumerate=200))) == 125


def _kill_after(cmd: list[str], actions: Path, n_lines: int, env: dict) -> None:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if actions.exists() and actions.read_bytes().count(b"\n") >= n_lines:
            break
        if proc.poll() is not None:
            raise AssertionError(f"collector ended before it was killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_resume_after_sigkill_gives_identical_content(fake, tmp_path):
    n = 12
    fake.run(tmp_path / "ref", n)
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, str(tmp_path / "fakecollect.py"), str(out), str(n), "0.05"]
    _kill_after(cmd, out / "actions.jsonl", 9, env)
    first = read_actions(out)
    assert 9 <= len(first) < 4 * n
    # a kill mid-write leaves a torn line: simulate one on top
    with open(out / "actions.jsonl", "ab") as f:
        f.write(b'{"problem_id": "q0')
    _kill_after(cmd, out / "actions.jsonl", len(first) + 8, env)  # killed a second time
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _content(out) == _content(tmp_path / "ref")
    keys = [(r["problem_id"], r["key"]) for r in read_actions(out)]
    assert len(keys) == len(set(keys)) == 4 * n
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["runs"]) == 3


def test_a_manifest_without_a_newer_field_resumes_as_its_default(fake, tmp_path):
    fake.run(tmp_path / "a", 2)
    p = tmp_path / "a" / "manifest.json"
    m = json.loads(p.read_text())
    del m["config"]["stratify"]  # written before the field existed
    p.write_text(json.dumps(m))
    assert fake.run(tmp_path / "a", 2).done_before == 8
    with pytest.raises(ConfigError, match="stratify: recorded True, now False"):
        fake.run(tmp_path / "a", 2, stratify=False)


def test_the_manifest_records_what_dtype_auto_resolved_to(monkeypatch):
    """``dtype: auto`` is recorded as the dtype it loaded in: a resume on a CPU where it resolves otherwise
    would generate other tokens, so the manifest check sees a change."""
    from types import SimpleNamespace

    from haps import dtypes
    from haps.config import ModelSpec, PoolConfig
    from haps.train.collect import _pool_dump

    cfg = PoolConfig(models=[ModelSpec(name="a", backend="local", source_kind="folder", source="/x", dtype="auto"),
                             ModelSpec(name="b", backend="local", source_kind="folder", source="/y")])
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert [m["dtype"] for m in _pool_dump(SimpleNamespace(config=cfg))["models"]] == ["bfloat16", "float32"]
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"avx2"}))
    assert [m["dtype"] for m in _pool_dump(SimpleNamespace(config=cfg))["models"]] == ["float32", "float32"]
