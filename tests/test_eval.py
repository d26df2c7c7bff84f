"""`haps eval` (haps.evaluation): metrics wiring on a hand-made action table, failed episodes, the HAPS
rows through a stand-in ``run_infer``, lookup vs real episodes, and the command end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError

from evalfixtures import SPACE, install_fake_infer, write_collection
from haps.errors import ConfigError
from haps.evaluation.config import EvalConfig
from haps.evaluation.methods import parse_methods, split_methods
from haps.evaluation.run import run_eval
from haps.labels import Labeler, short_model_names

# Test split (4 problems) by hand; None = a failed episode. Costs rise with the assignment index.
TEST_SCORES = {
    "t0": [0, 1, 0, 1],
    "t1": [1, 0, 0, 1],
    "t2": [0, 0, 1, 1],
    "t3": [0, None, 1, 0],
}
COST = [1e-4, 2e-4, 3e-4, 4e-4]
K_SS, K_SB, K_BS, K_BB = (SPACE.key(z) for z in SPACE.assignments())


def hand_cells(pid, split, j):
    if split == "test":
        s = TEST_SCORES[pid][j]
        return None if s is None else (float(s), COST[j])
    if split == "valid":  # z1 = (small, big) is best on valid; z3 is best on test
        return (1.0 if j == 1 else 0.0), COST[j]
    return float((int(pid[1:]) + j) % 2), COST[j]  # train: z0/z2 on even ids, z1/z3 on odd ones


def hand_collection(tmp_path, failures_file: bool = False):
    splits = {"train": [f"r{i}" for i in range(6)], "valid": ["v0", "v1"], "test": list(TEST_SCORES)}
    return write_collection(tmp_path / "actions", splits, hand_cells, failures_file=failures_file)


def config(tmp_path, **kw):
    base = dict(task="mmlu", actions=str(tmp_path / "actions"), out=str(tmp_path / "eval"),
                methods=["oracle,random,all-static,best_static"], n_boot=200)
    base.update(kw)
    return EvalConfig(**base)


def test_labels_are_short_and_unique():
    assert short_model_names(["smollm2-135m", "gemma3-270m"]) == {"smollm2-135m": "smollm2", "gemma3-270m": "gemma3"}
    assert short_model_names(["llama-3.2-1b", "llama-3.1-8b"]) == {"llama-3.2-1b": "llama-3.2",
                                                                   "llama-3.1-8b": "llama-3.1"}
    assert short_model_names(["qwen-7b", "qwen-14b"]) == {"qwen-7b": "qwen-7b", "qwen-14b": "qwen-14b"}
    lab = Labeler(SPACE)
    assert lab.assignment(K_SB) == "T=small S=big"
    assert lab.method(f"static:{K_BS}") == "T=big S=small"
    assert lab.method("routellm_mf") == "RouteLLM-MF"


def test_method_specs():
    assert split_methods(["oracle,static:teacher=small,student=big,knn", "static:1,0"]) == [
        "oracle", "static:teacher=small,student=big", "knn", "static:1,0"]
    specs = parse_methods(["all-static,static:1,0,haps"], SPACE, router="ckpt")
    assert [s.name for s in specs] == [f"static:{k}" for k in (K_SS, K_SB, K_BS, K_BB)] + ["haps"]
    assert specs[-1].arg == "ckpt"
    with pytest.raises(ConfigError, match="--router"):
        parse_methods(["haps"], SPACE)
    with pytest.raises(ConfigError, match="unknown method"):
        parse_methods(["nope"], SPACE)
    with pytest.raises(ValidationError, match="tradeoff"):
        EvalConfig(task="mmlu", actions="a", out="o", reward="tradeoff", alpha=0.5)


@pytest.mark.parametrize("failures_file", [False, True], ids=["failed-record", "failures.jsonl"])
def test_metrics_on_a_hand_made_table(tmp_path, failures_file):
    """The failed episode is a `failed: true` record, or (as `haps collect` writes it) a failures.jsonl line."""
    hand_collection(tmp_path, failures_file)
    s = run_eval(config(tmp_path), progress=False)
    assert s["failed_records"] == {"test": 1}
    m = s["methods"]
    assert s["test_problems"] == 4 and s["episodes_played"] == 0
    assert s["weak"]["key"] == K_SS and s["strong"]["key"] == K_BB
    # best static is chosen on the valid split (z1), not on test (where z3 is best)
    assert s["best_static"]["key"] == K_SB and s["best_static"]["split"] == "valid"
    assert m["best_static"]["selection"] == {K_SB: 1.0}
    # static means over scored problems; z1's failed episode on t3 is counted, not scored
    st = {k: m[f"static:{k}"] for k in (K_SS, K_SB, K_BS, K_BB)}
    assert [st[k]["score"]["mean"] for k in (K_SS, K_BS, K_BB)] == [0.25, 0.5, 0.75]
    assert st[K_SB]["score"]["mean"] == pytest.approx(1 / 3)
    assert (st[K_SB]["scored"], st[K_SB]["failed"]) == (3, 1)
    assert st[K_BB]["failed"] == 0 and st[K_BB]["cost"] == pytest.approx(4e-4)
    # oracle: the best scored cell of each problem; random: the mean over the scored cells
    assert m["oracle"]["score"]["mean"] == 1.0 and m["oracle"]["failed"] == 0
    assert m["oracle"]["selection"] == {K_SS: 0.25, K_SB: 0.25, K_BS: 0.5}
    assert m["random"]["score"]["mean"] == pytest.approx((0.5 + 0.5 + 0.5 + 1 / 3) / 4)
    # paired difference against best static on the problems both scored (t0..t2)
    d = st[K_BB]["vs_best_static"]["score"]
    assert d["diff"] == pytest.approx(2 / 3) and d["n"] == 3
    assert d["low"] <= d["diff"] <= d["high"]
    assert m["best_static"]["vs_best_static"]["score"]["diff"] == 0.0  # the same picks
    # PGR (weak z0 0.25, strong z3 0.75), share of costlier picks, gap to the oracle, best rate
    assert st[K_BS]["pgr"] == pytest.approx(0.5) and st[K_BS]["share_costlier"] == 1.0
    assert st[K_SS]["pgr"] == 0.0 and st[K_SS]["share_costlier"] == 0.0
    assert st[K_BB]["oracle_gap"]["score"] == pytest.approx(0.25)
    assert st[K_BB]["best_rate"] == pytest.approx(0.75)
    assert st[K_BB]["gap_closed"] == pytest.approx(1.0)  # on t0..t2 (z1 scored): z1 1/3, z3 1, oracle 1
    # intervals: a constant has a zero-width interval; every one contains its mean
    assert m["oracle"]["score"]["low"] == m["oracle"]["score"]["high"] == 1.0
    # the zero router (static hull): AIQ over the 4 static points
    assert s["static_hull"]["aiq"] == pytest.approx(_hull_aiq(), abs=1e-9)
    # per-problem lines: every method x problem, failed rows without a score
    lines = [json.loads(x) for x in (tmp_path / "eval" / "per_problem.jsonl").read_text().splitlines()]
    assert len(lines) == 4 * len(m)
    bad = [x for x in lines if x["status"] == "failed"]
    assert [(x["method"], x["problem_id"]) for x in bad] == [(f"static:{K_SB}", "t3"), ("best_static", "t3")]
    assert bad[0]["score"] is None and bad[0]["label"] == "T=small S=big"
    assert all(x["source"] == "lookup" for x in lines)
    json.loads((tmp_path / "eval" / "summary.json").read_text())  # valid JSON (no NaN)


def _hull_aiq():
    from haps.router_metrics import aiq

    return aiq(COST, [0.25, 1 / 3, 0.5, 0.75])


def test_tradeoff_reward_uses_the_train_normaliser(tmp_path):
    hand_collection(tmp_path)
    s = run_eval(config(tmp_path, reward="tradeoff", alpha=0.5, beta=0.5), progress=False)
    assert s["reward"]["cost_normalizer"] == {"c_min": 1e-4, "c_max": 4e-4}
    bb = s["methods"][f"static:{K_BB}"]
    assert bb["cost_norm"] == pytest.approx(1.0)
    assert bb["reward"]["mean"] == pytest.approx(0.5 * 0.75 - 0.5)
    ss = s["methods"][f"static:{K_SS}"]
    assert ss["reward"]["mean"] == pytest.approx(0.5 * 0.25)
    # the oracle now maximises the trade-off reward: t0 -> z1 (0.5 - 0.5/3), t1 -> z0, t2 -> z2, t3 -> z2
    assert s["methods"]["oracle"]["selection"] == {K_SS: 0.25, K_SB: 0.25, K_BS: 0.5}


def test_haps_rows_come_from_run_infer_and_failed_ones_are_counted(tmp_path, monkeypatch):
    hand_collection(tmp_path)
    oracle_pick = {"t0": 1, "t1": 0, "t2": 2, "t3": 2}
    calls = []

    def route(pid):  # HAPS: the oracle's picks, score 1 everywhere, the episode of t1 fails
        return oracle_pick[pid], 1.0, COST[oracle_pick[pid]], pid == "t1"

    install_fake_infer(monkeypatch, route, calls)
    (tmp_path / "ckpt").mkdir()
    s = run_eval(config(tmp_path, methods=["oracle,all-static,haps,haps-no-lora"], router=str(tmp_path / "ckpt")),
                 progress=False)
    h = s["methods"]["haps"]
    assert (h["scored"], h["failed"]) == (3, 1) and h["score"]["mean"] == 1.0
    assert h["sources"] == {"episodes": 4}
    assert h["selection"] == {K_SS: 0.25, K_SB: 0.25, K_BS: 0.5}
    assert [c[1] for c in calls] == [True, False]  # haps with adapters, haps-no-lora without
    assert calls[0][2] == list(TEST_SCORES)
    assert calls[0][3].name == "mmlu"  # the collection's workflow (its options) is passed on
    assert h["info"]["passed"] == ["workflow"]  # (the collection set no max_new_tokens)
    # paired against HAPS on the problems both scored: z3 vs HAPS on t0, t2, t3 -> (0 + 0 - 1) / 3
    d = s["methods"][f"static:{K_BB}"]["vs_haps"]["score"]
    assert d["diff"] == pytest.approx(-1 / 3) and d["n"] == 3
    assert h["vs_haps"] is None
    assert (tmp_path / "eval" / "episodes" / "haps.jsonl").exists()
    assert s["episodes_played"] == 2 * 4  # haps and haps-no-lora on the 4 test problems (the failed one too)


def test_missing_cells_are_played_or_counted(tmp_path):
    """A test problem the table lacks: scoring=lookup counts it as missing, auto plays it."""
    hand_collection(tmp_path)
    # add a problem to the data file only (not in the table): evaluate through --data
    data = tmp_path / "actions" / "problems.jsonl"
    extra = json.loads(data.read_text().splitlines()[-1])
    extra["id"] = "new0"
    data.write_text(data.read_text() + json.dumps(extra) + "\n")
    played = []

    def runner(pool, workflow, jobs, *, sampling=None, log_path=None, seed=None, progress=False):
        from types import SimpleNamespace

        played.extend((j.problem.id, SPACE.key(j.assignment)) for j in jobs)
        return [SimpleNamespace(score=1.0, cost=5e-4, failed=False) for _ in jobs]

    s = run_eval(config(tmp_path, data=str(data), scoring="lookup", methods=[f"static:{K_SS}"]), progress=False,
                 runner=runner)
    ss = s["methods"][f"static:{K_SS}"]
    assert s["test_problems"] == 5 and ss["missing"] == 1 and ss["scored"] == 4 and not played
    s = run_eval(config(tmp_path, data=str(data), methods=[f"static:{K_SS}"]), progress=False, runner=runner,
                 pool=object())
    ss = s["methods"][f"static:{K_SS}"]
    assert ss["missing"] == 0 and ss["scored"] == 5 and ss["sources"] == {"lookup": 4, "episodes": 1}
    # the static cell of new0, plus the weak, strong and best-static references
    assert sorted(played) == sorted({("new0", K_SS), ("new0", K_BB), ("new0", K_SB)})
    assert s["episodes_played"] == 3
    assert ss["score"]["mean"] == pytest.approx((0 + 1 + 0 + 0 + 1) / 5)


def test_baselines_are_fitted_on_train_and_swept(tmp_path, monkeypatch):
    """kNN and the RouteLLM classifier with a stand-in embedder: fitted on train, saved, swept for AIQ/APGR."""
    from test_baselines import FakeEmbedder

    hand_collection(tmp_path)
    s = run_eval(config(tmp_path, methods=["knn,routellm_clf,static:0,0"], baselines={"knn": {"k": 3}}),
                 progress=False, embedder=FakeEmbedder())
    knn, clf = s["methods"]["knn"], s["methods"]["routellm_clf"]
    assert knn["sweep"] == "penalty" and knn["aiq"] is not None and knn["apgr"] is None
    assert clf["sweep"] == "threshold" and clf["apgr"] is not None and clf["cpt50"] is not None
    shares = [p["share"] for p in clf["curve"]]
    assert shares[0] == 0.0 and shares[-1] == 1.0
    assert clf["curve"][0]["score"] == s["methods"]["static:" + K_SS]["score"]["mean"]  # share 0 = all weak
    assert (tmp_path / "eval" / "routers" / "knn" / "router.json").exists()
    assert knn["info"]["fitted"] is True and knn["info"]["config"]["k"] == 3
    assert not math.isnan(knn["score"]["mean"])


def test_haps_eval_command_end_to_end(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from haps.cli import _register, app

    hand_collection(tmp_path)
    install_fake_infer(monkeypatch, lambda pid: (3, 1.0, COST[3], False))
    (tmp_path / "ckpt").mkdir()
    _register()
    res = CliRunner().invoke(app, ["eval", "--task", "mmlu", "--actions", str(tmp_path / "actions"), "--methods",
                                   "oracle,random,all-static,best_static,haps", "--router", str(tmp_path / "ckpt"),
                                   "--out", str(tmp_path / "eval"), "--n-boot", "200", "--no-progress"],
                             env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    out = res.output
    for label in ("oracle", "random", "T=small S=small", "T=big S=big", "best static", "HAPS"):
        assert label in out
    assert max(len(line) for line in out.splitlines()) <= 80 and "…" not in out
    assert "scored by lookup in the action table and real episodes" in " ".join(out.split())
    s = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert s["methods"]["haps"]["score"]["mean"] == 1.0
    assert s["methods"]["oracle"]["vs_haps"]["score"]["diff"] == pytest.approx(0.0)

def test_haps_eval_user_errors_are_one_line(tmp_path, capsys):
    from haps.cli import main

    hand_collection(tmp_path)
    for args, what in ((["--methods", "haps"], "--router"), (["--methods", "nope"], "unknown method"),
                       (["--task", "hotpotqa"], "collected for task")):
        argv = ["eval", "--task", "mmlu", "--actions", str(tmp_path / "actions"), "--out", str(tmp_path / "e"), *args]
        if args[0] == "--task":
            argv = ["eval", *args, "--actions", str(tmp_path / "actions"), "--out", str(tmp_path / "e")]
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and what in err and len(err.strip().splitlines()) == 1, err


def _random_llama(tokenizer, name: str, seed: int):
    """A random 2-layer Llama (d=64) with SmolLM2's tokenizer and a context long enough for MMLU's prompts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from haps.config import ModelSpec
    from haps.models.local import LocalModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    spec = ModelSpec(name=name, source_kind="folder", source="/nonexistent-tiny", price_in=1.0 + seed, price_out=2.0)
    return LocalModel(spec, LlamaForCausalLM(cfg).eval().requires_grad_(False), tokenizer, max_batch_size=16)


