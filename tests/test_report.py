"""`haps report`: the paper's layouts from a fixture results folder written by real `haps eval` runs on
synthetic collections (HAPS rows through a stand-in ``run_infer``), rendered in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from evalfixtures import SPACE, install_fake_infer, write_collection
from haps.errors import DataError
from haps.evaluation.config import EvalConfig
from haps.evaluation.run import run_eval
from haps.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
COST = [1e-4, 2e-4, 3e-4, 4e-4]


def cells(pid, split, j):
    """Planted: z1 wins on even problems, z2 on odd ones, z3 is decent everywhere; z0 is cheap and weak."""
    i = int(pid[1:])
    score = {0: 0.2, 1: 1.0 if i % 2 == 0 else 0.0, 2: 1.0 if i % 2 else 0.0, 3: 0.6}[j]
    if split == "test" and i == 3 and j == 1:
        return None  # one failed episode
    return score, COST[j] * (1 + 0.1 * (i % 3))


def collection(root: Path, name: str, closed_big: bool = False) -> Path:
    splits = {"train": [f"r{i}" for i in range(12)], "valid": [f"v{i}" for i in range(4)],
              "test": [f"t{i}" for i in range(8)]}
    return write_collection(root / name, splits, cells, closed_big=closed_big, pool_name=name)


def haps_route(bonus: float, fail: str | None = None):
    def route(pid):  # the oracle's pick, score scaled by `bonus`
        i = int(pid[1:])
        j = 1 if i % 2 == 0 else 2
        return j, min(1.0, bonus), COST[j], pid == fail
    return route


def evaluate(actions: Path, out: Path, monkeypatch, *, bonus: float = 1.0, methods: str, **kw) -> dict:
    install_fake_infer(monkeypatch, haps_route(bonus, fail="t5"))
    (out.parent / "ckpt").mkdir(parents=True, exist_ok=True)
    cfg = EvalConfig(task="mmlu", actions=str(actions), out=str(out), methods=[methods], router=str(out.parent / "ckpt"),
                     n_boot=200, **kw)
    return run_eval(cfg, progress=False, embedder=_embedder())


def _embedder():
    from test_baselines import FakeEmbedder

    return FakeEmbedder()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """RESULTS/mmlu/{toy,mixed}/... as documented in haps.report, written by haps eval runs."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("report")
    res = root / "RESULTS"
    toy, mixed = collection(root, "toy"), collection(root, "mixed", closed_big=True)
    main = "oracle,random,all-static,best_static,knn,routellm_clf,haps,haps-no-lora"
    try:
        evaluate(toy, res / "mmlu" / "toy", mp, methods=main)
        for a, b in ((0.8, 0.2), (0.5, 0.5)):  # the third regime is left out: "not run"
            evaluate(toy, res / "mmlu" / "toy" / f"tradeoff-{a}-{b}", mp, methods="all-static,random,knn,haps",
                     reward="tradeoff", alpha=a, beta=b)
        evaluate(toy, res / "mmlu" / "toy" / "no-sharing", mp, bonus=0.5, methods="haps")
        for k, bonus in ((1, 0.6), (2, 0.9), (3, 0.8)):
            evaluate(toy, res / "mmlu" / "toy" / f"depth-{k}", mp, bonus=bonus, methods="haps")
        evaluate(mixed, res / "mmlu" / "mixed", mp, methods="oracle,random,all-static,best_static,haps")
    finally:
        mp.undo()
    return res


