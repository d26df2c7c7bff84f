"""Collection runs the shared prefixes of a problem's episode tree once (greedy decoding): the records are
identical with and without sharing, and fewer rows are generated."""

from __future__ import annotations

import json

import pytest
import torch

from haps.models.types import GenRequest, RowAdapter
from haps.workflows.runner import share_rows


def _random_llama(tokenizer, name: str, seed: int, completion: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    from haps.config import ModelSpec
    from haps.models.local import LocalModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    spec = ModelSpec(name=name, source_kind="folder", source="/nonexistent-tiny", price_in=1.0 + seed, price_out=2.0,
                     completion_style=completion)
    return LocalModel(spec, LlamaForCausalLM(cfg).eval().requires_grad_(False), tokenizer, max_batch_size=16)


@pytest.fixture(scope="module")
def rand_pool(smol_tokenizer):
    from haps.config import PoolConfig
    from haps.models.pool import ModelPool

    models = {"rand-a": _random_llama(smol_tokenizer, "rand-a", 0),
              "rand-b": _random_llama(smol_tokenizer, "rand-b", 1, completion=True)}
    return ModelPool(PoolConfig(name="tinyrand", models=[m.spec for m in models.values()]), backends=models)


def test_share_rows_merges_only_identical_greedy_requests():
    a = GenRequest(prompt="x", max_new_tokens=4, tag="p1/student")
    b = GenRequest(prompt="x", max_new_tokens=4, tag="p1/student")  # same request
    c = GenRequest(prompt="x", max_new_tokens=5)  # another cap
    d = GenRequest(prompt="x", max_new_tokens=4, temperature=0.7)  # sampled: never shared
    e = GenRequest(prompt="x", max_new_tokens=4, temperature=0.7)
    ad = RowAdapter(A=[torch.zeros(2, 1)], B=[torch.zeros(1, 2)])
    f = GenRequest(prompt="x", max_new_tokens=4, adapter=ad)  # an adapter: never shared
    g = GenRequest(messages=[{"role": "user", "content": "x"}], max_new_tokens=4)
    h = GenRequest(messages=[{"role": "user", "content": "x"}], max_new_tokens=4)
    rows, row_of = share_rows([a, b, c, d, e, f, g, h, a])
    assert rows == [a, c, d, e, f, g] and row_of == [0, 0, 1, 2, 3, 4, 5, 5, 0]


def _records(out):
    from haps.train.collect import read_actions

    recs = read_actions(out)
    for r in recs:
        r.pop("episode_log")
    return sorted(recs, key=lambda r: (r["problem_id"], r["key"]))


def _turns(out):
    eps = []
    for f in sorted((out / "episodes").glob("*.jsonl")):
        eps += [json.loads(x) for x in f.read_text().splitlines()]
    return sorted((e["id"], json.dumps(e["assignment"], sort_keys=True), json.dumps(e["turns"], sort_keys=True))
                   for e in eps)


@pytest.mark.parametrize("task,options", [("mmlu", {"rounds": 2}), ("hotpotqa", {"budget": 1, "summaries": False,
                                                                                  "passage_chars": 120})])
def test_collection_with_and_without_sharing_is_identical(tmp_path, rand_pool, task, options):
    from haps.train.collect import CollectConfig, collect
    from haps.workflows.loader import get_workflow
    from haps.workflows.runner import RunStats, run_episodes

    stats = {}

    def counting(mode):
        def run(*a, **kw):
            stats[mode] = RunStats()
            return run_episodes(*a, stats=stats[mode], **kw)
        return run

    wf = get_workflow(task, **options)
    wf.stratify_by = None
    for mode, share in (("plain", False), ("shared", True)):
        cfg = CollectConfig(task=task, limit=3, max_new_tokens=6, workflow_options=options, share_tree=share,
                            split_fractions=(0.4, 0.3, 0.3), chunk_size=3)
        s = collect(cfg, tmp_path / mode, pool=rand_pool, workflow=wf, runner=counting(mode), progress=False)
        assert s.complete and s.written == 12
    assert _records(tmp_path / "plain") == _records(tmp_path / "shared")
    assert _turns(tmp_path / "plain") == _turns(tmp_path / "shared")
    plain, shared = stats["plain"], stats["shared"]
    # the Student's first turn of each (problem, student model) ran once: 3 problems x 2 models rows fewer
    assert plain.shared_rows == 0 and shared.shared_rows >= 6
    assert shared.rows == plain.rows - shared.shared_rows
    assert shared.tokens_out == plain.tokens_out and shared.calls == plain.calls


def test_bench_collect_reports_the_ratio_and_identity(tmp_path, rand_pool):
    from typer.testing import CliRunner

    from haps.bench.collect import CollectBenchConfig, run_bench
    from haps.cli import _register, app
    from haps.data import load_problems
    from haps.workflows.loader import get_workflow

    cfg = CollectBenchConfig(task="mmlu", n=2, max_new_tokens=4, workflow_options={"mmlu": {"rounds": 1}})
    wf = get_workflow("mmlu", rounds=1)
    res = run_bench(cfg, pool=rand_pool, workflow=wf, problems=load_problems("mmlu", None, 2), progress=False)
    assert res["pairs"] == res["identical_records"] == res["identical_turns"] == 8
    assert res["modes"]["share"]["shared_rows"] == 4 and res["modes"]["no_share"]["shared_rows"] == 0
    assert res["modes"]["share"]["rows"] == res["modes"]["no_share"]["rows"] - 4 and res["speedup"] > 0
    _register()
    bad = CliRunner().invoke(app, ["bench", "collect", "--n", "0", "--out", str(tmp_path / "x.json")])
    assert bad.exit_code == 2 and not (tmp_path / "x.json").exists()
