"""User workflows: `load_workflow_class` (file specs, errors), the shipped examples/custom_workflow.py
driven by a scripted pool, and (integration) the example through `haps run` and `haps collect` on the
real tiny pool in a subprocess, from outside the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from haps.config import ModelSpec, PoolConfig
from haps.data import load_problems, problem_record, split_problems
from haps.errors import ConfigError
from haps.models.types import Generation
from haps.workflows import EpisodeJob, canonical_spec, get_workflow, load_workflow_class, run_episodes

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "custom_workflow.py"
DATA = REPO / "examples" / "custom_workflow.jsonl"
SPEC = f"{EXAMPLE}:ArithmeticWorkflow"


class Scripted:
    """A pool of two fake models answering from ``script(kind, request) -> text``."""

    def __init__(self, script) -> None:
        self.config = PoolConfig(models=[ModelSpec(name="m1", source="x"),
                                         ModelSpec(name="base", source="x", completion_style=True)])
        self.script = script

    @property
    def names(self):
        return self.config.names

    def spec(self, name):
        return self.config.get(name)

    def generate(self, name, requests, seed=None):
        return [Generation(text=self.script(r.tag.split("/", 1)[1], r), model=name, prompt_tokens=5,
                           completion_tokens=2, finish_reason="stop") for r in requests]


def test_example_loads_from_its_file_and_owns_its_task():
    cls = load_workflow_class(SPEC)
    assert cls is load_workflow_class(f"{os.path.relpath(EXAMPLE)}:ArithmeticWorkflow")  # loaded once
    assert cls.name == "arithmetic" and cls.roles == ("solver", "verifier") and cls.metric == "exact number"
    assert load_workflow_class("arithmetic") is cls  # registered under its name once loaded
    assert canonical_spec("examples/custom_workflow.py:ArithmeticWorkflow").startswith("/")
    probs = load_problems(SPEC, DATA)
    assert len(probs) == 16 and probs[0].task == "arithmetic" and probs[11].gold == "-3" and probs[12].gold == "3.5"
    assert load_problems(SPEC, DATA, limit=3)[2].id == "arith-03"
    assert [problem_record(p)["answer"] for p in probs[11:13]] == [-3, 3.5]
    parts = split_problems(probs, seed=0)
    assert all(parts[s] for s in ("train", "valid", "test"))
    with pytest.raises(ConfigError, match="rounds"):
        get_workflow(SPEC, rounds=0)


def test_example_episodes_revise_after_a_wrong_verdict():
    def script(kind, req):
        text = req.prompt if req.prompt is not None else req.messages[-1]["content"]
        if kind == "solver":
            return "48 + 36 = 84, 84 - 70 = 14.\nAnswer: 14" if "recompute" in text else "Answer: 1,400"
        return "Verdict: wrong\nFeedback: recompute." if "1,400" in text else "Check: ok\nVerdict: correct"

    wf = get_workflow(SPEC, rounds=3)
    prob = load_problems(SPEC, DATA, limit=1)[0]
    for solver in ("m1", "base"):  # chat and completion-style prompts
        (res,) = run_episodes(Scripted(script), wf, [EpisodeJob(prob, {"solver": solver, "verifier": "m1"})],
                              progress=False)
        assert res.prediction == "14" and res.score == 1.0
        assert [t.role for t in res.turns] == ["solver", "verifier", "solver", "verifier"]
        assert res.turns[1].action == "Verdict: wrong" and res.turns[3].action == "Verdict: correct"


def test_example_parsers_never_raise_and_never_invent():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    mod = sys.modules[load_workflow_class(SPEC).__module__]
    assert mod.parse_answer("Reasoning: 2 + 2\nAnswer: 4. Answer: **1,250**") == ("1,250", None)
    assert mod.parse_answer("the answer is four")[0] is None
    assert mod.parse_verdict("Verdict: incorrect") == (False, None)
    assert mod.parse_verdict("Verdict: Correct!") == (True, None)
    assert mod.parse_verdict("looks fine")[0] is None

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=300) | st.from_regex(r"(Answer|Verdict)\s*[:=]?\s*[-\d,.$* a-z]{0,12}", fullmatch=True))
    def check(text):
        answer, err = mod.parse_answer(text)
        assert (answer is None) != (err is None)
        assert answer is None or answer in text
        verdict, err = mod.parse_verdict(text)
        assert verdict in (True, False, None)

    check()


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_workflow_class(f"{tmp_path}/nope.py:X")
    f = tmp_path / "wf.py"
    f.write_text("from haps.workflows import Workflow\nclass NotOne:\n    pass\nclass Half(Workflow):\n    name = 'half'\n")
    with pytest.raises(ConfigError, match=r"has no class 'Missing'"):
        load_workflow_class(f"{f}:Missing")
    with pytest.raises(ConfigError, match="not a haps.workflows.Workflow subclass"):
        load_workflow_class(f"{f}:NotOne")
    with pytest.raises(ConfigError, match="does not implement"):
        load_workflow_class(f"{f}:Half")
    bad = tmp_path / "broken.py"
    bad.write_text("def broken(:\n")
    with pytest.raises(ConfigError, match="failed to import: SyntaxError"):
        load_workflow_class(f"{bad}:X")
    with pytest.raises(ConfigError, match="unknown task or workflow 'nosuch'.*file.py:ClassName"):
        load_workflow_class("nosuch")


def _haps(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "haps", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.integration
def test_example_runs_through_haps_run_and_collect_on_the_tiny_pool(tmp_path):
    common = ["--workflow", f"{EXAMPLE}:ArithmeticWorkflow", "--data", str(DATA), "--max-new-tokens", "8",
              "-o", "rounds=1", "--no-progress"]
    log = tmp_path / "run" / "episodes.jsonl"
    res = _haps(["run", *common, "--limit", "2", "--assign", "solver=smollm2-135m,verifier=smollm2-135m",
                 "--out", str(log)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mean score (exact number)" in res.stdout
    eps = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["id"] for e in eps] == ["arith-01", "arith-02"] and all(e["task"] == "arithmetic" for e in eps)
    assert all([t["role"] for t in e["turns"]] == ["solver", "verifier"] for e in eps)
    # --problem-seed/--split: the test split of a seeded subset, cut as collect and rl cut it
    from haps.data import load_problems
    from haps.infer import split_of
    from haps.workflows import get_workflow

    wf = get_workflow(f"{EXAMPLE}:ArithmeticWorkflow", rounds=1)
    want = [p.id for p in split_of(load_problems(f"{EXAMPLE}:ArithmeticWorkflow", DATA, 12, sample_seed=3), "test", wf)]
    log2 = tmp_path / "run" / "test-split.jsonl"
    res = _haps(["run", *common, "--limit", "12", "--problem-seed", "3", "--split", "test", "--assign",
                 "solver=smollm2-135m,verifier=smollm2-135m", "--out", str(log2)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [json.loads(line)["id"] for line in log2.read_text().splitlines()] == want and 0 < len(want) < 12

    out = tmp_path / "actions"
    res = _haps(["collect", *common, "--limit", "4", "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "actions.jsonl").read_text().splitlines()]
    assert len(recs) == 4 * 4 and {r["split"] for r in recs} == {"train", "valid", "test"}
    assert {tuple(r["assignment"]) for r in recs} == {("solver", "verifier")}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["task"] == SPEC and manifest["roles"] == ["solver", "verifier"]
    # resumable: the same command finds everything done
    res = _haps(["collect", *common, "--limit", "4", "--out", str(out), "--chunk-size", "2"], tmp_path)
    assert res.returncode == 0 and "16 already done, 0 written" in res.stdout, res.stdout + res.stderr[-2000:]
