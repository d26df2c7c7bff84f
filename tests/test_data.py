"""Loaders (real shared files, embedded demo set, bad records) and deterministic splits."""

from __future__ import annotations

import json
import random

import pytest

import haps.data
from haps.data import (
    DataWarning,
    Problem,
    load_hf,
    load_problems,
    problem_record,
    read_problems,
    shared_file,
    split_problems,
)
from haps.errors import DataError
from haps.metrics import f1_score

HOTPOT_OK = {"id": "h1", "question": "Q?", "answer": "yes", "type": "comparison", "level": "hard",
             "supporting_facts": [["A", 0]], "context": [["A", ["Sentence one.", " Two."]], ["B", ["Other."]]]}
MMLU_OK = {"id": "s/test/0", "subject": "s", "question": "Q?", "choices": ["w", "x", "y", "z"], "answer": "C"}


def _write(tmp_path, name, rows) -> str:
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(p)


# ------------------------------------------------------------------ real files


def test_real_hotpotqa_file_loads_completely(data_root):
    probs = load_problems("hotpotqa", data_root / "hotpotqa" / "dev_distractor.jsonl")
    assert len(probs) == 1769  # shared/data/README.md
    types = {p.meta["type"] for p in probs}
    assert types == {"bridge", "comparison"}
    p = probs[0]
    assert p.task == "hotpotqa" and p.gold and p.question and len(p.context) >= 2
    assert set(p.supporting_titles) <= {t for t, _ in p.context}
    assert p.meta["source"].endswith("dev_distractor.jsonl:1")


def test_real_mmlu_folder_and_limit(data_root):
    dev = load_problems("mmlu", data_root / "mmlu" / "dev.jsonl")
    assert len(dev) == 285 and len({p.subject for p in dev}) == 57
    assert all(p.gold in "ABCD" and len(p.choices) == 4 for p in dev)
    assert [p.id for p in load_problems("mmlu", data_root / "mmlu" / "dev.jsonl", limit=7)] == [p.id for p in dev[:7]]
    everything = load_problems("mmlu", data_root / "mmlu")  # folder: dev + test + val, sorted by name
    assert len(everything) == 285 + 13472 + 1531


def test_data_root_and_shared_file(monkeypatch, data_root):
    monkeypatch.setenv("HAPS_DATA", str(data_root))
    assert haps.data.data_root() == data_root
    assert shared_file("mmlu", "val").name == "val.jsonl"
    with pytest.raises(DataError, match="valid splits"):
        shared_file("mmlu", "train")
    monkeypatch.delenv("HAPS_DATA")
    with pytest.raises(DataError, match="HAPS_DATA is not set"):
        haps.data.data_root()


# ------------------------------------------------------------------ demo set


def test_demo_sets_are_complete_and_well_formed():
    hp = load_problems("hotpotqa")
    mm = load_problems("mmlu")
    assert len(hp) == 20 and len(mm) == 20
    assert {p.meta["type"] for p in hp} == {"bridge", "comparison"}
    assert sum(p.gold in ("yes", "no") for p in hp) >= 4
    for p in hp:
        assert 4 <= len(p.context) <= 6
        assert len(p.supporting_titles) == 2
        for title, idx in p.meta["supporting_facts"]:
            sents = dict(p.context)[title]
            assert 0 <= idx < len(sents)
        # the answer (or its yes/no) is supported by the gold paragraphs' text
        if p.gold not in ("yes", "no"):
            gold_text = " ".join("".join(dict(p.context)[t]) for t in p.supporting_titles)
            assert p.gold.lower() in gold_text.lower(), p.id
    assert len({p.subject for p in mm}) >= 15
    assert {p.gold for p in mm} == set("ABCD")
    for p in mm:
        assert len(set(p.choices)) == 4


def test_round_trip_to_record(tmp_path):
    probs = load_problems("hotpotqa", limit=3)
    path = _write(tmp_path, "rt.jsonl", [problem_record(p) for p in probs])
    again = load_problems("hotpotqa", path)
    assert [(p.id, p.gold, p.context, p.meta["supporting_facts"]) for p in again] == \
           [(p.id, p.gold, p.context, p.meta["supporting_facts"]) for p in probs]


# ------------------------------------------------------------------ bad records


BAD_HOTPOT = [
    ("{not json", "not valid JSON"),
    ({k: v for k, v in HOTPOT_OK.items() if k != "answer"}, "missing field 'answer'"),
    ({**HOTPOT_OK, "context": []}, "'context' is empty"),
    ({**HOTPOT_OK, "context": [["A", "not a list"]]}, r"context\[0\] must be"),
    ({**HOTPOT_OK, "supporting_facts": [["Missing", 0]]}, "absent from the context"),
]
BAD_MMLU = [
    ({**MMLU_OK, "answer": "E"}, "letter A-D"),
    ({**MMLU_OK, "choices": ["a", "b", "c"]}, "exactly 4 strings"),
    ({k: v for k, v in MMLU_OK.items() if k != "question"}, "missing field 'question'"),
]


