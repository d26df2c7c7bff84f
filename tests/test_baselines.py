"""Baseline routers (kNN, best static, RouteLLM MF and classifier, GraphRouter, IRT-Router) on a synthetic
action table with a planted pattern, their checkpoints, the RouteLLM cascade and its calibration.

The planted pattern (4 assignments of 2 models to teacher/student, cost rising with the index)::

    z0 = (small, small): reward 0.5 on every question          (the best static choice)
    z1 = (small, big):   1 on "long" questions, else 0
    z2 = (big, small):   1 on "physics" questions, else 0
    z3 = (big, big):     0.2 everywhere

The fake embedder encodes [1, long, physics, history, biology] plus seeded noise (std 0.1), and an
assignment text's teacher and student model as one-hot slots, so every baseline can see the pattern.
"""

from __future__ import annotations

import copy
import hashlib
import math
from types import SimpleNamespace

import pytest
import torch

from haps.baselines.base import BaselineRouter, assignment_texts
from haps.baselines.graphrouter import GraphRouterConfig, best_labels
from haps.baselines.irt import IRTConfig
from haps.baselines.knn import KNNConfig
from haps.baselines.routellm_clf import ClassifierConfig, independent_win_probs
from haps.baselines.routellm_mf import MFConfig, battles
from haps.baselines.train import baseline_class, fit_from_collection
from haps.errors import ConfigError, DataError
from haps.evaluate import ActionTable, router_policies
from haps.router_metrics import gap_closed
from haps.routers import get_router
from haps.routing.prompt import RoutingPrompt, build_routing_prompt
from haps.routing.space import AssignmentSpace

SPACE = AssignmentSpace.of(["teacher", "student"], ["small", "big"])
SUBJECTS = ["physics", "history", "biology"]
TASK = "toy"
FEATURES = 5 + 4 + 3  # [1, long, 3 subjects] + [teacher small/big, student small/big] + 3 noise dims


class FakeEmbedder:
    """Deterministic texts -> (n, 12): planted features plus noise seeded by the text's hash."""

    model_id = "fake-planted/1"

    def __init__(self, noise: float = 0.1) -> None:
        self.noise = noise
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        rows = []
        for t in texts:
            v = torch.zeros(FEATURES)
            v[0] = 1.0
            if t.startswith("teacher="):
                roles = dict(part.split(" ")[0].split("=") for part in t.split(", "))
                v[5 + (roles["teacher"] == "big")] = 1.0
                v[7 + (roles["student"] == "big")] = 1.0
            elif t != TASK:
                v[1] = float(len(t.split()) > 20)
                for i, s in enumerate(SUBJECTS):
                    v[2 + i] = float(f"about {s}" in t)
            g = torch.Generator().manual_seed(int(hashlib.sha256(t.encode()).hexdigest()[:15], 16))
            rows.append(v + self.noise * torch.randn(FEATURES, generator=g))
        return torch.stack(rows)


def question(i: int, long: bool, subject: str) -> str:
    filler = " ".join(["and then some more words"] * (6 if long else 1))
    return f"Question {i} about {subject}: what happens {filler}?"


def planted_rewards(long: bool, subject: str) -> list[float]:
    return [0.5, 1.0 if long else 0.0, 1.0 if subject == "physics" else 0.0, 0.2]


def synthetic(n: int, seed: int, start: int = 0):
    """(ActionTable, texts, prompts) for n problems with random (long, subject), ids start..start+n."""
    g = torch.Generator().manual_seed(seed)
    longs = (torch.rand(n, generator=g) < 0.3).tolist()
    subjects = [SUBJECTS[int(k)] for k in torch.randint(0, 3, (n,), generator=g)]
    records, texts, prompts = [], {}, []
    for k in range(n):
        pid = f"q{start + k}"
        texts[pid] = question(start + k, longs[k], subjects[k])
        prompts.append(RoutingPrompt(pid, "system", "user", SPACE, meta={"problem": texts[pid], "task": TASK}))
        for j, z in enumerate(SPACE.assignments()):
            r = planted_rewards(longs[k], subjects[k])[j]
            records.append({"problem_id": pid, "assignment": SPACE.to_names(z), "reward": r, "score": r,
                            "cost": (j + 1) * 1e-4 * (1 + 0.1 * longs[k])})
    return ActionTable.from_records(records, SPACE), texts, prompts


