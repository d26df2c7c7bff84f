"""Finding and reading the `haps eval` runs of a results folder (the layout is in `haps.report`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from haps.errors import DataError

SUMMARY = "summary.json"
MAIN = "main"
TRADEOFF = re.compile(r"^tradeoff-(?P<alpha>[0-9.]+)-(?P<beta>[0-9.]+)$")
DEPTH = re.compile(r"^depth-(?P<k>[0-9]+)$")
#: variant folders with a meaning in the report (besides tradeoff-<a>-<b> and depth-<k>)
NAMED_VARIANTS = {"no-sharing": "HAPS w/o parameter sharing (Fig. 3)",
                  "no-lora": "HAPS w/o low-level router (Table 3)"}
TASK_TITLES = {"hotpotqa": "HotpotQA (F1)", "mmlu": "MMLU (Acc)"}


@dataclass
class Run:
    """One `haps eval` summary placed in the layout: ``RESULTS/<task>/<setting>[/<variant>]/summary.json``."""

    task: str
    setting: str
    variant: str  # MAIN for the setting's own summary
    path: Path
    summary: dict[str, Any]

    @property
    def methods(self) -> dict[str, dict[str, Any]]:
        return self.summary.get("methods", {})

    @property
    def mixed(self) -> bool:
        return bool(self.summary.get("mixed"))

    @property
    def column(self) -> str:
        """``MMLU (Acc) / tiny``: the column title of this run's setting."""
        return f"{TASK_TITLES.get(self.task, self.task)} / {self.setting}"

    def tradeoff(self) -> tuple[float, float] | None:
        m = TRADEOFF.match(self.variant)
        return (float(m["alpha"]), float(m["beta"])) if m else None

    def depth(self) -> int | None:
        m = DEPTH.match(self.variant)
        return int(m["k"]) if m else None

    def score(self, method: str) -> dict[str, float] | None:
        m = self.methods.get(method)
        return m.get("score") if m else None


def find_runs(results: str | Path) -> list[Run]:
    """Every summary.json under ``results`` at depth 2 (main) or 3 (variant), sorted by task, setting, variant.

    A summary elsewhere, or one that is not a `haps eval` summary, is a DataError naming the file and the
    layout."""
    root = Path(results)
    if not root.is_dir():
        raise DataError(f"results folder {str(root)!r} does not exist; pass the folder holding "
                        "<task>/<setting>/summary.json (from haps eval --out).")
    runs = []
    for p in sorted(root.rglob(SUMMARY)):
        rel = p.parent.relative_to(root).parts
        if len(rel) not in (2, 3):
            raise DataError(f"{str(p)!r} is not at <task>/<setting>/summary.json or <task>/<setting>/<variant>/"
                            f"summary.json under {str(root)!r}; move it there.")
        try:
            summary = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{str(p)!r} is not readable JSON ({e}); rerun the haps eval that wrote it.") from None
        if not isinstance(summary, dict) or not str(summary.get("format", "")).startswith("haps-eval/"):
            raise DataError(f"{str(p)!r} is not a haps eval summary (format haps-eval/1).")
        runs.append(Run(rel[0], rel[1], rel[2] if len(rel) == 3 else MAIN, p, summary))
    if not runs:
        raise DataError(f"no summary.json under {str(root)!r}; run haps eval --out {root}/<task>/<setting> first.")
    return sorted(runs, key=lambda r: (r.task, r.setting, r.variant != MAIN, r.variant))
