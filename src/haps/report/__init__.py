"""`haps report`: the paper's tables and figures from a folder of `haps eval` runs.

Results layout (each folder is one ``haps eval --out``)::

    RESULTS/<task>/<setting>/summary.json                 main run of a task on a pool / setting
    RESULTS/<task>/<setting>/tradeoff-<a>-<b>/summary.json  haps eval --reward tradeoff --alpha a --beta b
    RESULTS/<task>/<setting>/no-sharing/summary.json      HAPS w/o parameter sharing, evaluated as method haps
    RESULTS/<task>/<setting>/no-lora/summary.json         HAPS w/o the low-level router, as method haps or
                                                          haps-no-lora (or method haps-no-lora in the main run)
    RESULTS/<task>/<setting>/depth-<k>/summary.json       HAPS with LoRA on the last k layers, as method haps

``<task>`` is the workflow (hotpotqa, mmlu, ...), ``<setting>`` any name of the pool (e.g. tiny, L-Q,
mixed); other variant folder names are listed under Runs only. A setting whose pool has a closed
(API) model is a mixed pool: Fig. 5, not Table 2.

Sections, each rendered when its runs exist and saying "not run" otherwise:

| section | paper | from |
| --- | --- | --- |
| Main results | Table 2 | main runs of open-weights pools: methods x task / setting |
| Ablations | Table 3 | main runs (random, every static assignment, haps-no-lora, haps) + no-lora/, no-sharing/ |
| Parameter sharing | Fig. 3 | main haps vs no-sharing/ haps |
| LoRA depth | Fig. 4 | depth-<k>/ haps against the main run's best baseline |
| Cost trade-off | Table 5 | tradeoff-<a>-<b>/ runs (the regimes 0.8/0.2, 0.5/0.5, 0.2/0.8), and a cost-vs-score Pareto plot of every method of every main run |
| Mixed pool | Fig. 5 | main runs of pools with a closed model |
| Router metrics | | every main run: Δ vs best static / HAPS, PGR, APGR, CPT(50%), AIQ, gap, selection |
| Runs | | every summary found |

Outputs in ``OUT``: ``report.md`` (images linked), ``report.html`` (one self-contained file: plots
inlined as data URIs, inline CSS, a Content-Security-Policy that loads nothing else) and the PNG plots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

REPORT_MD = "report.md"
REPORT_HTML = "report.html"


@dataclass
class Report:
    """What `build_report` wrote, and which sections had inputs."""

    markdown: Path
    html: Path
    images: list[Path]
    sections: dict[str, bool] = field(default_factory=dict)
    runs: int = 0

    def status_lines(self) -> list[str]:
        return [f"{name}: {'rendered' if ok else 'not run'}" for name, ok in self.sections.items()]


def build_report(results: str | Path, out: str | Path, *, title: str = "HAPS evaluation report") -> Report:
    """Read every run under ``results`` (the layout above) and write the report into ``out``."""
    from haps.files import write_text_atomic
    from haps.report import sections as S
    from haps.report.render import Document, Para, to_html, to_markdown
    from haps.report.results import find_runs

    results, out = Path(results), Path(out)
    runs = find_runs(results)
    by_key = {(r.task, r.setting, r.variant): r for r in runs}
    out.mkdir(parents=True, exist_ok=True)
    images: list[Path] = []
    doc = Document(title)
    doc.add(Para(f"{len(runs)} haps eval run(s) from {results}: "
                 + ", ".join(dict.fromkeys(f"{r.task}/{r.setting}" for r in runs)) + "."))
    done = {
        "Main results (Table 2)": S.main_table(doc, runs),
        "Ablations (Table 3)": S.ablation_table(doc, runs, by_key),
        "Parameter sharing (Fig. 3)": S.sharing_section(doc, runs, by_key, out, images),
        "LoRA depth (Fig. 4)": S.depth_section(doc, runs, by_key, out, images),
        "Cost trade-off (Table 5)": S.tradeoff_section(doc, runs, by_key, out, images),
        "Cost vs quality (Pareto plots)": S.pareto_section(doc, runs, out, images),
        "Mixed pool (Fig. 5)": S.mixed_section(doc, runs, out, images),
    }
    S.metrics_section(doc, runs)
    S.runs_section(doc, runs, results)
    md, html = out / REPORT_MD, out / REPORT_HTML
    write_text_atomic(md, to_markdown(doc, out))
    write_text_atomic(html, to_html(doc))
    return Report(md, html, images, done, len(runs))