TRAIN = synthetic(240, seed=1, start=0)
VALID = synthetic(80, seed=2, start=1000)
TEST = synthetic(160, seed=3, start=2000)

CONFIGS = {
    "knn": KNNConfig(k=7),
    "best_static": None,
    "routellm_mf": MFConfig(),  # RouteLLM's hyperparameters as they are
    "routellm_clf": ClassifierConfig(),
    "graphrouter": GraphRouterConfig(epochs=300, lr=1e-2),  # 1000 steps at lr 1e-3 learn it too, 4x slower
    "irt": IRTConfig(epochs=300, lr=1e-2),  # likewise 1000 epochs at lr 1e-3
}
_FITTED: dict[str, BaselineRouter] = {}


def fitted(name: str) -> BaselineRouter:
    """Each baseline fitted once per test session on TRAIN (VALID for best_static)."""
    if name not in _FITTED:
        cls = baseline_class(name)
        router = cls(SPACE, CONFIGS[name], embedder=FakeEmbedder())
        _FITTED[name] = router.fit(TRAIN[0], TRAIN[1], valid=VALID[0], tasks=TASK,
                                   descriptions={"small": "a small model", "big": "a big model"})
    return _FITTED[name]


def test_reward(router) -> float:
    table, _, prompts = TEST
    return table.evaluate(router_policies(router, table, prompts)["router"])["reward"]


test_reward.__test__ = False  # a helper, not a test


# ------------------------------------------------------------------------------ planted pattern
@pytest.mark.parametrize("name", ["knn", "routellm_mf", "routellm_clf", "graphrouter", "irt"])
def test_baseline_learns_the_planted_pattern(name):
    table = TEST[0]
    oracle = table.evaluate(table.oracle())["reward"]
    random_ = table.evaluate(table.random())["reward"]
    static = max(table.evaluate(table.fixed(z))["reward"] for z in SPACE.assignments())
    got = test_reward(fitted(name))
    assert static == table.evaluate(table.fixed((0, 0)))["reward"]  # the planted best static choice
    assert got > random_ and got > static
    assert got == pytest.approx(oracle, abs=1e-12), (name, got, static, oracle)  # the planted policy, exactly


def test_best_static_picks_the_best_validation_assignment_and_scores_it_on_test():
    router = fitted("best_static")
    means = torch.nanmean(VALID[0].reward, dim=0)
    assert router.assignment == SPACE.at(int(means.argmax())) == (0, 0)
    assert test_reward(router) == TEST[0].evaluate(TEST[0].fixed((0, 0)))["reward"]
    with pytest.raises(ConfigError, match="valid="):
        baseline_class("best_static")(SPACE).fit(TRAIN[0], TRAIN[1])


def test_knn_utility_is_the_mean_reward_of_the_nearest_training_queries():
    records = [{"problem_id": p, "assignment": SPACE.to_names(z), "reward": r, "score": r, "cost": 1.0}
               for p, rs in (("a", [1, 0, 0, 0]), ("b", [0, 1, 0, 0]), ("c", [0, 0, 1, 0]))
               for z, r in zip(SPACE.assignments(), rs, strict=True)]
    emb = {"a": [1.0, 0.0], "b": [0.9, 0.1], "c": [0.0, 1.0], "new": [1.0, 0.05]}
    router = baseline_class("knn")(SPACE, KNNConfig(k=2), embedder=lambda ts: torch.tensor([emb[t] for t in ts]))
    router.fit(ActionTable.from_records(records, SPACE), {"a": "a", "b": "b", "c": "c"})
    u = router.utility([RoutingPrompt("x", "s", "u", SPACE, meta={"problem": "new", "task": TASK})])
    assert u.tolist() == [[0.5, 0.5, 0.0, 0.0]]  # neighbours a and b


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_round_trip_gives_identical_utilities(name, tmp_path):
    router = fitted(name)
    router.save(tmp_path / name)
    again = get_router(f"{name}:{tmp_path / name}", space=SPACE, embedder=FakeEmbedder())
    assert type(again) is type(router) and again.config == router.config
    prompts = TEST[2][:40]
    assert torch.equal(again.utility(prompts), router.utility(prompts))
    assert again.route(prompts) == router.route(prompts)
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["router.json", "weights.safetensors"]


