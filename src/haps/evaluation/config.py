"""What `haps eval` runs: one pydantic config (YAML via ``--config``; options given on the command line win)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from haps.errors import ConfigError

#: ``--methods`` when none is given (``haps`` is added when ``--router`` names a checkpoint)
DEFAULT_METHODS = ("oracle", "random", "all-static", "best_static", "knn", "routellm_mf", "routellm_clf",
                   "graphrouter", "irt")

#: the paper's cost regimes (Table 5): (alpha, beta) of alpha * Perf - beta * Cost_norm
PAPER_REGIMES = ((0.8, 0.2), (0.5, 0.5), (0.2, 0.8))

Scoring = Literal["auto", "lookup", "episodes"]
RewardKind = Literal["score", "shaped", "tradeoff"]


class EvalConfig(BaseModel):
    """Everything `haps eval` does."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(description="Workflow of the collection (a name, a plugin or path/to/file.py:ClassName); "
                      "it must be the workflow the action table was collected with.")
    actions: str = Field(description="Action-level data folder (`haps collect --out`): the routers' train and "
                         "valid splits, and the test split's outcomes for lookup.")
    out: str = Field(description="Output folder: summary.json, per_problem.jsonl, routers/, episodes/.")
    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS), description=(
        "Methods: oracle, random, static:<role>=<model>,... , all-static, best_static, knn, routellm_mf, "
        "routellm_clf, graphrouter, irt (each fitted on the train split, or <name>:<CKPT> to load one), "
        "sft:<CKPT> (the high-level router alone), haps[:<DIR>] and haps-no-lora[:<DIR>] (the hierarchical "
        "router's real episodes with / without its generated adapters)."))
    router: str | None = Field(default=None, description="HAPS checkpoint folder for `haps` / `haps-no-lora` "
                               "given without a folder.")
    data: str | None = Field(default=None, description="Problems file of the test problems (default: the "
                             "collection's test split). Its problems in the collection's train or valid split "
                             "are left out; those in its test split are looked up, the rest are played.")
    limit: int | None = Field(default=None, ge=1, description="Evaluate the first N test problems.")
    scoring: Scoring = Field(default="auto", description="auto: look (p, z) up in the action table where it was "
                             "collected (exact under greedy decoding) and play the rest; lookup: never play "
                             "(uncollected picks are counted as missing); episodes: play every pick.")
    reward: RewardKind | None = Field(default=None, description="Reward of the evaluation (default: the kind the "
                                      "collection recorded); tradeoff = alpha * score - beta * normalised cost, "
                                      "the normaliser fitted on the train split's costs.")
    alpha: float | None = Field(default=None, description="tradeoff: weight of the performance term.")
    beta: float | None = Field(default=None, ge=0, description="tradeoff: weight of the normalised cost term.")
    setting: str | None = Field(default=None, description="Name of the pool / setting recorded in the summary "
                                "(default: the pool's name), used by `haps report`.")
    baselines: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Config of each fitted "
                                                 "baseline by name (e.g. {knn: {k: 10}}).")
    n_boot: int = Field(default=2000, ge=100, description="Bootstrap resamples of every interval.")
    level: float = Field(default=0.95, gt=0, lt=1, description="Confidence level of the intervals.")
    seed: int = Field(default=0, description="Seed of the bootstrap resamples.")
    sweep_points: int = Field(default=21, ge=3, description="Points of each router's quality curve (threshold "
                              "shares, cost penalties).")
    save_routers: bool = Field(default=True, description="Save each fitted baseline under OUT/routers/<name>.")

    @model_validator(mode="after")
    def _tradeoff(self) -> EvalConfig:
        if self.reward == "tradeoff" and (self.alpha is None or self.beta is None):
            raise ConfigError("--reward tradeoff needs --alpha A --beta B (the paper's regimes: 0.8/0.2, 0.5/0.5, "
                              "0.2/0.8).")
        if self.reward != "tradeoff" and (self.alpha is not None or self.beta is not None):
            raise ConfigError("--alpha/--beta are the weights of --reward tradeoff; add --reward tradeoff or drop "
                              "them.")
        return self
