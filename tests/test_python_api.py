"""The Python API (`haps.load_router`, `HapsRouter.route`, `haps.run`), text formats, the cost model, and the
README example (run as written, on the real tiny pool)."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import haps
from haps.api import BudgetError, CostEstimate, HapsRouter, max_calls
from haps.errors import ConfigError, DataError
from haps.workflows import EpisodeResult, get_workflow
from haps.workflows.from_text import hotpotqa_from_text, mmlu_from_text, problem_from_text
from serve_helpers import MMLU_Q, raw_models, tiny_pool, tiny_router

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pool(smol_tokenizer):
    m = raw_models(smol_tokenizer)
    return tiny_pool(m["tiny-llama"], m["tiny-gemma3"])


@pytest.fixture(scope="module")
def router(smol_tokenizer, pool) -> HapsRouter:
    return tiny_router(smol_tokenizer, pool)


def test_import_haps_loads_nothing_heavy():
    code = ("import sys, haps; haps.load_router; haps.run; "
            "heavy = [m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------- text formats
@pytest.mark.parametrize("text", [
    MMLU_Q,
    "Which gas?\n(A) Oxygen\n(B) Carbon dioxide\n(C) Nitrogen\n(D) Helium",
    "Line one of the question\nline two:\n\nA) Oxygen\nB) Carbon dioxide\nc: Nitrogen\nD. Helium\n",
])
def test_mmlu_text_formats(text):
    p = mmlu_from_text(text)
    assert p.choices == ["Oxygen", "Carbon dioxide", "Nitrogen", "Helium"] and p.gold == "" and p.question


@pytest.mark.parametrize("text,words", [
    ("What is 2+2?", "non-empty line"),
    ("Q?\nA. 1\nB. 2\nD. 3\nC. 4", "options ['A', 'B', 'D', 'C']"),
    ("Q?\nA. 1\nB. 2\nC. 3\nnot an option", "not options"),
])
def test_mmlu_text_errors_say_the_format(text, words):
    with pytest.raises(DataError, match="A. ...") as e:
        mmlu_from_text(text)
    assert words in str(e.value)


def test_hotpotqa_text_format():
    p = hotpotqa_from_text("Where did the Nile end?\nContext:\nNile: It flows into the sea.\n\nEgypt: A country.")
    assert p.question == "Where did the Nile end?" and p.context == [("Nile", ["It flows into the sea."]),
                                                                     ("Egypt", ["A country."])]
    for bad, words in [("Who?", "no 'Context:' line"), ("Who?\nContext:\n", "no paragraph"),
                       ("Context:\nA: b", "question before"), ("Who?\nContext:\njust text", "Title: text")]:
        with pytest.raises(DataError, match=re.escape(words)):
            hotpotqa_from_text(bad)


def test_other_workflows_take_the_text_as_question():
    from haps.workflows import load_workflow_class

    wf = load_workflow_class(str(REPO / "examples" / "custom_workflow.py") + ":ArithmeticWorkflow")
    p = problem_from_text(wf, "  What is 3 + 4?  ")
    assert p.question == "What is 3 + 4?" and p.task == wf.name
    with pytest.raises(DataError, match="empty"):
        problem_from_text(wf, "   ")


# ---------------------------------------------------------------------- the cost model
def test_max_calls_and_expected_costs(pool):
    assert max_calls(get_workflow("mmlu")) == {"teacher": 3, "student": 3}
    assert max_calls(get_workflow("mmlu", rounds=1)) == {"teacher": 1, "student": 1}
    assert max_calls(get_workflow("hotpotqa")) == {"student": 8, "teacher": 6}  # B = 3 with summaries
    assert max_calls(get_workflow("hotpotqa", summaries=False, budget=2)) == {"student": 4, "teacher": 2}
    est = CostEstimate({"student": 1}, tokens_in=100, tokens_out=10)
    # tiny-llama: 1 / 2 USD per 1M in / out; tiny-gemma3: 3 / 4
    assert est.cost(pool.config, {"teacher": "tiny-gemma3", "student": "tiny-llama"}) == pytest.approx(120e-6)
    both = CostEstimate({"teacher": 2, "student": 1}, tokens_in=100, tokens_out=10)
    assert both.cost(pool.config, {"teacher": "tiny-gemma3", "student": "tiny-llama"}) == pytest.approx(
        2 * 340e-6 + 120e-6)


# ---------------------------------------------------------------------- routing and running
def test_a_bf16_backbone_routes_and_generates_as_fp32_does_up_to_rounding(smol_tokenizer, pool):
    """``dtype="bfloat16"`` (what ``auto`` picks on AMX/AVX512-BF16 CPUs) against the fp32 twin: the backbone
    runs in bf16, the heads stay fp32, and P(z|p) and the generated adapters match to bf16 rounding."""
    import torch

    from rl_toy import toy_router

    def build(dtype):
        hier = toy_router(smol_tokenizer, pool, get_workflow("mmlu"), seed=3)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            for p in hier.generators.parameters():  # non-zero heads: the default init's first update is 0
                p.data.normal_(0, 0.05)
        return HapsRouter(hier, pool, workflow="mmlu", trained=False, dtype=dtype)

    ref, fast = build("float32"), build("bfloat16")
    assert {p.dtype for p in fast.hier.high.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fast.hier.generators.parameters()} == {torch.float32}
    a, b = ref.route(MMLU_Q, "mmlu"), fast.route(MMLU_Q, "mmlu")
    assert b.probs == pytest.approx(a.probs, abs=0.02)
    for role, ad in a.adapters.items():
        if ad is None:
            assert b.adapters[role] is None
            continue
        assert ad.A[0].abs().sum() > 0
        for x, y in zip(ad.A + ad.B, b.adapters[role].A + b.adapters[role].B, strict=True):
            assert y.dtype == torch.float32
            torch.testing.assert_close(y, x, rtol=0.05, atol=0.01)


def test_auto_dtype_follows_the_cpu_flags(monkeypatch):
    import torch

    from haps import dtypes

    dtypes.cpu_flags.cache_clear()
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert dtypes.resolve_dtype("auto") == torch.float32  # AVX2 only: bf16 is emulated, slower
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert dtypes.resolve_dtype("auto") == torch.bfloat16
    assert dtypes.resolve_dtype("float32") == torch.float32 and dtypes.resolve_dtype("bfloat16") == torch.bfloat16


def test_route_text_and_problem(router):
    d = router.route(MMLU_Q, "mmlu")
    assert set(d.assignment) == {"teacher", "student"} and d.key in d.probs
    assert sum(d.probs.values()) == pytest.approx(1.0, abs=1e-5) and d.prob == max(d.probs.values())
    assert d.problem.choices[1] == "Carbon dioxide"
    student = d.adapters["student"]
    assert student is not None and d.norms["student"] == 0.0  # fresh heads: the first update is zero
    again = router.route(d.problem)  # a Problem as it is, the router's default workflow
    assert again.probs == pytest.approx(d.probs) and again.assignment == d.assignment
    assert d.expected_cost > 0 and d.cheapest_cost <= d.expected_cost


def test_max_cost_restricts_the_choice(router):
    free = router.route(MMLU_Q)
    cheapest = free.cheapest_cost
    d = router.route(MMLU_Q, max_cost=cheapest)
    assert d.assignment == {"teacher": "tiny-llama", "student": "tiny-llama"} and d.expected_cost == cheapest
    with pytest.raises(BudgetError, match="cheapest expected cost") as e:
        router.route(MMLU_Q, max_cost=cheapest * 0.99)
    assert e.value.cheapest == pytest.approx(cheapest)
    # the most probable assignment among those the budget allows
    q = router.plan(MMLU_Q, max_cost=sorted(set(router.plan(MMLU_Q).costs))[1])
    allowed = q.allowed()
    d2 = router.decide([q])[0]
    ok = [k for k, a in zip(d2.probs, allowed, strict=True) if a]
    assert d2.key == max(ok, key=d2.probs.get)


def test_run_gives_an_episode_result(router):
    res = haps.run(MMLU_Q, router=router, max_new_tokens=4)
    assert isinstance(res, EpisodeResult) and res.task == "mmlu" and not res.failed
    assert res.turns and all(t.tokens_out <= 4 for t in res.turns)
    assert all(t.adapter_norm == 0.0 for t in res.turns)  # every call ran with its generated (zero) adapter
    with pytest.raises(ConfigError, match="router="):
        haps.run(MMLU_Q)


def test_a_router_refuses_a_workflow_with_other_roles(router):
    spec = str(REPO / "examples" / "custom_workflow.py") + ":ArithmeticWorkflow"
    with pytest.raises(ConfigError, match="roles"):
        router.route("What is 3 + 4?", spec)
    with pytest.raises(ConfigError, match="Problem or a str"):
        router.route(42)


def test_the_pool_must_be_the_routers(router, smol_tokenizer):
    m = raw_models(smol_tokenizer)
    HapsRouter(router.hier, tiny_pool(m["tiny-llama"], m["tiny-gemma3"]))  # the same names in the same order
    from haps.config import ModelSpec, PoolConfig
    from haps.models.pool import ModelPool

    wrong = ModelPool(PoolConfig(models=[ModelSpec(name="x", source_kind="folder", source="/x")]))
    with pytest.raises(ConfigError, match="pool it was trained for"):
        HapsRouter(router.hier, wrong)


# ---------------------------------------------------------------------- the README example
def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- python-api-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its Python API example (marked <!-- python-api-example -->)"
    return m.group(1)


def test_readme_example_is_about_ten_lines():
    lines = [ln for ln in readme_example().splitlines() if ln.strip()]
    assert 8 <= len(lines) <= 14


@pytest.mark.integration
def test_readme_example_runs_offline_on_the_tiny_pool(capsys):
    code = readme_example()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "README.md:python-api-example", "exec"), {"__name__": "readme"})
    assert any(issubclass(w.category, haps.UntrainedRouterWarning) for w in caught)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and "teacher" in out[0] and "teacher" in out[2]