@pytest.mark.parametrize("name", ["routellm_mf", "graphrouter"])
def test_fit_is_deterministic_given_the_seed(name):
    def fit(seed):
        cfg = CONFIGS[name].model_copy(update={"seed": seed, "epochs": 3})
        return baseline_class(name)(SPACE, cfg, embedder=FakeEmbedder()).fit(TRAIN[0], TRAIN[1], tasks=TASK)

    prompts = TEST[2][:20]
    a, b, c = fit(0).utility(prompts), fit(0).utility(prompts), fit(1).utility(prompts)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_checkpoint_folders_give_one_line_errors_naming_the_fix(tmp_path):
    cases = {
        "knn:": "needs a checkpoint folder: knn:<DIR>",
        f"knn:{tmp_path / 'missing'}": "is not a folder",
        f"irt:{tmp_path}": "no router.json",
    }
    for spec, msg in cases.items():
        with pytest.raises(ConfigError, match=msg) as e:
            get_router(spec, space=SPACE)
        assert "\n" not in str(e.value) and "save(DIR)" in str(e.value)
    fitted("knn").save(tmp_path / "k")
    with pytest.raises(ConfigError, match=r"holds a 'knn' router, not 'irt'; load it as knn:"):
        get_router(f"irt:{tmp_path / 'k'}", space=SPACE, embedder=FakeEmbedder())
    with pytest.raises(ConfigError, match="fitted with embedder 'fake-planted/1'; pass embedder="):
        get_router(f"knn:{tmp_path / 'k'}", space=SPACE)
    other = AssignmentSpace.of(["teacher", "student"], ["small", "huge"])
    with pytest.raises(ConfigError, match="fit it on this collection"):
        get_router(f"knn:{tmp_path / 'k'}", space=other, embedder=FakeEmbedder())
    (tmp_path / "k" / "weights.safetensors").write_bytes(b"not the saved weights")
    with pytest.raises(ConfigError, match="save the router again"):
        get_router(f"knn:{tmp_path / 'k'}", space=SPACE, embedder=FakeEmbedder())


def test_unfitted_router_and_prompts_without_meta_are_refused():
    router = baseline_class("knn")(SPACE, embedder=FakeEmbedder())
    with pytest.raises(ConfigError, match="not fitted"):
        router.utility(TEST[2][:1])
    with pytest.raises(ConfigError, match="build_routing_prompt"):
        fitted("knn").utility([RoutingPrompt("x", "s", "u", SPACE)])
    with pytest.raises(DataError, match="no problem text"):
        baseline_class("knn")(SPACE, embedder=FakeEmbedder()).fit(TRAIN[0], {})


# ------------------------------------------------------------------------------ RouteLLM decision
def test_cascade_escalates_by_cost_order_and_reduces_to_routellm_for_two_assignments():
    space3 = AssignmentSpace.of(["agent"], ["a", "b", "c"])
    router = baseline_class("routellm_mf")(space3)
    router.assignment_cost = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)  # order: b, c, a
    assert router.cost_order().tolist() == [1, 2, 0]
    w = torch.full((3, 3, 3), 0.5, dtype=torch.float64)  # W[b, i, j] = P(i beats j)

    def beats(b, i, j, p):
        w[b, i, j], w[b, j, i] = p, 1 - p

    beats(0, 2, 1, 0.6), beats(0, 0, 2, 0.4)  # c beats b; a does not beat c -> c
    beats(1, 2, 1, 0.3), beats(1, 0, 1, 0.7)  # c does not beat b; a beats b -> a
    beats(2, 2, 1, 0.2), beats(2, 0, 1, 0.1)  # nothing beats b -> b
    assert router.decide(w, 0.5).tolist() == [2, 0, 1]
    space2 = AssignmentSpace.of(["agent"], ["weak", "strong"])
    r2 = baseline_class("routellm_mf")(space2)
    r2.assignment_cost = torch.tensor([1.0, 5.0], dtype=torch.float64)
    p_strong = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64)
    w2 = torch.stack([torch.stack([torch.full_like(p_strong, 0.5), 1 - p_strong]),
                      torch.stack([p_strong, torch.full_like(p_strong, 0.5)])]).permute(2, 0, 1)  # (3, 2, 2)
    assert r2.decide(w2, 0.5).tolist() == [0, 1, 1]  # strong iff P(strong wins) >= tau


