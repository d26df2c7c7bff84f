"""End to end on the real tiny pool (integration): `haps rl` for 2 updates, resumed by the same command, then
`haps infer` with and without the generated adapters, `haps export-adapter`, and the one-line errors of a
router used for a task it was not trained for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _haps(args: list[str], cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run([sys.executable, "-m", "haps", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_rl_two_steps_then_infer_and_export_on_the_tiny_pool(tmp_path, data_root):
    data = str(data_root / "mmlu" / "val.jsonl")
    cfg = tmp_path / "rl.yaml"
    cfg.write_text("workflow_options: {rounds: 1}\nbatch_size: 1\nmax_new_tokens: 6\nvalid_limit: 1\ntest_limit: 1\n"
                   "validate_every: 2\nsave_every: 1\nlimit: 10\nproblem_seed: 0\n")
    out = tmp_path / "rl"
    args = ["rl", "--task", "mmlu", "--config", str(cfg), "--data", data, "--steps", "2", "--out", str(out),
            "--no-progress"]
    res = _haps(args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 1] and all(s["failed"] == 0 for s in steps)
    assert all(set(s["adapter_norms"]) <= {"smollm2-135m", "gemma3-270m"} for s in steps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["best_step"] == 2 and summary["test"]["problems"] == 1
    assert (out / "best" / "router.json").exists() and (out / "best" / "heads.safetensors").exists() and (out / "test" / "episodes.jsonl").exists()
    again = _haps(args, tmp_path)  # everything done: resumes at step 2, nothing more to train
    assert again.returncode == 0, again.stderr[-3000:]
    assert len((out / "log.jsonl").read_text().splitlines()) == 2

    common = ["--task", "mmlu", "--router", str(out / "best"), "--data", data, "--limit", "2", "--max-new-tokens", "6",
              "-o", "rounds=1", "--no-progress"]
    with_log, without_log = tmp_path / "with.jsonl", tmp_path / "without.jsonl"
    res = _haps(["infer", *common, "--out", str(with_log)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "with generated adapters" in res.stdout
    eps = [json.loads(x) for x in with_log.read_text().splitlines()]
    assert len(eps) == 2 and all(not e["failed"] for e in eps)
    for e in eps:
        for t in e["turns"]:
            assert t["model"] == e["assignment"][t["role"]]
            assert t["adapter_norm"] is not None and t["adapter_norm"] >= 0.0  # every pool model is open
    res = _haps(["infer", *common, "--no-adapters", "--out", str(without_log)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    off = [json.loads(x) for x in without_log.read_text().splitlines()]
    assert [e["assignment"] for e in off] == [e["assignment"] for e in eps]  # the same routing decisions
    assert all(t["adapter_norm"] is None for e in off for t in e["turns"])

    peft_dir = tmp_path / "peft"
    res = _haps(["export-adapter", "--router", str(out / "best"), "--task", "mmlu", "--data", data, "--index", "0",
                 "--role", "student", "--out", str(peft_dir)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    conf = json.loads((peft_dir / "adapter_config.json").read_text())
    assert conf["r"] == 8 and (peft_dir / "adapter_model.safetensors").exists()

    bad = _haps(["infer", "--task", "hotpotqa", "--router", str(out / "best"), "--limit", "1",
                 "--out", str(tmp_path / "x.jsonl")], tmp_path)
    err = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(err) == 1 and "mmlu" in err[0] and "hotpotqa" in err[0], bad.stderr[-2000:]
    assert not (tmp_path / "x.jsonl").exists()
