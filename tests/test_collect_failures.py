"""Collection against a remote model whose endpoint fails on purpose (issue 16, item 1).

A mixed pool: an open model (a scripted local backend, or the real SmolLM2 in the CLI tests) and a
closed API model served by a plain `http.server` on 127.0.0.1 that refuses connections (nothing
listens yet), times out, answers 500 or answers malformed JSON. Collection must record no reward for
the episodes that used the remote model, log each failure, report it (and `haps collect` / `haps run`
exit 1), and a run with the endpoint healthy must fill them in exactly once. The API client runs with
max_retries 0 and a 0.5 s timeout, so the tests do not depend on how it retries.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from haps.config import ModelSpec, PoolConfig
from haps.data import load_problems
from haps.models.pool import ModelPool
from haps.models.types import Generation
from haps.train.collect import FAILURES, CollectConfig, collect, read_actions
from haps.workflows import get_workflow

TIMEOUT_S = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mmlu_reply(prompt: str) -> str:
    return "Feedback: right.\nSubmit: 1" if "Submit" in prompt else "Rationale: air is mostly N2.\nChoice: B"


class Endpoint:
    """``/v1/chat/completions`` on a fixed 127.0.0.1 port. ``mode``: "refuse" (nothing listens), "timeout"
    (answers after 4x the client timeout), "500", "malformed" (status 200, a body that is not JSON),
    "no_choices" (JSON without choices), "healthy" (an OpenAI-shaped completion)."""

    def __init__(self, mode: str) -> None:
        self.port = free_port()
        self.server: ThreadingHTTPServer | None = None
        self.calls = 0
        self.mode = "refuse"
        self.set(mode)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def set(self, mode: str) -> None:
        self.mode = mode
        if mode != "refuse" and self.server is None:
            self._start()

    def _start(self) -> None:
        ep = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout mode)
                    pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                ep.calls += 1
                if ep.mode == "timeout":
                    time.sleep(4 * TIMEOUT_S)
                    return self._send(200, b"{}")
                if ep.mode == "500":
                    return self._send(500, json.dumps({"error": {"message": "upstream exploded",
                                                                 "type": "server_error"}}).encode())
                if ep.mode == "malformed":
                    return self._send(200, b'{"id": "x", "choices": [{"message": ')
                if ep.mode == "no_choices":
                    return self._send(200, json.dumps({"id": "x", "object": "chat.completion"}).encode())
                prompt = " ".join(str(m.get("content", "")) for m in req.get("messages", []))
                body = {"id": "x", "object": "chat.completion", "created": 0, "model": req.get("model", "m"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": mmlu_reply(prompt)}}],
                        "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}
                return self._send(200, json.dumps(body).encode())

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture()
def endpoint():
    eps: list[Endpoint] = []

    def make(mode: str) -> Endpoint:
        eps.append(Endpoint(mode))
        return eps[-1]

    yield make
    for e in eps:
        e.close()


class ScriptedLocal:
    """The open model of the pool: a local backend that answers the MMLU prompts from a script."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.calls = 0

    def generate(self, requests, target=None, seed=None):
        self.calls += len(requests)
        out = []
        for r in requests:
            prompt = r.prompt if r.prompt is not None else " ".join(m["content"] for m in r.messages or [])
            out.append(Generation(text=mmlu_reply(prompt), model=self.spec.name, prompt_tokens=11, completion_tokens=4,
                                  finish_reason="stop", cost=self.spec.cost(11, 4)))
        return out


def remote_spec(base_url: str) -> ModelSpec:
    return ModelSpec(name="remote-chat", backend="api", open_weights=False, source="gpt-test", base_url=base_url,
                     price_in=0.1, price_out=0.4, timeout_s=TIMEOUT_S, max_retries=0, max_concurrency=4)


def mixed_pool(base_url: str) -> tuple[ModelPool, ScriptedLocal]:
    local = ModelSpec(name="local", backend="local", source_kind="folder", source="/nonexistent", price_in=0.1,
                      price_out=0.1)
    cfg = PoolConfig(name="mixed-test", models=[local, remote_spec(base_url)])
    be = ScriptedLocal(local)
    return ModelPool(cfg, backends={"local": be}), be