def test_lookup_equals_real_episodes_under_greedy_decoding(tmp_path, smol_tokenizer):
    """Collect a few MMLU problems on two tiny random models, then evaluate every static assignment by
    lookup and by replaying the episodes: identical scores, costs and rewards."""
    from haps.config import PoolConfig
    from haps.models.pool import ModelPool
    from haps.train.collect import CollectConfig, collect
    from haps.workflows.loader import get_workflow

    models = {n: _random_llama(smol_tokenizer, n, i) for i, n in enumerate(("rand-a", "rand-b"))}
    pool = ModelPool(PoolConfig(name="tinyrand", models=[m.spec for m in models.values()]), backends=models)
    cfg = CollectConfig(task="mmlu", limit=5, max_new_tokens=6, workflow_options={"rounds": 1},
                        split_fractions=(0.4, 0.2, 0.4))
    wf = get_workflow("mmlu", rounds=1)
    wf.stratify_by = None  # 5 problems of 5 subjects: split them as one group
    collect(cfg, tmp_path / "actions", pool=pool, workflow=wf, progress=False)
    base = dict(task="mmlu", actions=str(tmp_path / "actions"), methods=["all-static"], n_boot=100)
    look = run_eval(EvalConfig(out=str(tmp_path / "look"), **base), pool=pool, progress=False)
    real = run_eval(EvalConfig(out=str(tmp_path / "real"), scoring="episodes", **base), pool=pool, progress=False)
    assert real["episodes_played"] == 2 * 4 and look["episodes_played"] == 0

    def rows(d):
        lines = [json.loads(x) for x in (tmp_path / d / "per_problem.jsonl").read_text().splitlines()]
        return {(x["method"], x["problem_id"]): (x["status"], x["score"], x["cost"], x["reward"]) for x in lines}

    a, b = rows("look"), rows("real")
    assert a == b and len(a) == 4 * 2
    assert {v[0] for v in a.values()} == {"ok"}
    assert {m["sources"].get("episodes") for m in real["methods"].values()} == {2}
    assert all(v[2] > 0 for v in a.values())  # the costs are real token counts


