"""`haps serve` against the official openai client: a live server on a free 127.0.0.1 port started by the
test, over the tiny random models with a tiny untrained router (routing, adapters, workflows, streaming,
batching, limits, closed models, auth, shutdown, memory)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import threading
import time
import tracemalloc

import httpx
import openai
import psutil
import pytest

from haps.models.types import GenRequest
from haps.serve import create_app
from serve_helpers import MMLU_Q, LiveServer, Upstream, raw_models, tiny_pool, tiny_router


@pytest.fixture(scope="module")
def models(smol_tokenizer):
    return raw_models(smol_tokenizer)


@pytest.fixture(scope="module")
def tiny_llama(models):  # (these names shadow conftest's: the same weights, answering text-dependent)
    return models["tiny-llama"]


@pytest.fixture(scope="module")
def tiny_gemma3(models):
    return models["tiny-gemma3"]


@pytest.fixture(scope="module")
def pool(tiny_llama, tiny_gemma3):
    return tiny_pool(tiny_llama, tiny_gemma3)


@pytest.fixture(scope="module")
def router(smol_tokenizer, pool):
    return tiny_router(smol_tokenizer, pool)


@pytest.fixture(scope="module")
def server(pool, router):
    app = create_app(pool, router=router, batch_window_ms=40.0, default_max_tokens=6, max_tokens_limit=64,
                     max_prompt_tokens=300, max_messages=8, max_body_bytes=64 * 1024)
    with LiveServer(app) as s:
        yield s


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, **kw)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def local_text(model, text: str, n: int, **kw) -> str:
    return model.generate([GenRequest(messages=user(text), max_new_tokens=n, temperature=0.0, **kw)])[0].text


# ---------------------------------------------------------------------- the three kinds of request
def test_models_health_and_plain_model(server, tiny_llama):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["haps", "haps/mmlu", "haps/hotpotqa", "tiny-llama", "tiny-gemma3"]
    h = httpx.get(f"{server.url}/health").json()
    assert h["ready"] and h["status"] == "ok" and h["router"]["trained"] is False
    assert any("untrained backbone" in w for w in h["warnings"])
    r = c.chat.completions.create(model="tiny-llama", messages=user("Hello there"), max_tokens=7, temperature=0)
    assert r.choices[0].message.content == local_text(tiny_llama, "Hello there", 7)
    info = r.model_extra["haps"]
    assert info["route"] == "model" and info["assignment"] is None
    assert info["calls"][0]["model"] == "tiny-llama" and info["calls"][0]["adapter_norm"] is None
    assert info["cost"] == pytest.approx((r.usage.prompt_tokens * 1.0 + r.usage.completion_tokens * 2.0) / 1e6)


def test_haps_routes_one_request_with_its_adapter(server, pool, tiny_llama, tiny_gemma3):
    r = client(server).chat.completions.create(model="haps", messages=user("Name a colour."), max_tokens=5,
                                               temperature=0)
    info = r.model_extra["haps"]
    assert info["route"] == "haps" and info["workflow"] == "mmlu" and info["answered_by"] == "student"
    assert set(info["assignment"]) == {"teacher", "student"}
    assert sum(info["probs"].values()) == pytest.approx(1.0, abs=1e-5) and len(info["probs"]) == 4
    model = info["assignment"]["student"]
    assert info["calls"][0]["model"] == model
    assert info["adapter_norms"]["student"] == 0.0 and info["calls"][0]["adapter_norm"] == 0.0  # fresh heads: A = 0
    assert info["router_ms"] > 0 and info["trained"] is False
    # a zero update answers exactly as the base model does
    base = {"tiny-llama": tiny_llama, "tiny-gemma3": tiny_gemma3}[model]
    assert r.choices[0].message.content == local_text(base, "Name a colour.", 5)


def test_haps_mmlu_runs_the_whole_workflow(server):
    r = client(server).chat.completions.create(model="haps/mmlu", messages=user(MMLU_Q), max_tokens=6)
    info = r.model_extra["haps"]
    assert info["route"] == "workflow" and info["workflow"] == "mmlu"
    roles = [c["role"] for c in info["calls"]]
    assert roles[:2] == ["student", "teacher"] and len(roles) % 2 == 0 and len(roles) <= 6  # rounds of the default 3
    assert all(c["model"] == info["assignment"][c["role"]] for c in info["calls"])
    assert r.usage.prompt_tokens == sum(c["tokens_in"] for c in info["calls"])
    assert r.choices[0].message.content == (info["prediction"] or "")
    assert info["expected_cost"] >= info["cost"] > 0  # the cost model is an upper bound


def test_route_endpoint_decides_without_generating(server, pool):
    before = pool.backend("tiny-llama").totals.get("rows", 0) + pool.backend("tiny-gemma3").totals.get("rows", 0)
    r = httpx.post(f"{server.base_url}/route", json={"input": MMLU_Q, "workflow": "mmlu"}).json()
    assert r["object"] == "haps.route" and set(r["assignment"]) == {"teacher", "student"}
    assert max(r["probs"], key=r["probs"].get) == ",".join(f"{k}={v}" for k, v in r["assignment"].items())
    after = pool.backend("tiny-llama").totals.get("rows", 0) + pool.backend("tiny-gemma3").totals.get("rows", 0)
    assert after == before
    single = httpx.post(f"{server.base_url}/route", json={"messages": user(MMLU_Q), "single": True}).json()
    assert single["expected_cost"] < r["expected_cost"]  # one call against a whole episode


def test_max_cost_picks_the_best_affordable_assignment(server):
    url = f"{server.base_url}/route"
    free = httpx.post(url, json={"input": MMLU_Q}).json()
    cheapest = free["cheapest_cost"]
    e = httpx.post(url, json={"input": MMLU_Q, "max_cost": cheapest / 2}).json()["error"]
    assert e["param"] == "max_cost" and e["code"] == "max_cost_too_low" and f"{cheapest:.6g}" in e["message"]
    at_cheapest = httpx.post(url, json={"input": MMLU_Q, "max_cost": cheapest}).json()
    assert at_cheapest["expected_cost"] == pytest.approx(cheapest)
    assert at_cheapest["assignment"] == {"teacher": "tiny-llama", "student": "tiny-llama"}  # the cheapest prices
    assert at_cheapest["probs"] == pytest.approx(free["probs"])  # same prompt: same P(z|p)
    # chat: the same budget error, naming the cheapest cost
    with pytest.raises(openai.BadRequestError, match="cheapest expected cost"):
        client(server).chat.completions.create(model="haps/mmlu", messages=user(MMLU_Q), max_tokens=6,
                                               extra_body={"max_cost": 1e-9})


# ---------------------------------------------------------------------- async, streaming
def test_async_client_and_streaming_equal_the_plain_answer(server, tiny_llama):
    async def main():
        c = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        plain = await c.chat.completions.create(model="tiny-llama", messages=user("Tell me a story."),
                                                max_tokens=12, temperature=0)
        stream = await c.chat.completions.create(model="tiny-llama", messages=user("Tell me a story."),
                                                 max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True})
        chunks = [ch async for ch in stream]
        routed = await c.chat.completions.create(model="haps", messages=user("Tell me a story."), max_tokens=12,
                                                 temperature=0, stream=True)
        routed_chunks = [ch async for ch in routed]
        wf = await c.chat.completions.create(model="haps/mmlu", messages=user(MMLU_Q), max_tokens=4, stream=True)
        wf_chunks = [ch async for ch in wf]
        await c.close()
        return plain, chunks, routed_chunks, wf_chunks

    plain, chunks, routed_chunks, wf_chunks = asyncio.run(main())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content == local_text(tiny_llama, "Tell me a story.", 12)
    deltas = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(deltas) > 3  # token by token, not one chunk at the end
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["haps"]["route"] == "model"
    routed_final = [ch for ch in routed_chunks if ch.choices and ch.choices[0].finish_reason][0]
    assert routed_final.model_extra["haps"]["route"] == "haps"
    wf_final = [ch for ch in wf_chunks if ch.choices and ch.choices[0].finish_reason][0]
    assert wf_final.model_extra["haps"]["route"] == "workflow"


def test_streaming_holds_back_a_stop_string(server, tiny_gemma3):
    prompt = "Hello there"
    probe = local_text(tiny_gemma3, prompt, 16)
    # a stop string from the model's own output, first found a few characters in
    at = next(i for i in range(3, len(probe) - 3) if probe.find(probe[i:i + 3]) == i and probe[i:i + 3].strip())
    stop = probe[at:at + 3]
    plain = local_text(tiny_gemma3, prompt, 16, stop=[stop])
    stream = client(server).chat.completions.create(model="tiny-gemma3", messages=user(prompt),
                                                    max_tokens=16, temperature=0, stop=[stop], stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == plain == probe[:at]


# ---------------------------------------------------------------------- concurrency and batching
def test_32_concurrent_clients_get_their_own_answers(server, tiny_llama, tiny_gemma3):
    service = server.app.state.service
    words = ["apple", "river", "tiger", "piano", "candle", "rocket", "garden", "window"]
    prompts = [f"Request {i}: " + " ".join(["more"] * (i % 5)) + f" {words[i % 8]} number {i * 7919 % 1000}"
               for i in range(32)]
    models = ["tiny-llama" if i % 3 else "haps" for i in range(32)]
    calls_before = {n: lane.calls for n, lane in service.lanes.items()}
    rows_before = {n: lane.rows for n, lane in service.lanes.items()}
    c = client(server)
    out: dict[int, object] = {}
    barrier = threading.Barrier(32)

    def worker(i: int) -> None:
        barrier.wait()
        out[i] = c.chat.completions.create(model=models[i], messages=user(prompts[i]), max_tokens=5, temperature=0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(out) == list(range(32))
    base = {"tiny-llama": tiny_llama, "tiny-gemma3": tiny_gemma3}
    for i, r in out.items():
        info = r.model_extra["haps"]
        model = info["calls"][0]["model"]
        req = GenRequest(messages=user(prompts[i]), max_new_tokens=5)
        assert r.usage.prompt_tokens == len(base[model].encode(req)[1])  # its own prompt
        assert r.choices[0].message.content == local_text(base[model], prompts[i], 5), i
    rows = sum(service.lanes[n].rows - rows_before[n] for n in service.lanes)
    calls = sum(service.lanes[n].calls - calls_before[n] for n in service.lanes)
    assert rows == 32 and calls < rows / 2, (calls, rows)  # batched across requests
    assert max(service.router_lane.batches[-4:]) > 1  # the routed requests shared router batches


def test_workflow_calls_join_the_single_requests_batches(server):
    service = server.app.state.service
    seen: list[tuple[int, int]] = []  # (workflow rows, single rows) of each generate call
    runs = {n: lane._run for n, lane in service.lanes.items()}

    def recording(name, reqs, seed):
        wf = sum(1 for r in reqs if r.tag)  # workflow calls carry their episode's tag
        seen.append((wf, len(reqs) - wf))
        return runs[name](name, reqs, seed)

    for lane in service.lanes.values():
        lane._run = recording
    try:
        c = client(server)
        stop = threading.Event()

        def episode(i):
            c.chat.completions.create(model="haps/mmlu", messages=user(MMLU_Q.replace("plants", f"plants {i}")),
                                      max_tokens=4)

        def singles(i):
            while not stop.is_set():
                for model in ("tiny-llama", "tiny-gemma3"):
                    c.chat.completions.create(model=model, messages=user(f"hi {i}"), max_tokens=3, temperature=0)

        eps = [threading.Thread(target=episode, args=(i,)) for i in range(2)]
        sgl = [threading.Thread(target=singles, args=(i,)) for i in range(3)]
        for t in eps + sgl:
            t.start()
        for t in eps:
            t.join(timeout=120)
        stop.set()
        for t in sgl:
            t.join(timeout=60)
    finally:
        for n, lane in service.lanes.items():
            lane._run = runs[n]
    assert any(wf and single for wf, single in seen), seen  # one generate call held both kinds of row


# ---------------------------------------------------------------------- malformed input
BAD = [
    # (body or raw bytes, status, param, words in the message)
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "valid dictionary"),
    (b"", 400, None, "empty"),
    ({"model": "tiny-llama", "messages": user("hi"), "bogus": 1}, 400, "bogus", "unknown field"),
    ({"model": "tiny-llama", "messages": user("hi"), "max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ({"model": "tiny-llama", "messages": []}, 400, "messages", "at least 1"),
    ({"model": "tiny-llama"}, 400, "messages", "required"),
    ({"model": "tiny-llama", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role", "system"),
    ({"model": "tiny-llama", "messages": user("hi") * 9}, 400, "messages", "--max-messages"),
    ({"model": "tiny-llama", "messages": user("hi"), "max_tokens": 65}, 400, "max_tokens", "--max-tokens-limit"),
    ({"model": "tiny-llama", "messages": user("word " * 400)}, 400, "messages", "--max-prompt-tokens"),
    ({"model": "haps", "messages": user("word " * 400)}, 400, "messages", "--max-prompt-tokens"),
    ({"model": "nope", "messages": user("hi")}, 400, "model", "haps/mmlu"),
    ({"model": "tiny-llama", "messages": user("hi"), "n": 2}, 400, "n", "n=1"),
    ({"model": "tiny-llama", "messages": user("hi"), "logprobs": True}, 400, "logprobs", "logprobs=false"),
    ({"model": "tiny-llama", "messages": user("hi"), "tools": [{"type": "function"}]}, 400, "tools", "tool"),
    ({"model": "tiny-llama", "messages": user("hi"), "stream_options": {"include_usage": True}}, 400,
     "stream_options", "stream=true"),
    ({"model": "tiny-llama", "messages": user("hi"), "temperature": 3}, 400, "temperature", "got 3"),
    ({"model": "tiny-llama", "messages": user("hi"), "seed": 2**70}, 400, "seed", "less than or equal"),
    ({"model": "tiny-llama", "messages": user("hi"), "stop": ["x"] * 17}, 400, "stop", "at most 16"),
    ({"model": "tiny-llama", "messages": user("hi"), "stop": ""}, 400, "stop", "at least 1"),
    ({"model": "tiny-llama", "messages": [{"role": "user", "content": [{"type": "image", "x": 1}]}]}, 400,
     "messages.0.content.0.type", "'text'"),
    ({"model": "tiny-llama", "messages": user("hi"), "max_cost": 1.0}, 400, "max_cost", "routed requests"),
    ({"model": "haps", "messages": user("hi"), "max_cost": -1}, 400, "max_cost", "greater than or equal"),
    ({"model": "haps/mmlu", "messages": user("What is 2+2?")}, 400, "messages", "A. ..."),
    ({"model": "haps/hotpotqa", "messages": user("Who?")}, 400, "messages", "Context:"),
    ({"model": "haps", "messages": [{"role": "system", "content": "only a system message"}]}, 400, "messages",
     "user message"),
]


@pytest.mark.parametrize("body,status,param,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_malformed_requests_get_4xx_naming_the_problem(server, body, status, param, words):
    url = f"{server.base_url}/chat/completions"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(url, json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param, err
    assert words in err["error"]["message"], err


def test_lone_surrogates_body_too_large_wrong_method_and_route(server):
    url = f"{server.base_url}/chat/completions"
    raw = b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "bad \\ud800 text"}]}'
    r = httpx.post(url, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content", r.text
    big = json.dumps({"model": "tiny-llama", "messages": user("x" * 70_000)})
    r = httpx.post(url, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}]}'

    r = httpx.post(url, content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]["message"]
    r = httpx.get(url)
    assert r.status_code == 405 and r.json()["error"]["message"]
    r = httpx.get(f"{server.base_url}/nope")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'haps_rejected_total{reason="body"}' in metrics and 'haps_requests_total{route="/v1/chat/completions"' in metrics


# ---------------------------------------------------------------------- schemathesis
@pytest.fixture(scope="module")
def api_schema(server):
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    schema.config.generation.update(max_examples=30, modes=["positive", "negative"], database="none")
    return schema


def _short(case) -> None:
    """Keep generated chat requests short (the limits themselves are tested above)."""
    if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int) \
            and not isinstance(case.body["max_tokens"], bool) and case.body["max_tokens"] > 8:
        case.body["max_tokens"] = 8


def _schemathesis_checks():
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_5xx_and_no_schema_violation(api_schema, mode):
    """Every operation of the server's OpenAPI schema, bounded examples of valid and invalid input, with the
    checks: no 5xx, documented status codes and content types, responses that match their schema.
    (Hypothesis strategies per operation: schemathesis' pytest loader from a fixture needs a pytest < 9.)"""
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    checks = _schemathesis_checks()
    gen_mode = GenerationMode(mode)
    ran = []
    statuses: dict[str, set[int]] = {}
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)
        @given(case=operation.as_strategy(gen_mode))
        def run(case):
            _short(case)
            r = case.call_and_validate(checks=checks)
            statuses.setdefault(f"{case.method} {case.path}", set()).add(r.status_code)

        try:
            run()
        except Unsatisfiable:  # no input to make invalid (GET routes without parameters)
            assert mode == "negative" and operation.method.upper() == "GET"
            continue
        ran.append(f"{operation.method.upper()} {operation.path}")
    expected = {"POST /v1/chat/completions", "POST /v1/route"} | (
        {"GET /v1/models", "GET /health"} if mode == "positive" else set())
    assert expected <= set(ran), ran
    print(statuses)
    if mode == "positive":  # valid input is answered, not only refused
        assert 200 in statuses["POST /v1/chat/completions"] and 200 in statuses["POST /v1/route"], statuses
    else:
        assert statuses["POST /v1/chat/completions"] <= {400, 413}, statuses


