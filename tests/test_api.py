"""API backend against our own OpenAI-compatible server: a real uvicorn server in a thread on a free
127.0.0.1 port, serving the random `tiny_llama` LocalModel, driven through `ApiModel`."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import torch

from haps.config import ModelSpec, PoolConfig
from haps.errors import ConfigError
from haps.models.api import ApiModel, map_finish_reason
from haps.models.pool import ModelPool
from haps.models.types import GenRequest, RowAdapter
from haps.serve import create_app

PRICE_IN, PRICE_OUT = 3.0, 15.0


class Recording:
    """A backend wrapper that records batch sizes and can fail or stall on demand (not a patch:
    it wraps the model and calls it)."""

    def __init__(self, inner, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.spec = inner.spec
        self.tokenizer = inner.tokenizer
        self.delay_s = delay_s
        self.fail_next = 0
        self.batch_sizes: list[int] = []
        self._lock = threading.Lock()

    def generate(self, requests, target=None, seed=None):
        with self._lock:
            self.batch_sizes.append(len(requests))
            fail = self.fail_next > 0
            self.fail_next -= fail
        if self.delay_s:
            time.sleep(self.delay_s)
        if fail:
            raise RuntimeError("injected backend failure")
        return self.inner.generate(requests, target=target, seed=seed)


class ServerThread:
    """uvicorn serving ``app`` from a background thread on a socket bound to a free loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        while httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=10).status_code != 200:  # models loaded
            if time.monotonic() > deadline:
                raise RuntimeError("test server did not become ready")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def backends(tiny_llama):
    return {"tiny-llama": Recording(tiny_llama), "flaky": Recording(tiny_llama),
            "slow": Recording(tiny_llama, delay_s=0.6)}


@pytest.fixture(scope="module")
def server(backends):
    app = create_app(backends=backends, max_batch_size=8, batch_window_ms=30.0, default_max_tokens=8)
    with ServerThread(app) as s:
        yield s


def api_model(base_url: str, source: str = "tiny-llama", *, timeout_s: float = 30.0, max_retries: int = 2,
              max_concurrency: int = 8) -> ApiModel:
    spec = ModelSpec(name="closed-tiny", backend="api", open_weights=False, base_url=base_url, source=source,
                     price_in=PRICE_IN, price_out=PRICE_OUT, timeout_s=timeout_s, max_retries=max_retries,
                     max_concurrency=max_concurrency)
    return ApiModel(spec)