@pytest.mark.parametrize("name", ["routellm_mf", "routellm_clf"])
def test_threshold_calibration_hits_the_target_share_of_costlier_calls(name):
    router = fitted(name)
    prompts = TEST[2]
    cheapest = int(router.cost_order()[0])
    assert router.threshold == 0.5
    scores = router.threshold_scores(prompts)
    for share in (0.0, 0.25, 0.5, 1.0):
        tau = router.threshold_for_share(scores, share)
        got = float((router.decisions(prompts, tau) != cheapest).double().mean())
        assert abs(got - share) <= 1.5 / len(prompts), (share, got)
    taus, decisions = router.sweep(prompts, [0.0, 0.5, 1.0])
    assert taus[0] > taus[1] > taus[2] and decisions.shape == (3, len(prompts))
    assert (decisions[0] == cheapest).all() and (decisions[2] != cheapest).all()
    assert torch.equal(decisions[1], router.decisions(prompts, taus[1]))
    taus, _ = router.sweep(prompts, [0.5], calibration=VALID[2])  # thresholds from other prompts
    assert taus == [router.threshold_for_share(router.threshold_scores(VALID[2]), 0.5)]
    assert router.threshold == 0.5  # sweep leaves the router's threshold alone
    tau = router.calibrate(VALID[2], 0.3)
    assert router.threshold == tau
    router.threshold = 0.5


