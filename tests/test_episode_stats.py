"""Episode statistics on hand-made logs: interval, failures, letters, per-model scores, adapter-norm spread."""

from __future__ import annotations

import pytest

from haps.evaluation.episode_stats import compare, episode_stats


def _ep(pid, score, pred, gold, teacher, student, norms, failed=False, parse=(False, True)):
    turns = [{"role": "student", "model": student, "adapter_norm": norms[0], "parse_error": "x" if parse[0] else None},
             {"role": "teacher", "model": teacher, "adapter_norm": norms[1], "parse_error": "x" if parse[1] else None}]
    return {"id": pid, "score": None if failed else score, "prediction": None if failed else pred, "gold": gold,
            "assignment": {"teacher": teacher, "student": student}, "turns": turns, "failed": failed}


def test_episode_stats_by_hand():
    eps = [_ep("a", 1.0, "A", "A", "s", "g", (0.5, None)), _ep("b", 0.0, "A", "B", "s", "g", (0.7, None)),
           _ep("c", 1.0, "C", "C", "g", "g", (0.2, 0.2)), _ep("d", 0.0, None, "D", "s", "s", (None, None), failed=True)]
    st = episode_stats(eps, n_boot=200)
    assert st["episodes"] == 4 and st["failed"] == 1 and st["turns"] == 8
    assert st["parse_failure_rate"] == pytest.approx(4 / 8)
    assert st["score"]["mean"] == pytest.approx(2 / 3)
    assert st["predictions"] == {"A": 2, "C": 1} and st["gold"] == {"A": 1, "B": 1, "C": 1}
    assert st["score_by_role_model"]["student"] == {"g": {"n": 3, "mean": pytest.approx(2 / 3)}}
    assert st["score_by_role_model"]["teacher"]["s"] == {"n": 2, "mean": 0.5}
    g = st["adapter_norms"]["g"]
    assert g["n"] == 4 and g["distinct"] == 3 and g["min"] == 0.2 and g["max"] == 0.7
    assert g["mean"] == pytest.approx((0.5 + 0.7 + 0.2 + 0.2) / 4)
    assert st["adapter_norms_per_problem"]["g"]["n"] == 3  # one value per problem


def test_compare_is_paired_on_common_problems():
    a = [_ep("a", 1.0, "A", "A", "s", "g", (0, 0)), _ep("b", 1.0, "A", "A", "s", "g", (0, 0)),
         _ep("c", 0.0, "A", "A", "s", "g", (0, 0))]
    b = [_ep("a", 0.0, "A", "A", "s", "g", (0, 0)), _ep("b", 1.0, "A", "A", "s", "g", (0, 0)),
         _ep("x", 1.0, "A", "A", "s", "g", (0, 0))]
    d = compare(a, b, n_boot=500)
    assert d["problems"] == 2 and d["diff"] == pytest.approx(0.5)
    assert compare(a, [], n_boot=10) == {"problems": 0}


def test_episode_stats_command_writes_the_paired_difference(tmp_path, capsys):
    import json

    from haps.cli import main

    a = [_ep("a", 1.0, "A", "A", "s", "g", (0.5, None)), _ep("b", 1.0, "B", "B", "s", "g", (0.7, None))]
    b = [_ep("a", 0.0, "C", "A", "g", "g", (None, None)), _ep("b", 1.0, "B", "B", "g", "g", (None, None))]
    for name, eps in (("a", a), ("b", b)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in eps))
    with pytest.raises(SystemExit) as ok:
        main(["episode-stats", f"ref={tmp_path / 'a.jsonl'}", f"T=g S=g={tmp_path / 'b.jsonl'}", "--json",
              str(tmp_path / "s.json"), "--n-boot", "200"])
    assert ok.value.code == 0
    got = json.loads((tmp_path / "s.json").read_text())
    assert got["ref"]["minus_ref"] is None and got["ref"]["stats"]["score"]["mean"] == 1.0
    b = got["T=g S=g"]  # a name may hold "=": NAME=PATH splits at the last one
    assert b["minus_ref"]["diff"] == pytest.approx(-0.5) and b["minus_ref"]["problems"] == 2
    assert b["stats"]["selection"] == {"teacher=g,student=g": 2}
    assert "differences paired by problem, against ref" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["episode-stats", str(tmp_path / "nope.jsonl")])
    assert e.value.code == 2 and "nope.jsonl" in capsys.readouterr().err
