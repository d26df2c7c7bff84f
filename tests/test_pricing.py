"""Prices per composition (paper Table 4): every token of an episode priced by the models its roles run."""

from __future__ import annotations

import pytest

from haps.config import ModelSpec, PoolConfig
from haps.errors import ConfigError
from haps.models.types import Generation


class Canned:
    """A backend that answers every MMLU call at once (Choice A, then Submit 1), 10 tokens in, 5 out."""

    def __init__(self, spec):
        self.spec = spec

    def generate(self, requests, target=None, seed=None):
        out = []
        for r in requests:
            text = "Feedback: ok\nSubmit: 1" if "Submit" in (r.prompt or str(r.messages)) else "Rationale: r\nChoice: A"
            out.append(Generation(text=text, model=self.spec.name, prompt_tokens=10, completion_tokens=5,
                                  finish_reason="stop", cost=self.spec.cost(10, 5)))
        return out


def _pool(prices):
    from haps.models.pool import ModelPool

    specs = [ModelSpec(name=n, source_kind="folder", source="/none", price_in=p, price_out=p)
             for n, p in (("l", 1.0), ("q", 3.0))]
    cfg = PoolConfig(name="lq", models=specs, composition_prices=prices)
    return ModelPool(cfg, backends={s.name: Canned(s) for s in specs})


def test_composition_prices_are_validated():
    with pytest.raises(ValueError, match="not in the pool"):
        _pool({"l+x": 0.2})
    with pytest.raises(ValueError, match=">= 0"):
        _pool({"l+l": -1.0})
    assert PoolConfig.composition(["q", "l"]) == "l+q"


def test_episodes_are_priced_by_composition():
    from haps.data import Problem
    from haps.workflows import EpisodeJob, get_workflow, run_episodes

    p = Problem(id="1", task="mmlu", question="?", gold="A", choices=["a", "b", "c", "d"], subject="s")
    wf = get_workflow("mmlu", rounds=1)
    jobs = [EpisodeJob(p, {"teacher": t, "student": s}) for t, s in (("l", "l"), ("l", "q"), ("q", "q"))]
    table = {"l+l": 0.2, "l+q": 0.5, "q+q": 0.8}
    res = run_episodes(_pool(table), wf, jobs, progress=False)
    assert [r.tokens_in + r.tokens_out for r in res] == [30, 30, 30]  # two calls of 15 tokens each
    assert [round(r.cost * 1e6, 6) for r in res] == [6.0, 15.0, 24.0]
    assert all(abs(sum(t.cost for t in r.turns) - r.cost) < 1e-12 for r in res)
    per_model = run_episodes(_pool({}), wf, jobs, progress=False)  # no table: each model's own prices
    assert [round(r.cost * 1e6, 6) for r in per_model] == [30.0, 60.0, 90.0]
    with pytest.raises(ConfigError, match="no price for 'l\\+q'"):
        run_episodes(_pool({"l+l": 0.2}), wf, jobs, progress=False)