def chat(text: str, n: int = 6, **kw) -> GenRequest:
    return GenRequest(messages=[{"role": "user", "content": text}], max_new_tokens=n, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same(api_gens, local_gens) -> None:
    assert len(api_gens) == len(local_gens)
    for a, g in zip(api_gens, local_gens, strict=True):
        assert a.error is None, a.error
        assert a.text == g.text
        assert a.finish_reason == g.finish_reason
        assert (a.prompt_tokens, a.completion_tokens) == (g.prompt_tokens, g.completion_tokens)
        assert a.cost == pytest.approx((g.prompt_tokens * PRICE_IN + g.completion_tokens * PRICE_OUT) / 1e6)
        assert a.model == "closed-tiny" and a.token_ids == [] and a.logprobs == []


# ---------------------------------------------------------------------- round trips
def test_batch_matches_local_greedy(server, tiny_llama):
    reqs = [chat("Hello there", 6), chat("What is 2+2?", 9),
            chat("Name a colour.", 4, stop=["\n"]),
            GenRequest(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                       max_new_tokens=7)]
    # a stop string taken from the model's own output, so that one row ends on "stop"
    probe = tiny_llama.generate([chat("Tell me a story.", 12)])[0]
    assert len(probe.text) >= 6, probe.text
    reqs.append(chat("Tell me a story.", 12, stop=[probe.text[3:6], "zzqqzz"]))
    local = tiny_llama.generate(reqs)
    assert local[-1].finish_reason == "stop"
    got = api_model(server.base_url, max_concurrency=3).generate(reqs)
    assert_same(got, local)


def test_prompt_request_is_sent_as_one_user_message(server, tiny_llama):
    got = api_model(server.base_url).generate([GenRequest(prompt="Once upon a time", max_new_tokens=5)])
    assert_same(got, tiny_llama.generate([chat("Once upon a time", 5)]))


def test_concurrent_threads_all_answered_and_batched(server, backends, tiny_llama):
    rec = backends["tiny-llama"]
    rec.batch_sizes.clear()
    reqs = [chat(f"Question number {i}?", 5) for i in range(6)]
    local = tiny_llama.generate(reqs)
    model = api_model(server.base_url)
    results: dict[int, list] = {}
    barrier = threading.Barrier(len(reqs))

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = model.generate([reqs[i]])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == list(range(len(reqs)))
    for i in range(len(reqs)):
        assert_same(results[i], [local[i]])
    assert sum(rec.batch_sizes) == len(reqs)
    assert max(rec.batch_sizes) > 1, f"no request was batched with another: {rec.batch_sizes}"


def test_through_pool_with_api_spec(server, tiny_llama):
    spec = ModelSpec(name="closed-tiny", backend="api", open_weights=False, base_url=server.base_url,
                     source="tiny-llama", price_in=PRICE_IN, price_out=PRICE_OUT)
    pool = ModelPool(PoolConfig(models=[spec]))
    reqs = [chat("Hi", 4), chat("Bye", 5)]
    assert_same(pool.generate("closed-tiny", reqs), tiny_llama.generate(reqs))
    adapter = RowAdapter(A=[torch.zeros(64, 8)], B=[torch.zeros(8, 64)])
    with pytest.raises(ConfigError, match="closed"):
        pool.generate("closed-tiny", [chat("Hi", 4, adapter=adapter)])


# ---------------------------------------------------------------------- failures stay in their row
def test_unknown_model_gives_error_rows_without_retrying(server):
    model = api_model(server.base_url, source="no-such-model", max_retries=3)
    t0 = time.monotonic()
    got = model.generate([chat("a"), chat("b")])
    assert time.monotonic() - t0 < 2.0  # a 4xx is not retried (3 retries back off >= 2.6 s in all)
    for g in got:
        assert g.finish_reason == "error" and g.text == "" and g.cost == 0.0
        assert "HTTP 400 (after 1 attempt)" in g.error and "no-such-model" in g.error and "tiny-llama" in g.error


def test_bad_row_does_not_sink_the_batch(server, tiny_llama):
    good = [chat("first", 4), chat("third", 5)]
    bad = chat("second", 4, temperature=5.0)  # the server accepts 0..2
    got = api_model(server.base_url).generate([good[0], bad, good[1]])
    assert got[1].finish_reason == "error" and "temperature" in got[1].error and got[1].text == ""
    assert_same([got[0], got[2]], tiny_llama.generate(good))


def test_server_error_is_retried(server, backends, tiny_llama):
    flaky = backends["flaky"]
    flaky.batch_sizes.clear()
    flaky.fail_next = 2
    got = api_model(server.base_url, source="flaky", max_retries=3).generate([chat("retry me", 5)])
    assert_same(got, tiny_llama.generate([chat("retry me", 5)]))
    assert flaky.batch_sizes == [1, 1, 1]


def test_server_error_after_retries_is_an_error_row(server, backends):
    backends["flaky"].fail_next = 10
    got = api_model(server.base_url, source="flaky", max_retries=1).generate([chat("x", 3)])
    backends["flaky"].fail_next = 0
    assert got[0].finish_reason == "error"
    assert "HTTP 500 (after 2 attempts)" in got[0].error and "injected backend failure" in got[0].error


def test_server_down_gives_error_rows_after_retries():
    model = api_model(f"http://127.0.0.1:{free_port()}/v1", timeout_s=0.5, max_retries=2)
    got = model.generate([chat("a"), chat("b"), chat("c")])
    assert [g.finish_reason for g in got] == ["error"] * 3
    assert all("APIConnectionError (after 3 attempts)" in g.error for g in got)


def test_timeout_is_retried_then_an_error_row(server):
    got = api_model(server.base_url, source="slow", timeout_s=0.2, max_retries=1).generate([chat("x", 3)])
    assert got[0].finish_reason == "error" and "APITimeoutError (after 2 attempts)" in got[0].error


# ---------------------------------------------------------------------- configuration
def test_adapters_to_api_model_raise(server):
    adapter = RowAdapter(A=[torch.zeros(64, 8)], B=[torch.zeros(8, 64)])
    with pytest.raises(ConfigError, match="no adapter"):
        api_model(server.base_url).generate([chat("a"), chat("b", adapter=adapter)])


def test_api_key_from_named_env_var(monkeypatch):
    spec = dict(name="c", backend="api", open_weights=False, base_url="http://127.0.0.1:1/v1",
                api_key_env="HAPS_TEST_API_KEY")
    monkeypatch.delenv("HAPS_TEST_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="HAPS_TEST_API_KEY"):
        ApiModel(ModelSpec(**spec))
    monkeypatch.setenv("HAPS_TEST_API_KEY", "sk-test")
    assert ApiModel(ModelSpec(**spec)).client.api_key == "sk-test"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    no_key = ApiModel(ModelSpec(**{**spec, "api_key_env": None}))
    assert no_key.client.api_key != "sk-must-not-leak"


def test_finish_reason_mapping():
    assert map_finish_reason("length") == "length"
    assert map_finish_reason("stop") == "eos"
    assert map_finish_reason("stop", "\n") == "stop"
    assert map_finish_reason("content_filter") == "stop"


def test_create_app_serves_every_model_of_a_pool_and_loads_nothing():
    local = ModelSpec(name="loc", backend="local", source_kind="folder", source="/nonexistent")
    closed = ModelSpec(name="api", backend="api", open_weights=False, base_url="http://127.0.0.1:1/v1")
    app = create_app(ModelPool(PoolConfig(models=[local, closed])))  # nothing is loaded yet
    assert app.state.served.names == ["loc", "api"]
    assert app.state.service.served_models()[:1] == ["haps"] and app.state.service.status == "loading"
    with pytest.raises(ConfigError, match="nothing to serve"):
        create_app(backends={})


# ---------------------------------------------------------------------- the error body
def _post(server, body, **kw):
    return httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=30, **kw)


def _error(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert body["error"]["param"] == param
    return body["error"]


MSG = [{"role": "user", "content": "hi"}]


def test_error_bodies(server):
    e = _error(_post(server, {"model": "nope", "messages": MSG}), 400, "model")
    assert e["code"] == "model_not_found" and "tiny-llama" in e["message"] and e["type"] == "invalid_request_error"
    e = _error(_post(server, {"model": "tiny-llama", "messages": MSG, "n": 2}), 400, "n")
    assert "n=1" in e["message"]
    _error(_post(server, {"model": "tiny-llama", "messages": MSG, "stream_options": {"include_usage": True}}), 400,
           "stream_options")
    e = _error(_post(server, {"model": "tiny-llama", "messages": MSG, "top_p": 0}), 400, "top_p")
    assert "got 0" in e["message"]
    _error(_post(server, {"model": "tiny-llama"}), 400, "messages")
    _error(_post(server, {"model": "tiny-llama", "messages": MSG, "max_tokens": 10**6}), 400, "max_tokens")
    _error(httpx.post(f"{server.base_url}/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"}, timeout=30), 400, None)
    _error(httpx.get(f"{server.base_url}/no-such-route", timeout=30), 404)


def test_backend_failure_is_a_500_body(server, backends):
    backends["flaky"].fail_next = 1
    e = _error(_post(server, {"model": "flaky", "messages": MSG, "max_tokens": 2}), 500)
    assert e["type"] == "internal_server_error" and "injected backend failure" in e["message"]


def test_models_and_response_shape(server, tiny_llama):
    r = httpx.get(f"{server.base_url}/models", timeout=30)
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["tiny-llama", "flaky", "slow"]
    body = {"model": "tiny-llama", "messages": [{"role": "developer", "content": "Be brief."}] + MSG,
            "temperature": 0, "user": "ignored-field"}
    r = _post(server, body)
    assert r.status_code == 200, r.text
    out = r.json()
    local = tiny_llama.generate([GenRequest(messages=[{"role": "system", "content": "Be brief."}] + MSG,
                                            max_new_tokens=8)])[0]  # the server's default_max_tokens
    assert out["object"] == "chat.completion" and out["model"] == "tiny-llama"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": local.text}
    assert out["usage"] == {"prompt_tokens": local.prompt_tokens, "completion_tokens": local.completion_tokens,
                            "total_tokens": local.prompt_tokens + local.completion_tokens}


# ---------------------------------------------------------------------- real weights
@pytest.mark.integration
def test_real_smollm2_through_server(real_pool):
    reqs = [chat("What is the capital of France?", 8), chat("Say hello.", 6)]
    # one request at a time on both sides: the server batches concurrent requests by arrival, and a row's
    # greedy tokens may differ in the last float bits between batch compositions
    local = [real_pool.generate("smollm2-135m", [r])[0] for r in reqs]
    with ServerThread(create_app(real_pool, router=False)) as s:
        client = api_model(s.base_url, source="smollm2-135m")
        got = [client.generate([r])[0] for r in reqs]
    assert [g.text for g in got] == [g.text for g in local]
    assert [(g.prompt_tokens, g.completion_tokens) for g in got] == [
        (g.prompt_tokens, g.completion_tokens) for g in local]
