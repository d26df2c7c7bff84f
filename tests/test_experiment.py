"""`haps experiment`: the plan (stages, variants, profile), stage states and resuming, the mixed open/closed
setting, and the smoke config end to end (run, killed with SIGKILL, resumed, rerun with nothing to do)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from haps.errors import ConfigError
from haps.experiment import ExperimentConfig, plan_experiment
from haps.experiment.plan import StageState

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "src" / "haps" / "configs" / "experiment_smoke.yaml"


def smoke_config(**over) -> ExperimentConfig:
    raw = yaml.safe_load(SMOKE.read_text())
    raw.update(over)
    return ExperimentConfig.model_validate(raw)


def _by_id(stages):
    return {s.id: s for s in stages}


def test_the_smoke_plan_has_every_stage_in_order(tmp_path):
    stages, settings, _ = plan_experiment(smoke_config(), tmp_path)
    ids = [s.id for s in stages]
    per = ["collect", "warmup", "sft", "rl/full", "baselines", "eval/main"]
    assert ids == [f"{t}/tiny/{k}" for t in ("mmlu", "hotpotqa") for k in per] + ["report"]
    assert {s.status for s in stages} == {"to do"}
    s = _by_id(stages)
    main = s["mmlu/tiny/eval/main"]
    kinds = [m.split(":")[0] for m in main.info["methods"]]
    assert kinds == ["oracle", "random", "all-static", "best_static", "knn", "sft", "haps", "haps-no-lora"]
    assert main.output == tmp_path / "results" / "mmlu" / "tiny" / "summary.json"
    assert s["mmlu/tiny/collect"].work == 16 and s["mmlu/tiny/collect"].unit == "episodes"
    assert s["mmlu/tiny/rl/full"].info["rl"].pool == str(settings["tiny"].file)
    assert settings["tiny"].file.parent == (tmp_path / "pools").resolve()
    assert all(st.estimate_s > 0 for st in stages)


def test_variants_and_the_paper_profile(tmp_path):
    cfg = smoke_config(profile="paper", tasks=["mmlu"],
                       variants=["full", "no-sharing", "no-lora", "depth-2", "tradeoff-0.8-0.2"])
    cfg.collect["split_fractions"] = [0.5, 0.25, 0.25]  # the config wins over the profile's 3000/1000/100
    stages, settings, _ = plan_experiment(cfg, tmp_path)
    s = _by_id(stages)
    rl = {v: s[f"mmlu/tiny/rl/{v}"].info["rl"] for v in cfg.variants}
    assert rl["no-sharing"].low_level_config.share_backbone is False
    assert rl["no-lora"].low_level is False and rl["no-lora"].routing_term is True
    assert rl["depth-2"].last_k_layers == 2
    assert rl["tradeoff-0.8-0.2"].reward.kind == "tradeoff" and rl["tradeoff-0.8-0.2"].reward.alpha == 0.8
    # the paper profile under the config's values: the authors' RL settings, but batch_size 1 given here too
    full = rl["full"]
    assert (full.route, full.routing_term, full.epochs, full.validate_every) == ("greedy", False, 3, 1)
    assert full.low_level_config.init == "xavier" and full.max_grad_norm is None
    ccfg = s["mmlu/tiny/collect"].info["collect"]
    assert ccfg.workflow_options == {"parsing": "strict", "rounds": 1} and ccfg.limit == 4
    sft = s["mmlu/tiny/sft"].info["sft"]
    assert (sft.lr, sft.warmup_ratio, sft.grad_accum, sft.tie, sft.epochs) == (1e-5, 0.03, 8, "all", 1)
    assert settings["tiny"].pool.composition_prices == {"smollm2-135m+smollm2-135m": 0.2,
                                                        "gemma3-270m+smollm2-135m": 0.5,
                                                        "gemma3-270m+gemma3-270m": 0.8}
    ev = {k.split("/eval/")[1]: v for k, v in s.items() if "/eval/" in k}
    assert sorted(ev) == ["depth-2", "main", "no-lora", "no-sharing", "tradeoff-0.8-0.2"]
    assert "haps-no-lora" not in [m.split(":")[0] for m in ev["main"].info["methods"]]  # the no-lora run has it
    assert [m.split(":")[0] for m in ev["no-lora"].info["methods"]] == ["haps-no-lora"]
    assert ev["depth-2"].output.parent.name == "depth-2" and ev["depth-2"].info["variant"].depth == 2
    assert ev["tradeoff-0.8-0.2"].info["eval"]["reward"] == "tradeoff"
    assert "best_static" in ev["tradeoff-0.8-0.2"].info["methods"]  # fitted there, under the regime's reward


def test_a_paper_profile_hotpotqa_collection_restores_the_official_protocol(tmp_path):
    cfg = smoke_config(profile="paper", tasks=["hotpotqa"])
    cfg.collect["split_fractions"] = [0.5, 0.25, 0.25]
    cfg.collect["workflow_options"] = {}
    stages, _, _ = plan_experiment(cfg, tmp_path)
    opts = _by_id(stages)["hotpotqa/tiny/collect"].info["collect"].workflow_options
    assert opts == {"parsing": "strict", "forced_answer": "null", "budget": 3, "summaries": True,
                    "passage_chars": None}
    assert _by_id(stages)["hotpotqa/tiny/collect"].info["collect"].max_new_tokens == 8  # the config's


def _mark_done(stages, out: Path) -> None:
    state = StageState(out)
    for s in stages:
        if s.output.suffix:
            s.output.parent.mkdir(parents=True, exist_ok=True)
            s.output.write_text("{}")
        else:
            s.output.mkdir(parents=True, exist_ok=True)
        state.started(s)
        state.finished(s, 10.0, 2)


def test_stage_states_follow_fingerprints_and_inputs(tmp_path):
    cfg = smoke_config(tasks=["mmlu"])
    stages, _, _ = plan_experiment(cfg, tmp_path)
    _mark_done(stages, tmp_path)
    again, _, _ = plan_experiment(cfg, tmp_path)
    assert {s.status for s in again} == {"done"}
    cfg.sft["epochs"] = 2  # SFT changes: it and what reads it run again; collect, warm-up, baselines do not
    changed, _, _ = plan_experiment(cfg, tmp_path)
    status = {s.id: s.status for s in changed}
    assert status == {"mmlu/tiny/collect": "done", "mmlu/tiny/warmup": "done", "mmlu/tiny/sft": "changed",
                      "mmlu/tiny/rl/full": "changed", "mmlu/tiny/baselines": "done",
                      "mmlu/tiny/eval/main": "changed", "report": "changed"}
    import shutil

    shutil.rmtree(tmp_path / "runs" / "mmlu" / "tiny" / "baselines")  # an output gone: that stage is to do
    status = {s.id: s.status for s in plan_experiment(cfg, tmp_path)[0]}
    assert status["mmlu/tiny/baselines"] == "to do" and status["mmlu/tiny/eval/main"] == "changed"
    # measured rates replace the defaults: 10 s per 2 units recorded for every finished stage
    sft = _by_id(plan_experiment(cfg, tmp_path)[0])["mmlu/tiny/sft"]
    assert sft.rate == 5.0 and sft.info["rate_source"] == "measured"
    cfg.collect["max_new_tokens"] = 9  # another collection into the same folder: an error, never a redo
    with pytest.raises(ConfigError, match="another --out"):
        plan_experiment(cfg, tmp_path)


def test_mixed_pool_turns_closed_models_into_api_models():
    from haps.config import load_pool
    from haps.experiment.closed import free_port, mixed_pool

    port = free_port()
    mixed, served = mixed_pool(load_pool("tiny"), ["smollm2-135m"], port)
    m = mixed.get("smollm2-135m")
    assert (m.backend, m.open_weights, m.source, m.base_url) == ("api", False, "smollm2-135m",
                                                                 f"http://127.0.0.1:{port}/v1")
    assert (m.price_in, m.price_out) == (0.1, 0.1) and mixed.get("gemma3-270m").backend == "local"
    assert served.names == ["smollm2-135m"] and served.get("smollm2-135m").backend == "local"
    with pytest.raises(ConfigError, match="keep at least one open"):
        mixed_pool(load_pool("tiny"), ["smollm2-135m", "gemma3-270m"], port)
    with pytest.raises(ConfigError, match="not models of the pool"):
        mixed_pool(load_pool("tiny"), ["gpt"], port)


def test_config_errors_are_one_line(tmp_path, capsys):
    from haps.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tasks": ["mmlu"], "variants": ["depth-x"]}))
    cases = [(["experiment", "--config", str(SMOKE), "--task", "gsm8k", "--out", str(tmp_path / "o")], "gsm8k"),
             (["experiment", "--config", str(SMOKE), "--data", "x.jsonl", "--out", str(tmp_path / "o")], "--task"),
             (["experiment", "--config", str(bad), "--out", str(tmp_path / "o")], "depth-x")]
    for argv, what in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and what in err and len(err.strip().splitlines()) == 1, err


def test_demo_and_profile_options_are_checked(tmp_path, capsys):
    from haps.cli import main

    for argv, what in ((["demo", "--limit", "2", "--out", str(tmp_path / "d")], "--limit"),
                       (["demo", "--data", "x.jsonl", "--out", str(tmp_path / "d")], "--tasks"),
                       (["collect", "--task", "mmlu", "--profile", "bogus", "--out", str(tmp_path / "c")], "bogus"),
                       (["sft", "--actions", str(tmp_path), "--profile", "bogus", "--out", str(tmp_path / "s")],
                        "bogus"),
                       (["rl", "--task", "mmlu", "--profile", "bogus", "--out", str(tmp_path / "r")], "bogus")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and what in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d").exists() and not (tmp_path / "c").exists()


def test_readme_lists_the_paper_profile():
    from haps.profiles import markdown_table

    assert markdown_table() in (REPO / "README.md").read_text()


def test_profile_values_are_valid_configs_and_differ_from_the_defaults():
    from haps.profiles import collect_overrides, rl_overrides, sft_overrides
    from haps.train.collect import CollectConfig
    from haps.train.rl import RLConfig
    from haps.train.sft import SFTConfig

    for model, over in ((SFTConfig, sft_overrides("paper")), (RLConfig, {"task": "mmlu", **rl_overrides("paper")}),
                        (CollectConfig, {"task": "mmlu", **collect_overrides("paper", "mmlu")})):
        built, default = model.model_validate(over), model.model_validate({k: v for k, v in over.items()
                                                                            if k == "task"})
        changed = [k for k in over if k != "task" and getattr(built, k) != getattr(default, k)]
        assert changed, model
    assert sft_overrides("default") == rl_overrides("default") == {}


# ------------------------------------------------------------------------------------ end to end
def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def _experiment(out: Path, *extra: str, config: Path = SMOKE) -> list[str]:
    return [sys.executable, "-m", "haps", "experiment", "--config", str(config), "--out", str(out), *extra]


@pytest.mark.integration
@pytest.mark.slow
def test_smoke_experiment_runs_is_killed_resumes_and_then_has_nothing_to_do(tmp_path):
    """Both tasks of experiment_smoke.yaml: SIGKILL once MMLU's RL run has started, resume to the end (the
    stages done before the kill are skipped, the collection is not touched again), rerun: every stage done."""
    out = tmp_path / "exp"
    log = open(tmp_path / "first.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(_experiment(out), env=_env(), stdout=log, stderr=subprocess.STDOUT)
    rl_cfg = out / "runs" / "mmlu" / "tiny" / "rl" / "full" / "config.json"
    deadline = time.time() + 1800
    while time.time() < deadline and not rl_cfg.exists() and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    actions = (out / "runs" / "mmlu" / "tiny" / "actions" / "actions.jsonl").read_bytes()

    done = subprocess.run(_experiment(out), env=_env(), capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    table = done.stdout[:done.stdout.index("stages to run")]  # the plan table ends with its caption
    for sid in ("mmlu/tiny/collect", "mmlu/tiny/warmup", "mmlu/tiny/sft"):
        assert any(line.split()[:2] == [sid, "done"] for line in table.splitlines()), table
    assert any(line.split()[:2] == ["mmlu/tiny/rl/full", "partial:"] for line in table.splitlines()), table
    assert (out / "runs" / "mmlu" / "tiny" / "actions" / "actions.jsonl").read_bytes() == actions
    manifest = json.loads((out / "runs" / "mmlu" / "tiny" / "actions" / "manifest.json").read_text())
    assert len(manifest["runs"]) == 1  # collected once
    for task in ("mmlu", "hotpotqa"):
        summary = json.loads((out / "results" / task / "tiny" / "summary.json").read_text())
        assert {"oracle", "haps", "haps-no-lora", "sft", "knn", "best_static"} <= set(summary["methods"])
        assert summary["methods"]["haps"]["sources"] == {"episodes": 1}
    assert (out / "report" / "report.html").exists() and (out / "report" / "report.md").exists()
    assert "Warning" not in done.stdout + done.stderr and "Loading weights" not in done.stdout + done.stderr

    t0 = time.perf_counter()
    again = subprocess.run(_experiment(out), env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "every stage was done already" in again.stdout, again.stdout[-3000:]
    assert "0 of 13 stages to run" in again.stdout and time.perf_counter() - t0 < 120

    # the demo's showcase of one test problem, from this experiment's folders, in 80 columns
    import io

    from rich.console import Console

    from haps.cli.demo import show_task

    buf = io.StringIO()
    show_task(Console(file=buf, width=80), out, "mmlu", "tiny")
    text = buf.getvalue()
    assert "P(z|p)" in text and "<- chosen" in text and "||alpha A B||_F" in text and "episode" in text
    assert "student r1 act on" in text and "score [95% CI]" in text
    assert max(len(line) for line in text.splitlines()) <= 80


MIXED = {
    "tasks": ["mmlu"],
    "settings": {"mixed": {"pool": "tiny", "closed": ["smollm2-135m"]}},
    "collect": {"limit": 4, "max_new_tokens": 8, "split_fractions": [0.5, 0.25, 0.25], "stratify": False,
                "workflow_options": {"rounds": 1}},
    "sft": {"epochs": 1, "batch_size": 2},
    "rl": {"batch_size": 1, "max_new_tokens": 8, "valid_limit": 1, "validate_every": 1},
    "rl_steps": 1, "variants": ["full"], "baselines": ["best_static"], "eval": {"n_boot": 200, "sweep_points": 5},
}


@pytest.mark.integration
@pytest.mark.slow
def test_a_mixed_setting_serves_its_closed_model_and_stops_the_server(tmp_path):
    """One open local model (Gemma, adapters) and SmolLM2 as a closed model behind haps serve on 127.0.0.1:
    closed rows carry no adapter and are priced from the API's token usage; the server is gone afterwards."""
    cfg = tmp_path / "mixed.yaml"
    cfg.write_text(yaml.safe_dump(MIXED))
    out = tmp_path / "exp"
    done = subprocess.run(_experiment(out, config=cfg), env=_env(), capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    pool = yaml.safe_load((out / "pools" / "mixed.yaml").read_text())
    closed = next(m for m in pool["models"] if m["name"] == "smollm2-135m")
    assert closed["backend"] == "api" and not closed["open_weights"]
    port = int(closed["base_url"].rsplit(":", 1)[1].split("/")[0])
    import socket

    with socket.socket() as s:  # nothing listens there any more
        assert s.connect_ex(("127.0.0.1", port)) != 0
    episodes = [json.loads(x) for f in (out / "runs" / "mmlu" / "mixed" / "actions" / "episodes").glob("*.jsonl")
                for x in f.read_text().splitlines()]
    api_turns = [t for e in episodes for t in e["turns"] if t["model"] == "smollm2-135m"]
    assert api_turns and all(t["tokens_in"] > 0 and t["cost"] > 0 for t in api_turns)
    summary = json.loads((out / "results" / "mmlu" / "mixed" / "summary.json").read_text())
    assert summary["mixed"] is True and "haps" in summary["methods"]
    haps_log = out / "results" / "mmlu" / "mixed" / "episodes" / "haps.jsonl"
    for e in [json.loads(x) for x in haps_log.read_text().splitlines()]:
        for t in e["turns"]:
            if t["model"] == "smollm2-135m":
                assert t["adapter_norm"] is None  # closed rows: no adapter
    assert "Mixed pool (Fig. 5): rendered" in done.stdout


def test_the_cpu_and_paper_configs_are_valid(tmp_path, data_root, monkeypatch):
    from haps.experiment import load_experiment_config
    from haps.experiment.build import resolve_setting

    monkeypatch.setenv("HAPS_DATA", str(data_root))
    configs = REPO / "src" / "haps" / "configs"
    cpu = load_experiment_config(configs / "experiment_cpu.yaml")
    stages, _, _ = plan_experiment(cpu, tmp_path, tasks=["mmlu"])
    s = _by_id(stages)
    assert s["mmlu/tiny/collect"].work == 800 and s["mmlu/tiny/rl/full"].info["steps"] == 24
    assert s["mmlu/tiny/rl/full"].info["rl"].max_new_tokens == 80
    total = sum(st.estimate_s for st in stages)
    assert 3600 < total < 2.2 * 3600, total  # sized for about 2 hours on 2 cores
    paper = load_experiment_config(configs / "experiment_paper.yaml")
    assert paper.profile == "paper" and len(paper.settings) == 3
    for name in paper.settings:
        sp = resolve_setting(paper, name, tmp_path)
        assert sorted(sp.pool.composition_prices.values()) == [0.2, 0.5, 0.8]
        assert all(m.source.count("/") == 1 for m in sp.pool.models)  # hub ids
