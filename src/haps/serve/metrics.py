"""Prometheus metrics of one server (`GET /metrics`), in a registry of its own (``app.state``, no globals).

| metric | labels | what |
| --- | --- | --- |
| ``haps_requests_total`` | route, status | HTTP requests answered |
| ``haps_request_seconds`` | route | request latency (histogram) |
| ``haps_router_seconds`` | | router batch time per routed request |
| ``haps_router_batch_size`` | | requests per router batch |
| ``haps_batch_size`` | model | rows per generate call |
| ``haps_generate_seconds`` | model | generate call time |
| ``haps_tokens_total`` | model, kind (prompt, completion) | tokens |
| ``haps_cost_usd_total`` | model | USD from the pool's prices |
| ``haps_selections_total`` | model, role | models the router chose, per role |
| ``haps_in_flight`` | | requests being answered |
| ``haps_rejected_total`` | reason | requests refused by a limit (body, messages, prompt_tokens, max_tokens, auth) |
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("haps_requests_total", "HTTP requests answered.", ["route", "status"], registry=r)
        self.latency = Histogram("haps_request_seconds", "Request latency.", ["route"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.router_seconds = Histogram("haps_router_seconds", "Router batch time per routed request.",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.router_batch = Histogram("haps_router_batch_size", "Requests per router batch.", buckets=BATCH_BUCKETS,
                                      registry=r)
        self.batch = Histogram("haps_batch_size", "Rows per generate call.", ["model"], buckets=BATCH_BUCKETS,
                               registry=r)
        self.generate_seconds = Histogram("haps_generate_seconds", "Generate call time.", ["model"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("haps_tokens_total", "Tokens.", ["model", "kind"], registry=r)
        self.cost = Counter("haps_cost_usd_total", "USD spent, from the pool's prices.", ["model"], registry=r)
        self.selections = Counter("haps_selections_total", "Models the router chose, per role.", ["model", "role"],
                                  registry=r)
        self.in_flight = Gauge("haps_in_flight", "Requests being answered.", registry=r)
        self.rejected = Counter("haps_rejected_total", "Requests refused by a limit.", ["reason"], registry=r)

    def generation(self, model: str, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        self.tokens.labels(model, "prompt").inc(prompt_tokens)
        self.tokens.labels(model, "completion").inc(completion_tokens)
        self.cost.labels(model).inc(cost)

    def generate_call(self, model: str, rows: int, seconds: float) -> None:
        self.batch.labels(model).observe(rows)
        self.generate_seconds.labels(model).observe(seconds)

    def router_call(self, rows: int, seconds: float) -> None:
        self.router_batch.observe(rows)
        for _ in range(rows):
            self.router_seconds.observe(seconds)

    def selected(self, assignment: dict[str, str]) -> None:
        for role, model in assignment.items():
            self.selections.labels(model, role).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