def test_report_files_and_sections(results, tmp_path):
    rep = build_report(results, tmp_path / "report")
    assert rep.runs == 8
    assert all(rep.sections.values()), rep.sections
    assert {p.name for p in rep.images} == {"fig3_sharing.png", "fig4_depth_mmlu.png", "pareto_mmlu_toy.png",
                                            "pareto_mmlu_mixed.png", "fig5_mixed.png"}
    for p in rep.images:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = rep.markdown.read_text()
    for title in ("Main results (Table 2)", "Ablations (Table 3)", "Parameter sharing (Fig. 3)", "LoRA depth (Fig. 4)",
                  "Cost trade-off (Table 5)", "Mixed open / closed pool (Fig. 5)", "Router metrics per setting"):
        assert f"## {title}" in md
    # Table 2: the toy pool only (the mixed pool is Fig. 5's); HAPS is best (bold), scores in percent
    table2 = md.split("## Main results (Table 2)")[1].split("## Ablations")[0]
    assert "MMLU (Acc) / toy" in table2 and "MMLU (Acc) / mixed" not in table2
    assert re.search(r"\| HAPS \| \*\*100\.0 \[100\.0, 100\.0\] 1 failed\*\* \|", table2), table2
    # Table 3: positions of the two-model pool, HAPS variants from the main run and the no-sharing run
    table3 = md.split("## Ablations (Table 3)")[1].split("## Parameter sharing")[0]
    for row in ("w/o High-Level (Random)", "Teacher=Left, Student=Right", "Teacher=Right, Student=Right",
                "w/o Low-Level Router", "w/o Parameter Sharing | 50.0"):
        assert row in table3
    # Table 5: two regimes run, the third says so; the static rows name All Weak / All Strong
    table5 = md.split("## Cost trade-off (Table 5)")[1].split("### Cost vs quality")[0]
    assert "α=0.2, β=0.8: Perf ↑" in table5 and "not run" in table5
    assert "All Weak (T=small S=small)" in table5 and "All Strong (T=big S=big)" in table5
    # labels are short and whole; the closed model is named in Fig. 5's note
    assert "teacher=small,student=big" not in md.split("## Runs")[0]
    assert "closed = big" in md


def test_sections_without_inputs_say_not_run(results, tmp_path):
    only = tmp_path / "RESULTS" / "mmlu" / "toy"
    only.mkdir(parents=True)
    shutil.copy(results / "mmlu" / "toy" / "summary.json", only / "summary.json")
    rep = build_report(tmp_path / "RESULTS", tmp_path / "report")
    assert rep.sections == {"Main results (Table 2)": True, "Ablations (Table 3)": True,
                            "Parameter sharing (Fig. 3)": False, "LoRA depth (Fig. 4)": False,
                            "Cost trade-off (Table 5)": False, "Cost vs quality (Pareto plots)": True,
                            "Mixed pool (Fig. 5)": False}
    md = rep.markdown.read_text()
    for title in ("Parameter sharing (Fig. 3)", "LoRA depth (Fig. 4)", "Cost trade-off (Table 5)",
                  "Mixed open / closed pool (Fig. 5)"):
        assert md.split(f"## {title}")[1].lstrip().startswith("not run:")
    with pytest.raises(DataError, match="no summary.json"):
        build_report(tmp_path / "report", tmp_path / "r2")


def test_report_command(results, tmp_path):
    from typer.testing import CliRunner

    from haps.cli import _register, app

    _register()
    res = CliRunner().invoke(app, ["report", "--results", str(results), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert "LoRA depth (Fig. 4): rendered" in res.output
    assert (tmp_path / "rep" / "report.html").exists()


CHECK = """<script>window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
  var out = document.createElement('pre'); out.id = 'haps-check';
  out.textContent = JSON.stringify({images: imgs.length, broken: bad, tables: document.querySelectorAll('table').length,
                                    rows: document.querySelectorAll('tbody tr').length});
  document.body.appendChild(out);
});</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_report_html_renders_in_headless_chromium(results, tmp_path):
    rep = build_report(results, tmp_path / "report")
    page = rep.html.read_text()
    # self-contained: nothing but inline data is referenced, and the page's policy forbids loading anything else
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", page)
    assert "default-src 'none'" in page
    n_tables = page.count("<table>")
    assert n_tables >= 7 and page.count("<img ") == len(rep.images)
    # the checking script needs inline scripts: allow them in a copy, nothing else changes
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
                     .replace("</body>", CHECK + "</body>"))
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    m = re.search(r'<pre id="haps-check">(.*?)</pre>', dom)
    assert m, dom[-2000:]
    got = json.loads(m.group(1).replace("&quot;", '"'))
    assert got["images"] == len(rep.images) and got["broken"] == 0, got
    assert got["tables"] == n_tables and got["rows"] > 30
    # a broken image would be caught: the same check on a page with an external and a corrupt image
    bad = tmp_path / "bad.html"
    bad.write_text(probe.read_text().replace("<h1>", '<img src="http://127.0.0.1:9/x.png"><img src="data:image/png;'
                                            'base64,AAAA"><h1>', 1))
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--no-first-run", f"--user-data-dir={tmp_path / 'profile2'}", "--virtual-time-budget=5000",
                          "--dump-dom", bad.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    got = json.loads(re.search(r'<pre id="haps-check">(.*?)</pre>', dom).group(1).replace("&quot;", '"'))
    assert got["broken"] == 2


def test_space_labels_match_the_fixture():
    assert SPACE.size == 4