# ---------------------------------------------------------------------- closed models
@pytest.mark.parametrize("mode", ["500", "slow"])
def test_closed_model_failure_is_retried_and_reported_in_that_request_alone(tiny_llama, tiny_gemma3, mode):
    with Upstream(mode, delay_s=1.5) as up:
        pool = tiny_pool(tiny_llama, tiny_gemma3, [up.spec(timeout_s=0.4, max_retries=1)])
        app = create_app(pool, router=False, default_max_tokens=4)
        with LiveServer(app) as s:
            c = client(s)
            box: dict = {}

            def remote():
                try:
                    c.chat.completions.create(model="remote", messages=user("hi"))
                except openai.APIStatusError as e:
                    box["error"] = e

            t = threading.Thread(target=remote)
            t.start()
            local = [c.chat.completions.create(model="tiny-llama", messages=user(f"hi {i}"), temperature=0)
                     for i in range(3)]
            t.join(timeout=30)
    assert all(r.choices[0].message.content is not None for r in local)
    e = box["error"]
    assert e.status_code == 502 and "'remote'" in e.message and "after 2 attempts" in e.message, e.message
    assert up.calls == 2  # retried once by the server's client



def test_a_slow_closed_model_never_holds_the_local_batches(tiny_llama, tiny_gemma3):
    with Upstream("hold") as up:
        pool = tiny_pool(tiny_llama, tiny_gemma3, [up.spec(timeout_s=60, max_retries=0)])
        with LiveServer(create_app(pool, router=False, default_max_tokens=4)) as s:
            c = client(s)
            box: dict = {}
            t = threading.Thread(target=lambda: box.setdefault("r", c.chat.completions.create(
                model="remote", messages=user("hi"))))
            t.start()
            deadline = time.monotonic() + 30
            while not up.holding and time.monotonic() < deadline:
                time.sleep(0.01)
            local = [c.chat.completions.create(model=m, messages=user(f"hi {i}"), temperature=0)
                     for i, m in enumerate(["tiny-llama", "tiny-gemma3", "tiny-llama"])]
            still_held = up.holding == 1 and t.is_alive()
            up.release.set()
            t.join(timeout=30)
    assert still_held and all(r.choices for r in local)  # answered while the remote call was held
    assert box["r"].choices[0].message.content == "upstream says hi"