def run_collect(out: Path, base_url: str, n: int = 2, **cfg):
    pool, local = mixed_pool(base_url)
    c = CollectConfig(task="mmlu", limit=n, max_new_tokens=8, workflow_options={"rounds": 1}, **cfg)
    problems = load_problems("mmlu", None, n)
    return collect(c, out, problems=problems, pool=pool, workflow=get_workflow("mmlu", rounds=1), progress=False), local


def _key(r) -> tuple[str, str]:
    return r["problem_id"], r["key"]


@pytest.mark.parametrize("mode,error", [("refuse", "Connection"), ("timeout", "Timeout"), ("500", "HTTP 500"),
                                        ("malformed", ""), ("no_choices", "malformed response")])
def test_failing_endpoint_records_no_reward_and_a_healthy_run_fills_in_exactly_once(tmp_path, endpoint, mode, error):
    ep = endpoint(mode)
    out = tmp_path / "actions"
    s, local = run_collect(out, ep.base_url)
    # 2 problems x 4 assignments; every assignment but local/local uses the remote model and fails
    assert s.total == 8 and s.written == 2 and s.failed == 6 and not s.complete and not s.capped
    recs = read_actions(out)
    assert len(recs) == 2 and all(r["assignment"] == {"teacher": "local", "student": "local"} for r in recs)
    assert all(isinstance(r["reward"], float) and r["reward"] == r["score"] for r in recs)
    fails = [json.loads(x) for x in (out / FAILURES).read_text().splitlines()]
    assert len(fails) == 6 and all(f["attempt"] == 1 and "reward" not in f and "score" not in f for f in fails)
    assert all(f["call"]["model"] == "remote-chat" and error in f["error"] for f in fails), fails[0]
    assert {f["call"]["role"] for f in fails} == {"teacher", "student"}
    line = s.failure_summary()
    assert "6 episode(s) failed" in line and "remote-chat: 6" in line and fails[0]["error"] in line
    assert "6 will be retried" in line
    # the episode logs keep the failed episodes, marked
    logged = [json.loads(x) for p in sorted((out / "episodes").iterdir()) for x in p.read_text().splitlines()]
    assert sum(r["failed"] for r in logged) == 6 and all(r["score"] is None for r in logged if r["failed"])

    ep.set("healthy")
    s2, _ = run_collect(out, ep.base_url)
    assert (s2.done_before, s2.written, s2.failed, s2.complete) == (2, 6, 0, True)
    recs = read_actions(out)
    keys = [_key(r) for r in recs]
    assert len(keys) == len(set(keys)) == 8
    assert all(isinstance(r["reward"], float) and r["reward"] == r["score"] and r["tokens_in"] > 0 for r in recs)
    s3, _ = run_collect(out, ep.base_url)
    assert (s3.done_before, s3.written, s3.failed) == (8, 0, 0) and len(read_actions(out)) == 8


def test_attempt_cap_stops_retrying_and_says_what_to_do(tmp_path, endpoint):
    ep = endpoint("500")
    out = tmp_path / "actions"
    s1, _ = run_collect(out, ep.base_url, n=1, max_attempts=2)
    assert s1.failed == 3 and not s1.capped
    s2, _ = run_collect(out, ep.base_url, n=1, max_attempts=2)
    assert s2.failed == 3 and len(s2.capped) == 3 and all(f["attempt"] == 2 for f in s2.capped)
    lines = s2.capped_lines()
    assert len(lines) == 3
    assert "failed 2 of 2 attempts, no reward recorded" in lines[0] and "HTTP 500" in lines[0]
    assert "--max-attempts 3" in lines[0] and "teacher=" in lines[0] and "problem " in lines[0]
    assert "0 will be retried" in s2.failure_summary()
    calls = ep.calls
    s3, _ = run_collect(out, ep.base_url, n=1, max_attempts=2)  # out of attempts: not tried again
    assert ep.calls == calls and s3.failed == 0 and len(s3.capped) == 3 and s3.written == 0 and not s3.complete
    assert len(read_actions(out)) == 1
    ep.set("healthy")  # fixed, and the cap raised (a resume may change max_attempts)
    s4, _ = run_collect(out, ep.base_url, n=1, max_attempts=3)
    assert s4.written == 3 and s4.complete and not s4.capped and len(read_actions(out)) == 4