@pytest.mark.parametrize("task,bad,msg", [("hotpotqa", b, m) for b, m in BAD_HOTPOT]
                         + [("mmlu", b, m) for b, m in BAD_MMLU])
def test_bad_record_names_file_line_and_fix(tmp_path, task, bad, msg):
    good = HOTPOT_OK if task == "hotpotqa" else MMLU_OK
    path = _write(tmp_path, "bad.jsonl", [good, {**good, "id": "second"}, bad])
    with pytest.raises(DataError, match=msg) as ei:
        load_problems(task, path)
    text = str(ei.value)
    assert f"{path}:3:" in text and "Fix or remove this line" in text


def test_report_mode_collects_every_bad_record(tmp_path):
    rows = [MMLU_OK, "{oops", {**MMLU_OK, "id": "b", "answer": "Z"}, {**MMLU_OK, "id": "c"}, MMLU_OK]
    path = _write(tmp_path, "mixed.jsonl", rows)
    rep = read_problems("mmlu", path, on_error="report")
    assert [p.id for p in rep.problems] == ["s/test/0", "c"]
    assert [(e.line, e.source) for e in rep.errors] == [(2, path), (3, path), (5, path)]
    assert "duplicate id" in rep.errors[2].message
    with pytest.warns(DataWarning, match="3 bad mmlu record"):
        probs = load_problems("mmlu", path, on_error="report")
    assert len(probs) == 2


def test_missing_path_unknown_task_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_problems("mmlu", tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no \\*.jsonl"):
        load_problems("mmlu", tmp_path)
    with pytest.raises(DataError, match="unknown task"):
        load_problems("gsm8k")


def test_hf_layout_and_integer_answers_are_accepted(tmp_path):
    hf = {"id": "x", "question": "Q?", "answer": "B", "type": "bridge", "level": "hard",
          "supporting_facts": {"title": ["B"], "sent_id": [0]},
          "context": {"title": ["A", "B"], "sentences": [["a."], ["b."]]}}
    (p,) = load_problems("hotpotqa", _write(tmp_path, "hf.jsonl", [hf]))
    assert p.context == [("A", ["a."]), ("B", ["b."])] and p.supporting_titles == ["B"]
    (m,) = load_problems("mmlu", _write(tmp_path, "m.jsonl", [{**MMLU_OK, "answer": 3}]))
    assert m.gold == "D"


def test_load_hf_without_datasets_or_network_gives_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match="pip install datasets"):
        load_hf("mmlu", "test")


# ------------------------------------------------------------------ splits


def _fake(n: int, subjects: int = 1) -> list[Problem]:
    return [Problem(id=f"p{i}", task="mmlu", question="q", gold="A", choices=list("abcd"),
                    subject=f"s{i % subjects}") for i in range(n)]


def test_split_is_deterministic_disjoint_and_order_independent():
    probs = _fake(101)
    a = split_problems(probs, seed=3)
    shuffled = probs[:]
    random.Random(0).shuffle(shuffled)
    b = split_problems(shuffled, seed=3)
    ids = {k: [p.id for p in v] for k, v in a.items()}
    assert ids == {k: [p.id for p in v] for k, v in b.items()}
    assert (len(ids["train"]), len(ids["valid"]), len(ids["test"])) == (61, 20, 20)
    all_ids = ids["train"] + ids["valid"] + ids["test"]
    assert sorted(all_ids) == sorted(p.id for p in probs)  # a partition: disjoint and complete
    c = split_problems(probs, seed=4)
    assert [p.id for p in c["train"]] != ids["train"]


def test_split_stratified_keeps_group_shares():
    probs = _fake(100, subjects=4)  # 25 per subject
    s = split_problems(probs, fractions=(0.5, 0.25, 0.25), stratify_by="subject")
    # per subject: train round(12.5) = 12, valid round(6.25) = 6, test the remaining 7
    for part, n in (("train", 12), ("valid", 6), ("test", 7)):
        assert [sum(p.subject == f"s{j}" for p in s[part]) for j in range(4)] == [n] * 4


def test_split_rejects_bad_fractions_and_duplicate_ids():
    with pytest.raises(DataError, match="summing to 1"):
        split_problems(_fake(5), fractions=(0.5, 0.5, 0.5))
    with pytest.raises(DataError, match="unique"):
        split_problems(_fake(3) + _fake(1))


def test_demo_answers_score_full_f1_against_themselves():
    for p in load_problems("hotpotqa"):
        assert f1_score(p.gold, p.gold) == 1.0


def test_sample_seed_spreads_a_limited_subset_over_the_file(data_root):
    path = data_root / "mmlu" / "val.jsonl"
    first = load_problems("mmlu", path, limit=12)
    assert len({p.subject for p in first}) <= 2  # the file is sorted by subject
    spread = load_problems("mmlu", path, limit=12, sample_seed=0)
    assert len(spread) == 12 and len({p.subject for p in spread}) >= 8
    assert [p.id for p in spread] == [p.id for p in load_problems("mmlu", path, limit=12, sample_seed=0)]
    assert [p.id for p in spread] != [p.id for p in load_problems("mmlu", path, limit=12, sample_seed=1)]
