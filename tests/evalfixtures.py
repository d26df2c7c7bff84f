"""Synthetic `haps collect` folders for the evaluation and report tests: a manifest, a problems file and
actions.jsonl written by hand, so every number is known.

The pool has two models, ``small`` and ``big`` (``big`` optionally a closed API model), over the roles
teacher and student: 4 assignments in product order z0 = (small, small), z1 = (small, big),
z2 = (big, small), z3 = (big, big). Cell (p, z) is given by ``cells(pid, split, j)`` -> (score, cost), or
None for a failed episode (written with ``failed: true`` and no reward).
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from haps.config import ModelSpec, PoolConfig
from haps.routing.space import AssignmentSpace
from haps.train.collect import CollectConfig

ROLES = ("teacher", "student")
MODELS = ("small", "big")
SPACE = AssignmentSpace.of(ROLES, MODELS)
SUBJECTS = ("physics", "history")


def pool_config(closed_big: bool = False, name: str = "toy") -> PoolConfig:
    small = ModelSpec(name="small", source_kind="folder", source="/nonexistent-small", price_in=0.1, price_out=0.1,
                      description="a small model")
    if closed_big:
        big = ModelSpec(name="big", backend="api", base_url="http://127.0.0.1:9/v1", open_weights=False,
                        price_in=0.8, price_out=0.8, description="a big closed model")
    else:
        big = ModelSpec(name="big", source_kind="folder", source="/nonexistent-big", price_in=0.8, price_out=0.8,
                        description="a big model")
    return PoolConfig(name=name, models=[small, big])


def problem(pid: str, i: int) -> dict:
    subject = SUBJECTS[i % 2]
    long = " and then some more words" * (6 if i % 3 == 0 else 1)
    return {"id": pid, "subject": subject, "question": f"Question {i} about {subject}: what happens{long}?",
            "choices": ["one", "two", "three", "four"], "answer": "A"}


def write_collection(out: Path, splits: dict[str, list[str]], cells: Callable[[str, str, int], tuple | None], *,
                     closed_big: bool = False, pool_name: str = "toy", extra_problems: list[str] = (),
                     failures_file: bool = False) -> Path:
    """A collection folder ``out`` with the problems of ``splits`` ({split: [ids]}) and their cells; a failed
    cell is a record with ``failed: true``, or (``failures_file``) only a ``failures.jsonl`` line, as
    `haps collect` writes it."""
    out.mkdir(parents=True, exist_ok=True)
    ids = [pid for s in ("train", "valid", "test") for pid in splits.get(s, [])] + list(extra_problems)
    data = out / "problems.jsonl"
    data.write_text("".join(json.dumps(problem(pid, i)) + "\n" for i, pid in enumerate(ids)))
    cfg = CollectConfig(task="mmlu", data=str(data))
    pool = pool_config(closed_big, pool_name)
    manifest = {"format": "haps-actions/1", "config": cfg.model_dump(mode="json"), "pool": pool.model_dump(mode="json"),
                "roles": list(ROLES), "models": list(MODELS), "n_problems": len(ids), "runs": []}
    (out / "manifest.json").write_text(json.dumps(manifest))
    lines, failed = [], []
    for split, pids in splits.items():
        for pid in pids:
            for j, z in enumerate(SPACE.assignments()):
                cell = cells(pid, split, j)
                rec = {"problem_id": pid, "split": split, "key": SPACE.key(z), "assignment": SPACE.to_names(z),
                       "assignment_ids": list(z), "tokens_in": 100, "tokens_out": 10}
                if cell is None and failures_file:
                    failed.append(json.dumps(dict(rec, attempt=3, error="HTTP 500", call=None, cost=0.0)))
                    continue
                if cell is None:
                    rec.update(failed=True, reward=None, score=None, cost=None)
                else:
                    score, cost = cell
                    rec.update(reward=score, score=score, em=score, cost=cost)
                lines.append(json.dumps(rec))
    (out / "actions.jsonl").write_text("\n".join(lines) + "\n")
    if failed:
        (out / "failures.jsonl").write_text("\n".join(failed) + "\n")
    return out


def fake_infer_module(route: Callable[[str], tuple[int, float, float, bool]], calls: list | None = None):
    """A stand-in ``haps.infer`` module whose ``run_infer`` routes problem ``pid`` by ``route(pid)`` ->
    (assignment index, score, cost, failed); ``calls`` records each call's (router_dir, adapters, ids)."""
    mod = types.ModuleType("haps.infer")

    def run_infer(router_dir, task, problems, *, pool=None, adapters=True, workflow=None, log_path=None,
                  progress=False, max_new_tokens=None):
        if calls is not None:
            calls.append((Path(router_dir), adapters, [p.id for p in problems], workflow, max_new_tokens))
        out = []
        for p in problems:
            j, score, cost, failed = route(p.id)
            out.append(SimpleNamespace(id=p.id, assignment=SPACE.to_names(SPACE.at(j)), score=None if failed else score,
                                       cost=cost, failed=failed, turns=[], tokens_in=0, tokens_out=0))
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            Path(log_path).write_text("".join(json.dumps({"id": r.id}) + "\n" for r in out))
        return out

    mod.run_infer = run_infer
    return mod


def install_fake_infer(monkeypatch, route, calls=None) -> None:
    monkeypatch.setitem(sys.modules, "haps.infer", fake_infer_module(route, calls))
