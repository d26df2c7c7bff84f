"""`haps bench serve`'s parts on the tiny random models (the full run starts real `haps serve` processes: run it
by hand, `haps bench serve --quick` for a smoke run)."""

from __future__ import annotations

import asyncio

import pytest

from haps.bench.serve import (
    ServeBenchConfig,
    _batch_means,
    _load,
    _percentile,
    _resolve,
    cpu_info,
    find,
    prompts,
)
from haps.cli.bench_serve import results_table
from haps.serve import create_app
from serve_helpers import LiveServer, raw_models, tiny_pool, tiny_router


def test_percentiles_prompts_and_cpu():
    assert _percentile([], 0.5) is None
    assert _percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and _percentile([1.0, 2.0], 0.99) == pytest.approx(1.99)
    ps = prompts(40)
    assert len(set(ps)) == 40
    cpu = cpu_info()
    assert cpu["cpus"] >= 1 and isinstance(cpu["dtype_flags"], list)
    assert _batch_means({"haps_batch_size_sum": 4, "haps_batch_size_count": 2},
                        {"haps_batch_size_sum": 24, "haps_batch_size_count": 4}) == {"rows_per_generate": 10.0}


def test_client_load_against_a_live_server(smol_tokenizer):
    m = raw_models(smol_tokenizer)
    pool = tiny_pool(m["tiny-llama"], m["tiny-gemma3"])
    app = create_app(pool, router=tiny_router(smol_tokenizer, pool), batch_window_ms=30, default_max_tokens=4)
    cfg = ServeBenchConfig(clients=[3], requests_per_client=2, max_tokens=3)
    with LiveServer(app) as s:
        assert _resolve(["haps", "*"], s.url) == ["haps", "tiny-llama"]
        routed = asyncio.run(_load(s.base_url, cfg, 3, prompts(6), "haps"))
        plain = asyncio.run(_load(s.base_url, cfg, 3, prompts(6), "tiny-llama"))
    assert routed["ok"] == 6 and routed["errors"] == 0 and 0 < routed["router_share"] < 1
    assert plain["ok"] == 6 and plain["router_share"] is None and plain["p99_ms"] >= plain["p50_ms"] > 0
    data = {"cpu": cpu_info(), "config": {"clients": [3], "max_tokens": 3},
            "records": [{**routed, "batching": "on"}, {**plain, "batching": "on"}, {**plain, "batching": "off"}],
            "speedup_on_vs_off": {"tiny-llama": {"3": 1.0}}}
    assert find(data["records"], "tiny-llama", "off", 3)["model"] == "tiny-llama"
    assert results_table(data).row_count == 2