def test_a_record_marked_failed_is_not_done(tmp_path, endpoint):
    """An actions.jsonl line with failed: true (an older or hand-made file) is retried, not kept as done."""
    ep = endpoint("healthy")
    out = tmp_path / "actions"
    run_collect(out, ep.base_url, n=1)
    lines = (out / "actions.jsonl").read_text().splitlines()
    bad = dict(json.loads(lines[0]), failed=True, reward=None, score=None)
    (out / "actions.jsonl").write_text("\n".join([json.dumps(bad), *lines[1:]]) + "\n")
    s, _ = run_collect(out, ep.base_url, n=1)
    assert s.done_before == 3 and s.written == 1
    good = [r for r in read_actions(out) if not r.get("failed")]
    assert len({_key(r) for r in good}) == len(good) == 4


# ------------------------------------------------------------------ the commands, with the real SmolLM2
def _pool_yaml(path: Path, base_url: str) -> Path:
    import yaml

    doc = yaml.safe_load(Path(__file__).resolve().parents[1].joinpath("examples/pool_mixed.yaml").read_text())
    remote = next(m for m in doc["models"] if m["name"] == "remote-chat")
    remote.update(base_url=base_url, timeout_s=TIMEOUT_S, max_retries=0)
    remote.pop("api_key_env", None)
    path.write_text(yaml.safe_dump(doc))
    return path


def _haps(args: list[str], capsys) -> tuple[int, str, str]:
    from haps.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    got = capsys.readouterr()
    return int(e.value.code or 0), got.out, got.err


@pytest.mark.integration
def test_collect_and_run_commands_exit_1_with_a_summary(tmp_path, endpoint, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ep = endpoint("500")
    pool = _pool_yaml(tmp_path / "pool.yaml", ep.base_url)
    cfg = tmp_path / "collect.yaml"
    cfg.write_text("split_fractions: [1.0, 0.0, 0.0]\nworkflow_options: {rounds: 1}\n")
    out = tmp_path / "actions"
    args = ["collect", "--task", "mmlu", "--pool", str(pool), "--limit", "1", "--max-new-tokens", "4", "--config",
            str(cfg), "--out", str(out), "--no-progress", "--max-attempts"]
    code, stdout, stderr = _haps([*args, "1"], capsys)
    assert code == 1, stdout + stderr
    assert "3 episode(s) failed" in stderr and "remote-chat: 3" in stderr and "HTTP 500" in stderr
    assert "3 failed" in stdout.replace("\n", " ")  # the summary line counts the failures
    assert stderr.count("failed 1 of 1 attempts") == 3 and "--max-attempts 2" in stderr  # one line per pair
    assert [r["assignment"] for r in read_actions(out)] == [{"teacher": "smollm2-135m", "student": "smollm2-135m"}]
    ep.set("healthy")
    code, stdout, stderr = _haps([*args, "2"], capsys)
    assert code == 0, stderr
    assert len(read_actions(out)) == 4

    ep.set("500")
    log = tmp_path / "run.jsonl"
    code, stdout, stderr = _haps(["run", "--task", "mmlu", "--pool", str(pool), "--assign",
                                  "teacher=smollm2-135m,student=remote-chat", "--limit", "2", "--max-new-tokens",
                                  "4", "-o", "rounds=1", "--out", str(log), "--no-progress"], capsys)
    assert code == 1
    assert "2 of 2 episodes failed" in stderr and "remote-chat: 2" in stderr and "HTTP 500" in stderr
    assert "failed episodes" in stdout
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["failed"] for r in rows] == [True, True] and all(r["score"] is None for r in rows)
