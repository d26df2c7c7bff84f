"""The stages of an experiment, their state (done / partial / to do) and their time estimates.

A stage is done when ``OUT/stages.json`` records it finished with the same fingerprint (a hash of what it
runs: its resolved config and the fingerprints of the stages it reads) and its output exists. Otherwise it
is *partial* (its output exists: collection and RL resume from it, the other stages start again and
overwrite it), *changed* (it finished with other settings: redone; an RL run's folder is cleared first, a
collection is never thrown away: that is an error naming the fix) or *to do*.

Estimates are work left x seconds per unit of work. The seconds per unit come from this experiment's own
finished stages of the same kind and task (``stages.json`` keeps each stage's seconds and units), else
from `DEFAULT_RATES`, measured on the 2-core development machine with nothing else running (model loading
excluded):

| stage | unit | default rate | measured on |
| --- | --- | --- | --- |
| collect, eval (HAPS episodes) | greedy episode | MMLU 4.5 s at 80 tokens/call, 3 rounds; HotpotQA 7 s at 64 tokens, B=1, no summaries; scaled by tokens per call and calls per episode | MMLU: 100-155 s per lockstep chunk of 32 episodes (8 problems x 4 assignments) in a 320-problem collection; HotpotQA: the README's 10.1 s (an older engine) scaled by MMLU's gain since |
| sft | training example x epoch | 4.2 s (validation included) | 3 epochs on 18 problems: 225 s |
| rl | sampled episode (+ re-scoring and update) | 11 s at 80 tokens/call, plus greedy validation episodes | a 4-episode MMLU step: 30-60 s |
| baselines | baseline | 10 s | fitting the six baselines on 72 train problems |
| warmup, report | stage | 2 s, 15 s | |
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from haps.files import write_json_atomic

STATE = "stages.json"

#: seconds per unit of work when this experiment has measured none (see the module docstring)
DEFAULT_RATES: dict[str, float] = {
    "episode/mmlu": 4.5,  # at 80 tokens per call, 3 rounds
    "episode/hotpotqa": 7.0,  # at 64 tokens per call, budget 1, no summaries
    "episode/other": 8.0,
    "rl_episode": 11.0,  # at 80 tokens per call
    "sft_example": 4.2,
    "baseline": 10.0,
    "warmup": 2.0,
    "report": 15.0,
}


def episode_seconds(task: str, tokens: int | None, options: dict[str, Any]) -> float:
    """Default seconds of one greedy episode of ``task`` (`DEFAULT_RATES` scaled by tokens per call and by
    the calls an episode makes relative to the measured settings)."""
    tokens = tokens or 256
    if task == "mmlu":
        return DEFAULT_RATES["episode/mmlu"] * tokens / 80 * options.get("rounds", 3) / 3
    if task == "hotpotqa":
        calls = (options.get("budget", 3) + 1) * (2 if options.get("summaries", True) else 1)
        return DEFAULT_RATES["episode/hotpotqa"] * tokens / 64 * calls / 2
    return DEFAULT_RATES["episode/other"] * tokens / 80


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stage:
    """One stage of the plan."""

    id: str  # mmlu/tiny/collect, mmlu/tiny/rl/full, report
    kind: str  # collect | warmup | sft | rl | baselines | eval | report
    output: Path
    spec: dict[str, Any]  # what it runs (resolved), hashed into the fingerprint
    task: str | None = None
    setting: str | None = None
    variant: str | None = None
    after: list[str] = field(default_factory=list)
    needs_models: bool = False  # loads pool models (a closed setting's server must run)
    fingerprint: str = ""
    status: str = "to do"  # done | partial | changed | to do
    work: float = 0.0  # units of work left
    unit: str = ""
    rate_key: str = ""  # which rate estimates it
    rate: float = 0.0  # seconds per unit
    extra_s: float = 0.0  # estimated seconds besides work x rate (e.g. RL validation)
    info: dict[str, Any] = field(default_factory=dict)  # what the runner needs that is not hashed

    @property
    def estimate_s(self) -> float:
        return 0.0 if self.status == "done" else self.work * self.rate + self.extra_s


class StageState:
    """``OUT/stages.json``: per stage its fingerprint, whether it finished, its seconds and units of work."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / STATE
        self.data: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, sid: str) -> dict[str, Any]:
        return self.data.get(sid, {})

    def started(self, stage: Stage) -> None:
        self.data[stage.id] = {"fingerprint": stage.fingerprint, "state": "running", "kind": stage.kind,
                               "task": stage.task, "work": stage.work, "unit": stage.unit,
                               "rate_key": stage.rate_key, "started": _now()}
        self._write()

    def finished(self, stage: Stage, seconds: float, units: float | None = None) -> None:
        rec = self.data.setdefault(stage.id, {"fingerprint": stage.fingerprint})
        rec.update(state="done", finished=_now(), seconds=round(seconds, 2),
                   units=stage.work if units is None else units)
        self._write()

    def measured_rate(self, rate_key: str) -> float | None:
        """Seconds per unit over this experiment's finished stages estimated by ``rate_key``."""
        secs = units = 0.0
        for rec in self.data.values():
            if rec.get("state") == "done" and rec.get("rate_key") == rate_key and rec.get("units"):
                secs += float(rec.get("seconds", 0.0))
                units += float(rec["units"])
        return secs / units if units > 0 else None

    def _write(self) -> None:
        write_json_atomic(self.path, self.data)


def _now() -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S")


def assign_status(stages: list[Stage], state: StageState) -> None:
    """Fingerprints (each stage's spec with its inputs' fingerprints) and statuses, in plan order."""
    by_id = {s.id: s for s in stages}
    for s in stages:
        s.fingerprint = fingerprint({"kind": s.kind, "spec": s.spec, "after": [by_id[a].fingerprint for a in s.after]})
        rec = state.get(s.id)
        exists = s.output.exists()
        if rec.get("state") == "done" and rec.get("fingerprint") == s.fingerprint and exists:
            s.status = "done"
        elif rec and rec.get("fingerprint") != s.fingerprint and exists:
            s.status = "changed"
        elif exists:
            s.status = "partial"
        else:
            s.status = "to do"


def apply_rates(stages: list[Stage], state: StageState) -> None:
    """Each stage's seconds per unit: measured by this experiment (same rate key), else its default."""
    for s in stages:
        measured = state.measured_rate(s.rate_key) if s.rate_key else None
        default = s.info.get("default_rate", DEFAULT_RATES.get(s.rate_key, 0.0))
        s.rate = measured if measured is not None else float(default)
        s.info["rate_source"] = "measured" if measured is not None else "default"


def fmt_seconds(s: float) -> str:
    if s <= 0:
        return "-"
    if s < 90:
        return f"{math.ceil(s)} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
