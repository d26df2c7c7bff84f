"""What `haps experiment` runs: one pydantic config (YAML via ``--config``), its settings and HAPS variants."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from haps.errors import ConfigError
from haps.profiles import Profile

#: baselines fitted once per (task, setting) by the baselines stage (`haps.baselines`)
DEFAULT_BASELINES = ("best_static", "knn", "routellm_mf", "routellm_clf", "graphrouter", "irt")
#: the HAPS variants a config may list (see `Variant`)
VARIANT_HELP = ("full | no-sharing | no-lora | depth-<k> | tradeoff-<alpha>-<beta> (e.g. tradeoff-0.8-0.2)")
_DEPTH = re.compile(r"^depth-(?P<k>[1-9][0-9]*)$")
_TRADEOFF = re.compile(r"^tradeoff-(?P<a>[0-9]*\.?[0-9]+)-(?P<b>[0-9]*\.?[0-9]+)$")


class SettingConfig(BaseModel):
    """One setting: a pool the whole chain runs on (the report's ``<setting>``)."""

    model_config = ConfigDict(extra="forbid")
    pool: str | dict[str, Any] = Field(default="tiny", description="Built-in pool name, pool YAML file, or the pool "
                                       "itself (PoolConfig fields) inline.")
    closed: list[str] = Field(default_factory=list, description="Models of the pool played as closed models: served "
                              "by `haps serve` on 127.0.0.1 (a free port, started and stopped by the experiment) and "
                              "reached through the OpenAI-compatible API backend: no adapters, no gradients, the API's "
                              "token usage as cost (a mixed open/closed pool, paper Fig. 5).")
    tasks: list[str] | None = Field(default=None, description="Run this setting for these tasks only (None: all).")
    serve_options: dict[str, Any] = Field(default_factory=dict, description="Options of the `haps serve` of the "
                                          "closed models (ServeConfig fields, e.g. max_batch_size).")


class ExperimentConfig(BaseModel):
    """collect -> warm-up -> SFT -> RL (one run per HAPS variant) -> baselines -> eval -> report, per task and
    setting. Sections hold the fields of each stage's own config; a value may be keyed by task
    (``limit: {mmlu: 120, hotpotqa: 90}``)."""

    model_config = ConfigDict(extra="forbid")
    profile: Profile = Field(default="default", description="default | paper: the paper's protocol where haps' "
                             "defaults differ (haps.profiles; the values given here still win).")
    tasks: list[str] = Field(default_factory=lambda: ["mmlu", "hotpotqa"], description="Workflows, in order.")
    settings: dict[str, SettingConfig] = Field(default_factory=lambda: {"tiny": SettingConfig()},
                                               description="Setting name -> pool (and closed models).")
    collect: dict[str, Any] = Field(default_factory=dict, description="CollectConfig fields (task and pool come "
                                    "from the experiment); data paths as given or relative to $HAPS_DATA.")
    sft: dict[str, Any] = Field(default_factory=dict, description="SFTConfig fields.")
    rl: dict[str, Any] = Field(default_factory=dict, description="RLConfig fields shared by every variant (task, "
                               "data, pool, workflow options and the split come from the collection).")
    rl_steps: int | dict[str, int] | None = Field(default=None, description="Cap on the updates of each RL run "
                                                  "(None: the epochs of the rl section).")
    variants: list[str] = Field(default_factory=lambda: ["full"], description="HAPS variants, each one RL run and "
                                "one haps eval: " + VARIANT_HELP + ". Empty: no HAPS (baselines only).")
    baselines: list[str] = Field(default_factory=lambda: list(DEFAULT_BASELINES), description="Baselines fitted "
                                 "once on the train split and scored in the main eval.")
    eval: dict[str, Any] = Field(default_factory=dict, description="EvalConfig fields of every eval (n_boot, seed, "
                                 "scoring, sweep_points, limit, baselines: {name: config}).")
    notes: str | None = Field(default=None, description="Free text, ignored.")

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        for name in v:
            Variant.parse(name)
        if len(set(v)) != len(v):
            raise ConfigError(f"variants: each variant once, got {v}.")
        return v

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if not self.tasks:
            raise ConfigError("tasks: list at least one workflow (e.g. [mmlu]).")
        if not self.settings:
            raise ConfigError("settings: name at least one setting (e.g. {tiny: {pool: tiny}}).")
        for name, s in self.settings.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ConfigError(f"settings: {name!r} is used as a folder name; use letters, digits, '.', '_', '-'.")
            for t in s.tasks or []:
                if t not in self.tasks:
                    raise ConfigError(f"settings.{name}.tasks: {t!r} is not one of the experiment's tasks {self.tasks}.")
        bad = [k for k in ("task", "pool") if k in self.collect]
        if bad:
            raise ConfigError(f"collect: {bad} come from the experiment (tasks, settings); remove them.")
        return self

    def settings_of(self, task: str) -> list[str]:
        return [n for n, s in self.settings.items() if s.tasks is None or task in s.tasks]


def for_task(section: Mapping[str, Any], task: str, tasks: Sequence[str]) -> dict[str, Any]:
    """A section with its per-task values picked: a mapping whose keys are all task names (the experiment's,
    or registered workflows) is that field's value per task (a task it does not name gets the field's default)."""
    from haps.workflows.loader import workflow_names

    out: dict[str, Any] = {}
    names = set(tasks) | set(workflow_names())
    for k, v in section.items():
        if isinstance(v, Mapping) and v and set(v) <= names:
            if task in v:
                out[k] = v[task]
        else:
            out[k] = v
    return out


@dataclass(frozen=True)
class Variant:
    """A HAPS variant: its RL overrides, the results folder its eval writes (None: the setting's main run) and
    how that eval runs.

    | variant | RL run | eval (folder, methods) |
    | --- | --- | --- |
    | ``full`` | the rl section | main run: every baseline, the SFT router, ``haps`` and ``haps-no-lora`` |
    | ``no-sharing`` | generators on a frozen copy of the backbone | ``no-sharing/``: ``haps`` |
    | ``no-lora`` | no adapters (the high-level router trained by the routing term) | ``no-lora/``: ``haps-no-lora`` |
    | ``depth-<k>`` | LoRA on the last k layers | ``depth-<k>/``: ``haps`` (the pool's LoRA target at k) |
    | ``tradeoff-<a>-<b>`` | reward a * score - b * normalised cost | ``tradeoff-<a>-<b>/``: every method, that reward |
    """

    name: str
    rl: dict[str, Any] = field(default_factory=dict)
    folder: str | None = None
    depth: int | None = None
    tradeoff: tuple[float, float] | None = None

    @classmethod
    def parse(cls, name: str) -> Variant:
        if name == "full":
            return cls(name)
        if name == "no-sharing":
            return cls(name, {"low_level_config": {"share_backbone": False}}, "no-sharing")
        if name == "no-lora":
            return cls(name, {"low_level": False, "routing_term": True, "high_level": "router"}, "no-lora")
        m = _DEPTH.match(name)
        if m:
            k = int(m["k"])
            return cls(name, {"last_k_layers": k}, name, depth=k)
        m = _TRADEOFF.match(name)
        if m:
            a, b = float(m["a"]), float(m["b"])
            return cls(name, {"reward": {"kind": "tradeoff", "alpha": a, "beta": b}}, f"tradeoff-{m['a']}-{m['b']}",
                       tradeoff=(a, b))
        raise ConfigError(f"unknown variant {name!r}; variants: {VARIANT_HELP}.")
