"""`haps report`: the paper's tables and figures from a folder of `haps eval` results (`haps.report`)."""

from __future__ import annotations

from pathlib import Path

import typer

from haps.cli import app
from haps.cli.common import check_out


@app.command("report")
def report_cmd(
    results: Path = typer.Option(..., help="Results folder: RESULTS/<task>/<setting>[/<variant>]/summary.json "
                                 "from `haps eval --out` (see `haps.report`)."),
    out: Path = typer.Option(..., help="Output folder: report.md, report.html (self-contained) and the PNG plots."),
) -> None:
    """Build report.md, report.html and PNG plots in the layouts of the paper's Tables 2-5 and Figs. 3-5."""
    from rich.console import Console

    from haps.report import build_report

    check_out(out, folder=True)
    rep = build_report(results, out)
    console = Console()
    for line in rep.status_lines():
        console.print(line)
    console.print(f"Wrote {rep.markdown} and {rep.html} ({len(rep.images)} plots).")