def test_pairwise_pieces_on_hand_cases():
    reward = torch.tensor([[1.0, 0.0, 1.0, math.nan], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    p, win, lose = battles(reward)
    assert sorted(zip(p.tolist(), win.tolist(), lose.tolist(), strict=True)) == [(0, 0, 1), (0, 2, 1)]  # ties, NaN dropped
    w = independent_win_probs(torch.tensor([[0.8, 0.5, 0.5]], dtype=torch.float64))
    assert w[0, 0, 1].item() == pytest.approx(0.8)  # 0.8*0.5 / (0.8*0.5 + 0.5*0.2)
    assert w[0, 1, 2].item() == pytest.approx(0.5) and w[0, 1, 0].item() == pytest.approx(0.2)


# ------------------------------------------------------------------------------ GraphRouter, IRT
def test_graphrouter_labels_follow_the_regime():
    effect = torch.tensor([[1.0, 1.0, 0.5]], dtype=torch.float64)
    cost = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    assert best_labels(effect, cost, 1.0, 0.0).tolist() == [[1.0, 1.0, 0.0]]  # performance first: ties all 1
    assert best_labels(effect, cost, 0.2, 0.8).tolist() == [[1.0, 0.0, 0.0]]  # cost first: 0.2, -0.6, 0.1
    assert best_labels(torch.tensor([[math.nan, 0.3]]), torch.zeros(1, 2), 1.0, 0.0).tolist() == [[0.0, 1.0]]


def test_irt_cold_start_and_cost_weight():
    router = fitted("irt")
    q = router.embed([TEST[1]["q2000"]])
    near = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(router.train_emb, dim=-1).T
    top5 = near[0].argsort(descending=True)[:5]
    expected = 0.7 * q[0] + 0.3 * router.train_emb[top5].mean(0)
    assert torch.allclose(router.warm_start(q)[0], expected)
    cheap = copy.copy(router)
    cheap.config = router.config.model_copy(update={"alpha": 0.0})
    assert set(cheap.route(TEST[2][:30])) == {(0, 0)}  # alpha = 0: only cost counts


# ------------------------------------------------------------------------------ inputs
def test_routing_prompt_meta_carries_problem_and_task():
    wf = SimpleNamespace(name="toy", roles=("teacher", "student"), task_description="Solve.",
                         role_definitions={"teacher": "Guides.", "student": "Answers."},
                         problem_text=lambda p: f"Q: {p.question}")
    pool = [SimpleNamespace(name="small", description=""), SimpleNamespace(name="big", description="")]
    p = build_routing_prompt(wf, pool, SimpleNamespace(id=7, question="2+2?"))
    assert p.meta == {"problem": "Q: 2+2?", "task": "toy"}
    assert assignment_texts(SPACE, {"big": "a big model"})[1] == "teacher=small, student=big (a big model)"


def test_fit_from_collection_reads_train_valid_texts_and_descriptions():
    problems = [SimpleNamespace(id=pid, question=t) for pid, t in {**TRAIN[1], **VALID[1]}.items()]
    records = []
    for split, (table, _, _) in (("train", TRAIN), ("valid", VALID)):
        for i, pid in enumerate(table.problem_ids):
            for j, z in enumerate(SPACE.assignments()):
                records.append({"problem_id": pid, "split": split, "assignment": SPACE.to_names(z),
                                "reward": float(table.reward[i, j]), "score": float(table.score[i, j]),
                                "cost": float(table.cost[i, j])})
    col = SimpleNamespace(
        space=SPACE, records=records, problems=lambda: problems,
        workflow=lambda: SimpleNamespace(name=TASK, problem_text=lambda p: p.question),
        pool_config=lambda: SimpleNamespace(models=[SimpleNamespace(name="small", description="s"),
                                                    SimpleNamespace(name="big", description="b")]))
    router = fit_from_collection("best_static", col)
    assert router.assignment == (0, 0)
    knn = fit_from_collection("knn", col, config=KNNConfig(k=7), embedder=FakeEmbedder())
    assert torch.equal(knn.utility(TEST[2][:10]), fitted("knn").utility(TEST[2][:10]))
    with pytest.raises(ConfigError, match="unknown baseline 'fixed'"):
        fit_from_collection("fixed", col)


# ------------------------------------------------------------------------------ real MiniLM
@pytest.mark.integration
def test_knn_with_the_real_minilm_routes_by_topic():
    """z1 wins on physics questions, z0 elsewhere; MiniLM must place physics questions together."""
    physics = ["Why does a ball fall faster on {}?", "What is the gravitational force on {}?",
               "How fast does light travel through {}?", "What is the kinetic energy of an electron in {}?"]
    history = ["Which king ruled {} in the middle ages?", "When did the revolution in {} begin?",
               "Who signed the peace treaty with {}?", "What empire conquered {} in antiquity?"]
    places = ["France", "Egypt", "Japan", "Peru", "Norway", "India", "Kenya", "Chile", "Italy", "Spain"]

    def make(offset):
        recs, texts, prompts = [], {}, []
        for k, (tmpl, phys) in enumerate([(t, True) for t in physics] + [(t, False) for t in history]):
            for m, place in enumerate(places[offset:offset + 5]):
                pid = f"{offset}-{k}-{m}"
                texts[pid] = tmpl.format(place)
                prompts.append(RoutingPrompt(pid, "s", "u", SPACE, meta={"problem": texts[pid], "task": TASK}))
                for j, z in enumerate(SPACE.assignments()):
                    r = [0.5, 1.0 if phys else 0.0, 0.0, 0.0][j]
                    recs.append({"problem_id": pid, "assignment": SPACE.to_names(z), "reward": r, "score": r,
                                 "cost": float(j)})
        return ActionTable.from_records(recs, SPACE), texts, prompts

    train, test = make(0), make(5)
    router = baseline_class("knn")(SPACE, KNNConfig(k=5)).fit(train[0], train[1])
    got = test[0].evaluate(router_policies(router, test[0], test[2])["router"])["reward"]
    oracle = test[0].evaluate(test[0].oracle())["reward"]
    static = max(test[0].evaluate(test[0].fixed(z))["reward"] for z in SPACE.assignments())
    assert gap_closed(got, static, oracle) >= 0.9, (got, static, oracle)