def test_sft_router_is_scored_by_lookup_with_a_cost_sweep(tmp_path, monkeypatch):
    """sft:<CKPT> loads the high-level router (here a stand-in registered as high_level) and routes by it."""
    from haps.routers import load_builtin_routers
    from haps.routing import base

    class FakeHighLevel(base.Router):
        name = "high_level"

        @classmethod
        def from_spec(cls, arg, *, space, **kwargs):
            assert arg == str(tmp_path / "sft")
            return cls(space)

        def log_probs(self, prompts):  # prefers z3, then z2
            return torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0, 3.0]] * len(prompts)), -1)

    load_builtin_routers()
    monkeypatch.setitem(base.ROUTERS, "high_level", FakeHighLevel)
    hand_collection(tmp_path)
    s = run_eval(config(tmp_path, methods=[f"sft:{tmp_path / 'sft'}"]), progress=False)
    m = s["methods"]["sft"]
    assert m["selection"] == {K_BB: 1.0} and m["score"]["mean"] == 0.75 and m["sources"] == {"lookup": 4}
    assert m["sweep"] == "penalty" and m["aiq"] is not None
    assert m["curve"][-1]["share"] == 0.0  # the largest cost penalty routes everything to the cheapest


def test_curve_points_equal_evaluating_each_decision_as_a_policy():
    """The vectorised curve scoring and `Outcomes.evaluate` (its slow twin) agree, failed cells included."""
    from haps.evaluation.curves import curve
    from haps.evaluation.outcomes import LOOKUP, Outcomes, Rewarder
    from haps.metrics import CostNormalizer, RewardConfig

    g = torch.Generator().manual_seed(0)
    o = Outcomes.empty(SPACE, [f"p{i}" for i in range(30)])
    rw = Rewarder(RewardConfig(kind="tradeoff", alpha=0.8, beta=0.2), CostNormalizer(0.0, 1.0))
    for i in range(30):
        for j in range(4):
            o.set(i, j, score=float(torch.rand(1, generator=g)), cost=float(torch.rand(1, generator=g)),
                  failed=bool(torch.rand(1, generator=g) < 0.1), source=LOOKUP, rewarder=rw)
    dec = torch.randint(0, 4, (5, 30), generator=g)
    pts = curve(o, dec, list(range(5)), weak=0)
    assert len(pts) == 5
    for p, d in zip(pts, dec, strict=True):
        rows = o.evaluate("x", o.one_hot(d))
        ok = rows.ok
        assert p.scored == int(ok.sum())
        assert p.share == pytest.approx(float((d != 0).double().mean()))
        for k in ("cost", "score", "reward"):
            assert getattr(p, k) == pytest.approx(float(getattr(rows, k)[ok].mean()))