def test_api_keys_are_never_logged_or_echoed(tiny_llama, tiny_gemma3, monkeypatch):
    key, token = "sk-upstream-SECRET-4242", "haps-bearer-SECRET-1717"
    monkeypatch.setenv("HAPS_TEST_UPSTREAM_KEY", key)
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    grab = Grab(level=logging.DEBUG)
    root = logging.getLogger()
    old = root.level
    root.addHandler(grab)
    root.setLevel(logging.DEBUG)
    try:
        with Upstream("echo-key") as up:
            pool = tiny_pool(tiny_llama, tiny_gemma3, [up.spec(api_key_env="HAPS_TEST_UPSTREAM_KEY", max_retries=0)])
            app = create_app(pool, router=False, api_key=token, default_max_tokens=4)
            with LiveServer(app) as s:
                c = openai.OpenAI(base_url=s.base_url, api_key=token, max_retries=0)
                with pytest.raises(openai.APIStatusError) as err:
                    c.chat.completions.create(model="remote", messages=user("hi"))
                bad = httpx.post(f"{s.base_url}/chat/completions", json={"model": "remote", "messages": user("hi")},
                                 headers={"authorization": "Bearer wrong"})
                ok = c.chat.completions.create(model="tiny-llama", messages=user("hi"))
                up.mode = "ok"
                fine = c.chat.completions.create(model="remote", messages=user("hi"))
    finally:
        root.removeHandler(grab)
        root.setLevel(old)
    assert up.tokens[0] == key  # the key was sent upstream ...
    assert "[redacted]" in err.value.message and key not in err.value.message  # ... never echoed back
    assert bad.status_code == 401 and token not in bad.text
    assert ok.choices and fine.choices[0].message.content == "upstream says hi"
    logs = "\n".join(records)
    assert records and key not in logs and token not in logs


