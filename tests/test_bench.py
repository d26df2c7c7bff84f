"""`haps bench lora`: the benchmark's records and token checks on the real SmolLM2 (no timings asserted),
and its command-line options."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from haps.bench.lora import BenchConfig, markdown_table, run_bench
from haps.cli import _register, app


@pytest.mark.integration
def test_bench_lora_records_and_agreeing_modes():
    cfg = BenchConfig(models=["smollm2-135m"], batches=[2], layers=[1], modes=["base", "base_hf", "bmm", "loop", "peft"],
                      new_tokens=4, rounds=2, dtype_batches=[], gemm_n=256)
    data = run_bench(cfg)
    recs = {(r["mode"], r["layers"]): r for r in data["records"]}
    assert set(recs) == {("base", 0), ("base_hf", 0), ("bmm", 1), ("loop", 1), ("peft", 1)}
    assert data["roofline_gflops"] > 0 and len(data["sgemm_gflops_all"]) == 2
    for r in recs.values():
        assert not r["note"], r["note"]
        assert r["decode_tokens"] == 2 * 3 and r["tokens_per_s"] > 0 and r["roofline_frac"] > 0
    assert recs[("base", 0)]["ratio_to_base"] == 1.0 and recs[("base", 0)]["engine"] == "LeanDecode"
    assert recs[("base_hf", 0)]["engine"] == "HFDecode"
    # modes doing the same arithmetic give the same greedy tokens
    assert recs[("base_hf", 0)]["same_tokens_as"] == {"base": True, "rows_equal": 2, "rows": 2}
    for mode in ("loop", "peft"):
        assert recs[(mode, 1)]["same_tokens_as"] == {"bmm_k1": True, "rows_equal": 2, "rows": 2}
    assert "| smollm2-135m | 2 | bmm | 1 |" in markdown_table(data)


def test_bench_lora_rejects_unknown_modes_and_bad_lists(tmp_path):
    _register()
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "lora", "--out", str(tmp_path / "x.json"), "--modes", "base,fast"])
    assert res.exit_code == 2 and "fast" in res.output
    res = runner.invoke(app, ["bench", "lora", "--out", str(tmp_path / "x.json"), "--batches", "1,two"])
    assert res.exit_code == 2 and "comma-separated int" in res.output
    assert not (tmp_path / "x.json").exists()
