"""Dynamic batching across requests: one router lane, one lane per pool model.

Requests that arrive together are routed together and decoded together::

    router lane:   batch = [first query] + whatever arrives within window_s (at most router_batch_size)
                   decisions = in_router_thread(router.decide(batch))          # one backbone pass per batch
    model lane m (local, open or not):
                   batch = [first row] + whatever arrives within window_s (at most max_batch_size)
                   drop rows whose client went away
                   for seed, rows in group_by_seed(batch):
                       gens = in_thread_of_m(generate(m, rows))                # rows carry their own adapters
    model lane m (closed, API): every row is its own call in a pool of max_concurrency threads

Single requests (``haps``, plain models) and every call of a workflow episode (``haps/<workflow>``) enter
the same model lanes, so they share batches. Each local model decodes in its own thread and each closed
model's calls run in theirs, so a slow API call never holds a local batch, and two local models decode at
once. While a batch decodes, new rows queue and form the next batch (the decode loop itself is not
continuous: rows join at batch boundaries).

A client that disconnects frees its row: a row still queued is dropped before its batch starts; a row
being decoded stops at its next token (`GenRequest.on_token` returns False; the other rows go on), and
leaves the batch (the engine compacts finished rows away).

``window_s = 0`` and batch sizes of 1 turn batching off (every request its own router pass and generate
call): the benchmark's "off" side.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from haps.models.types import Generation, GenRequest
from haps.serve.errors import GenerationError

TokenCallback = Callable[[int, bool], Any]  # (token id, the row finished with it) -> False to stop the row


def with_callback(req: GenRequest, on_token: TokenCallback) -> GenRequest:
    """``req`` calling ``on_token`` after each token (after its own `GenRequest.on_token`, if it had one)."""
    inner = req.on_token
    if inner is not None:
        def both(token: int, finished: bool) -> bool:
            a = inner(token, finished)
            b = on_token(token, finished)
            return a is not False and b is not False

        cb: TokenCallback = both
    else:
        cb = on_token
    return replace(req, on_token=cb)


@dataclass(eq=False)
class _Row:
    request: GenRequest
    seed: int | None
    future: asyncio.Future
    cancelled: threading.Event


class ModelLane:
    """The queue and worker of one model (see the module docstring)."""

    def __init__(self, name: str, run: Callable[[str, list[GenRequest], int | None], list[Generation]], *,
                 batched: bool, max_batch_size: int, window_s: float, workers: int = 1, metrics=None) -> None:
        self.name = name
        self._run = run
        self.batched = batched
        self.max_batch_size = max_batch_size if batched else 1
        self.window_s = window_s
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=1 if batched else workers, thread_name_prefix=f"haps-{name}")
        self._queue: asyncio.Queue[_Row] | None = None
        self._worker: asyncio.Task | None = None
        self._sem = asyncio.Semaphore(workers)
        self.calls = 0
        self.rows = 0

    async def submit(self, request: GenRequest, seed: int | None = None) -> Generation:
        if not self.batched:  # closed model: its own call, in its own thread
            async with self._sem:
                gens = await self._call([request], seed)
            return gens[0]
        fut = asyncio.get_running_loop().create_future()
        cancelled = threading.Event()
        fut.add_done_callback(lambda f: cancelled.set() if f.cancelled() else None)
        row = _Row(with_callback(request, lambda _t, _f: not cancelled.is_set()), seed, fut, cancelled)
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._work(), name=f"lane-{self.name}")
        self._queue.put_nowait(row)
        return await fut

    async def _call(self, requests: list[GenRequest], seed: int | None) -> list[Generation]:
        t0 = time.perf_counter()
        gens = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, self.name, requests, seed)
        if len(gens) != len(requests):
            raise GenerationError(f"model {self.name!r} returned {len(gens)} results for {len(requests)} requests.")
        self.calls += 1
        self.rows += len(requests)
        if self.metrics is not None:
            self.metrics.generate_call(self.name, len(requests), time.perf_counter() - t0)
        return gens

    async def _work(self) -> None:
        q = self._queue
        assert q is not None
        while True:
            batch = [await q.get()]
            if self.window_s > 0 and q.qsize() < self.max_batch_size - 1:
                await asyncio.sleep(self.window_s)  # let companions arrive
            while len(batch) < self.max_batch_size and not q.empty():
                batch.append(q.get_nowait())
            live = [r for r in batch if not r.future.done()]  # a client that went away
            groups: dict[int | None, list[_Row]] = {}
            for r in live:
                groups.setdefault(r.seed, []).append(r)
            for seed, rows in groups.items():
                rows = [r for r in rows if not r.future.done()]
                if not rows:
                    continue
                try:
                    gens = await self._call([r.request for r in rows], seed)
                except Exception as e:  # noqa: BLE001 - every waiting row gets the failure
                    for r in rows:
                        if not r.future.done():
                            r.future.set_exception(e)
                    continue
                for r, g in zip(rows, gens, strict=True):
                    if not r.future.done():
                        r.future.set_result(g)

    async def close(self) -> None:
        await _shut_down(self._worker, self._queue, self._executor)


@dataclass
class Routed:
    """A decision and how it was made."""

    decision: Any  # haps.api.RouteDecision
    batch_size: int
    router_s: float  # the router batch's time
    queue_s: float  # waiting for the batch to start


@dataclass(eq=False)
class _Query:
    query: Any
    future: asyncio.Future
    t_in: float


class RouterLane:
    """Routing queries gathered into router batches, decided in one router thread."""

    def __init__(self, decide: Callable[[list], list], *, max_batch_size: int, window_s: float, metrics=None) -> None:
        self._decide = decide
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="haps-router")
        self._queue: asyncio.Queue[_Query] | None = None
        self._worker: asyncio.Task | None = None
        self.batches: list[int] = []

    async def submit(self, query) -> Routed:
        fut = asyncio.get_running_loop().create_future()
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._work(), name="lane-router")
        self._queue.put_nowait(_Query(query, fut, time.perf_counter()))
        return await fut

    def _decide_each(self, queries: list) -> list:
        """The batch, or each query alone when the batch fails (one bad query never sinks the others)."""
        try:
            return list(self._decide(queries))
        except Exception:
            if len(queries) == 1:
                raise
        out = []
        for q in queries:
            try:
                out.append(self._decide([q])[0])
            except Exception as e:  # noqa: BLE001 - that query alone fails
                out.append(e)
        return out

    async def _work(self) -> None:
        q = self._queue
        assert q is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await q.get()]
            if self.window_s > 0 and q.qsize() < self.max_batch_size - 1:
                await asyncio.sleep(self.window_s)
            while len(batch) < self.max_batch_size and not q.empty():
                batch.append(q.get_nowait())
            live = [it for it in batch if not it.future.done()]
            if not live:
                continue
            t0 = time.perf_counter()
            try:
                decisions = await loop.run_in_executor(self._executor, self._decide_each, [it.query for it in live])
            except Exception as e:  # noqa: BLE001
                for it in live:
                    if not it.future.done():
                        it.future.set_exception(e)
                continue
            dt = time.perf_counter() - t0
            self.batches.append(len(live))
            if self.metrics is not None:
                self.metrics.router_call(len(live), dt)
            for it, d in zip(live, decisions, strict=True):
                if it.future.done():
                    continue
                if isinstance(d, Exception):
                    it.future.set_exception(d)
                else:
                    it.future.set_result(Routed(d, len(live), dt, t0 - it.t_in))

    async def close(self) -> None:
        await _shut_down(self._worker, self._queue, self._executor)


async def _shut_down(worker, queue, executor) -> None:
    """Stop a lane: cancel its worker, fail what still waits in its queue, release its thread."""
    if worker is not None:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    if queue is not None:
        while not queue.empty():
            item = queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(GenerationError("the server is shutting down"))
    executor.shutdown(wait=False, cancel_futures=True)