# ---------------------------------------------------------------------- auth, loading, shutdown
def test_bearer_token(pool, router):
    app = create_app(pool, router=router, api_key="s3cret-token", default_max_tokens=3)
    with LiveServer(app) as s:
        url = f"{s.base_url}/chat/completions"
        body = {"model": "tiny-llama", "messages": user("hi")}
        missing = httpx.post(url, json=body)
        wrong = httpx.post(url, json=body, headers={"authorization": "Bearer s3cret-tokem"})
        basic = httpx.post(url, json=body, headers={"authorization": "Basic s3cret-token"})
        assert [r.status_code for r in (missing, wrong, basic)] == [401, 401, 401]
        assert "missing bearer token" in missing.json()["error"]["message"]
        assert missing.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{s.url}/metrics").status_code == 401
        assert httpx.get(f"{s.url}/health").status_code == 200  # probes need no token
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.base_url, api_key="nope", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=s.base_url, api_key="s3cret-token", max_retries=0)
        assert ok.chat.completions.create(**body).choices[0].message.content is not None


def test_health_is_503_until_loaded(pool, router):
    app = create_app(pool, router=router, default_max_tokens=3)
    service = app.state.service
    gate = threading.Event()
    load = service.load
    service.load = lambda: (gate.wait(30), load())
    with LiveServer(app, ready=False) as s:
        h = httpx.get(f"{s.url}/health")
        r = httpx.post(f"{s.base_url}/chat/completions", json={"model": "tiny-llama", "messages": user("hi")})
        listing = httpx.get(f"{s.base_url}/models")
        gate.set()
        deadline = time.monotonic() + 30
        while httpx.get(f"{s.url}/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        after = httpx.post(f"{s.base_url}/chat/completions", json={"model": "tiny-llama", "messages": user("hi")})
    assert h.status_code == 503 and h.json()["status"] == "loading"
    assert r.status_code == 503 and "loading" in r.json()["error"]["message"] and r.headers["retry-after"]
    assert listing.status_code == 503  # a client waiting for the model list waits for the models
    assert after.status_code == 200


def test_shutdown_with_requests_in_flight_loses_none(pool, router):
    app = create_app(pool, router=router, default_max_tokens=24, batch_window_ms=20)
    s = LiveServer(app).__enter__()
    c = client(s)
    results: dict[int, object] = {}

    def one(i):
        try:
            model = ["tiny-llama", "haps", "haps/mmlu"][i % 3]
            text = MMLU_Q if model == "haps/mmlu" else f"Tell me about {i}."
            results[i] = c.chat.completions.create(model=model, messages=user(text), temperature=0)
        except Exception as e:  # noqa: BLE001
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(9)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while app.state.metrics.in_flight._value.get() < 9 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert app.state.metrics.in_flight._value.get() >= 9
    s.stop()  # what SIGTERM does: stop accepting, finish what is in flight
    for t in threads:
        t.join(timeout=60)
    assert not s.thread.is_alive()
    errors = {i: r for i, r in results.items() if isinstance(r, Exception)}
    assert len(results) == 9 and not errors, errors
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{s.url}/health")


def test_a_disconnected_client_frees_its_row(pool, router, tiny_llama, monkeypatch):
    step = tiny_llama._append

    def slow(req, row, token, logprob):  # a model slow enough for the hang-up to come mid-answer
        time.sleep(0.003)
        return step(req, row, token, logprob)

    monkeypatch.setattr(tiny_llama, "_append", slow)
    app = create_app(pool, router=router, max_tokens_limit=480)
    with LiveServer(app) as s:
        before = tiny_llama.totals.get("decode_tokens", 0)
        with httpx.Client(timeout=30) as h, h.stream("POST", f"{s.base_url}/chat/completions", json={
                "model": "tiny-llama", "messages": user("Go on and on."), "max_tokens": 480, "temperature": 0,
                "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break  # a token arrived: hang up
        lane = s.app.state.service.lanes["tiny-llama"]
        deadline = time.monotonic() + 60
        while lane.calls == 0 and time.monotonic() < deadline:  # the generate call returned
            time.sleep(0.01)
        decoded = tiny_llama.totals.get("decode_tokens", 0) - before
    assert lane.calls == 1 and 0 < decoded < 400, decoded  # it stopped soon after the client left, short of 480


def test_prompts_longer_than_a_context_window_are_400s(pool, router):
    """The server's own limit allows them, the windows (512 tokens: the tiny router backbone, the tiny models) do not."""
    app = create_app(pool, router=router, max_prompt_tokens=4000, max_body_bytes=1 << 20, default_max_tokens=4)
    with LiveServer(app) as s:
        url = f"{s.base_url}/chat/completions"
        routed = httpx.post(url, json={"model": "haps", "messages": user("word " * 600)}).json()["error"]
        plain = httpx.post(url, json={"model": "tiny-llama", "messages": user("word " * 600)}).json()["error"]
    assert "router backbone's context window of 512" in routed["message"] and routed["param"] == "messages"
    assert "context window of 512" in plain["message"] and plain["code"] == "context_length_exceeded"


# ---------------------------------------------------------------------- memory
def test_memory_after_rejected_oversized_requests_stays_where_it_was(pool, router):
    app = create_app(pool, router=router, default_max_tokens=3, max_body_bytes=256 * 1024, max_prompt_tokens=200)
    url_tail = "/chat/completions"
    huge = json.dumps({"model": "tiny-llama", "messages": user("x" * (2 << 20))})  # 2 MB: over the body limit
    long = json.dumps({"model": "haps", "messages": user("word " * 40_000)})  # 200 kB, 40k tokens: over the prompt limit
    with LiveServer(app) as s:
        h = httpx.Client(timeout=60, headers={"content-type": "application/json"})

        def rejected():
            assert h.post(s.base_url + url_tail, content=huge).status_code == 413
            r = h.post(s.base_url + url_tail, content=long)
            assert r.status_code == 400 and "--max-prompt-tokens" in r.text

        for _ in range(3):  # warm every code path (and the allocator's arenas of the worker threads) first
            rejected()
            h.post(s.base_url + url_tail, json={"model": "haps", "messages": user("hi")})
        gc.collect()
        proc = psutil.Process(os.getpid())
        rss0 = proc.memory_info().rss
        tracemalloc.start()
        snap0 = tracemalloc.take_snapshot()
        for _ in range(5):
            rejected()
        gc.collect()
        snap1 = tracemalloc.take_snapshot()
        tracemalloc.stop()
        rss1 = proc.memory_info().rss
        h.close()
    grown = sum(st.size_diff for st in snap1.compare_to(snap0, "filename"))
    assert grown < 1 << 20, grown  # Python objects kept: < 1 MB after 5 x (2 MB + 200 kB) rejected
    # process memory: no tensor was built for them (the router's attention over 40k tokens alone would take GBs;
    # the slack is the allocator keeping what tokenizer threads freed)
    assert rss1 - rss0 < 64 << 20, (rss1 - rss0) / 2**20


# ---------------------------------------------------------------------- the command, real weights
@pytest.mark.integration
def test_haps_serve_command_on_the_tiny_pool(tmp_path):
    """`haps serve` as a user starts it: the real tiny pool, the untrained router (warned about), a bearer token
    from the environment, SIGTERM with a request in flight (answered), nothing secret in its output."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    token = "tok-INTEGRATION-9999"
    env = {**os.environ, "HAPS_TEST_TOKEN": token, "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "haps", "serve", "--pool", "tiny", "--port", str(port),
                                 "--api-key-env", "HAPS_TEST_TOKEN", "--default-max-tokens", "4",
                                 "--max-tokens-limit", "8"], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                h = httpx.get(f"{url}/health", timeout=5)
                if h.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.5)
        assert not h.json()["router"]["trained"] and "untrained" in " ".join(h.json()["warnings"])
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=300)
        first = c.chat.completions.create(model="haps", messages=user("What is the capital of France?"))
        assert first.model_extra["haps"]["assignment"]["student"] in ("smollm2-135m", "gemma3-270m")
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("r", c.chat.completions.create(
            model="haps/mmlu", messages=user(MMLU_Q))))
        t.start()
        time.sleep(1.0)  # in flight (routing or decoding)
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=300)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert box["r"].model_extra["haps"]["route"] == "workflow"  # finished, not dropped
    text = log.read_text()
    assert "untrained backbone" in text and token not in text
