"""The one progress bar of every long job (episodes, collection, SFT, benchmarks).

    bar = progress_bar(enabled)
    with bar:
        task = bar.add_task("collect mmlu", total=n)
        bar.update(task, advance=1, info="0.85 ep/s")   # info: a free text column (rates, loss)

Disabled bars accept the same calls and draw nothing.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _InfoColumn(ProgressColumn):
    """The task's ``info`` field (empty when the task has none)."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("info", "")))


def progress_bar(enabled: bool = True, *, console: Console | None = None) -> Progress:
    """A rich progress bar: description, bar, done/total, an ``info`` text, elapsed time and ETA."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _InfoColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                    disable=not enabled)
