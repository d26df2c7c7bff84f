"""Phase 1 of the paper (App. D): supervised warm-up of the high-level router on D_warm.

Recipe (setup / train / save_checkpoint): causal-LM loss on the JSON answer tokens only (the prompt is
masked), AdamW, linear warm-up then cosine decay, gradient accumulation, full fine-tuning or a PEFT
LoRA on the backbone. After every epoch (and once before training) the router is validated by lookup on
the validation split's action-level data; the best epoch by validation reward (ties: by expected reward
under P(z|p)) is kept and written as
safetensors + JSON.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from haps.errors import ConfigError
from haps.files import write_json_atomic
from haps.progress import progress_bar
from haps.routing.high_level import HighLevelRouter, HighLevelRouterConfig
from haps.routing.prompt import RoutingPrompt
from haps.routing.space import Assignment
from haps.train.warmup import Balance, TiePolicy

Split = Literal["train", "valid", "test"]


class SFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(default=3, ge=1, description="Passes over the warm-up set.")
    lr: float = Field(default=2e-5, gt=0, description="Peak learning rate (LoRA wants ~1e-4..1e-3).")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas (a shorter second-moment "
                                       "memory, e.g. 0.95, adapts faster after the large first steps).")
    batch_size: int = Field(default=4, ge=1, description="Examples per forward pass.")
    grad_accum: int = Field(default=1, ge=1, description="Forward passes per optimiser step.")
    warmup_ratio: float = Field(default=0.1, ge=0, le=1, description="Share of steps with linear warm-up.")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Gradient clipping (None: off).")
    seed: int = Field(default=0, description="Shuffling seed.")
    tie: TiePolicy = Field(default="random", description="Warm-up tie policy: all | random | first.")
    drop_all_zero: bool = Field(default=False, description="Drop problems no assignment solved.")
    balance: Balance = Field(default="none", description="Warm-up class balance: none | undersample | oversample.")
    train_split: Split = Field(default="train", description="Split the warm-up set comes from.")
    valid_split: Split = Field(default="valid", description="Split used for validation by lookup.")
    valid_limit: int | None = Field(default=None, ge=1, description="Validate on the first N problems only.")
    workflow: str | None = Field(default=None, description="Workflow spec overriding the collection's recorded "
                                 "one (a name or path/to/file.py:ClassName), e.g. after moving the file.")
    router: HighLevelRouterConfig = Field(default_factory=HighLevelRouterConfig)


@dataclass
class Example:
    prompt: RoutingPrompt
    target: Assignment


@dataclass
class ValidationSet:
    """Routing prompts plus the lookup table they are judged against."""

    prompts: list[RoutingPrompt]
    table: Any  # haps.evaluate.ActionTable


@dataclass
class EpochLog:
    epoch: int
    steps: int
    loss: float
    valid: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def lr_lambda(warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _rank(v: dict[str, Any]) -> tuple[float, float]:
    """Validation order: lookup reward of the router's choices, then its expected reward under P(z|p)
    (smooth: on a few problems many epochs tie on the first)."""
    return v["reward"], v.get("expected_reward", float("-inf"))


class SFTRecipe:
    """setup -> train -> save_checkpoint. Components are built from the config or passed in (tests)."""

    def __init__(self, cfg: SFTConfig) -> None:
        self.cfg = cfg
        self.history: list[EpochLog] = []
        self.best: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------ setup
    def setup(self, router: HighLevelRouter, train: Sequence[Example], valid: ValidationSet | None) -> None:
        if not train:
            raise ConfigError("the warm-up set is empty: nothing to train on.")
        self.router = router
        self.train_set = list(train)
        self.valid = valid
        router.train_mode(True)
        params = [p for p in router.parameters()]
        if not params:
            raise ConfigError("the router has no trainable parameters.")
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                           betas=self.cfg.betas)
        per_epoch = math.ceil(math.ceil(len(self.train_set) / self.cfg.batch_size) / self.cfg.grad_accum)
        self.total_steps = per_epoch * self.cfg.epochs
        warm = int(round(self.cfg.warmup_ratio * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(warm, self.total_steps))
        self.rng = random.Random(self.cfg.seed)
        self.step = 0

    # ------------------------------------------------------------------------------------ steps
    def loss_step(self, batch: Sequence[Example]) -> torch.Tensor:
        return self.router.sequence_loss([e.prompt for e in batch], [e.target for e in batch])

    def validate(self) -> dict[str, Any]:
        if self.valid is None:
            return {}
        from haps.evaluate import router_policies

        self.router.train_mode(False)
        try:
            pols = router_policies(self.router, self.valid.table, self.valid.prompts)
            out = self.valid.table.evaluate(pols["router"])
            if "router (expected)" in pols:  # E_{z ~ P(z|p)}[R], the tie-break of `_rank`
                out["expected_reward"] = self.valid.table.evaluate(pols["router (expected)"])["reward"]
            return out
        finally:
            self.router.train_mode(True)

    def train(self, progress: bool = True, on_best=None) -> list[EpochLog]:
        """Train for ``cfg.epochs``; ``on_best(recipe)`` is called whenever validation improves (and
        at the end when there is no validation set)."""
        bs, acc = self.cfg.batch_size, self.cfg.grad_accum
        v0 = self.validate()
        self.history.append(EpochLog(0, 0, math.nan, v0))
        if v0:
            self.best = {"epoch": 0, **v0}
            if on_best:
                on_best(self)
        bar = progress_bar(progress)
        with bar:
            task = bar.add_task("sft", total=self.total_steps)
            for epoch in range(1, self.cfg.epochs + 1):
                t0 = time.perf_counter()
                order = list(range(len(self.train_set)))
                self.rng.shuffle(order)
                batches = [[self.train_set[i] for i in order[s:s + bs]] for s in range(0, len(order), bs)]
                losses = []
                for bi, batch in enumerate(batches):
                    loss = self.loss_step(batch)
                    (loss / acc).backward()
                    losses.append(float(loss.detach()))
                    if (bi + 1) % acc == 0 or bi == len(batches) - 1:
                        if self.cfg.max_grad_norm is not None:
                            torch.nn.utils.clip_grad_norm_(list(self.router.parameters()), self.cfg.max_grad_norm)
                        self.optimizer.step()
                        self.scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                        self.step += 1
                        bar.update(task, advance=1, description=f"sft epoch {epoch} loss {losses[-1]:.4f}")
                v = self.validate()
                log = EpochLog(epoch, self.step, sum(losses) / len(losses), v, time.perf_counter() - t0)
                self.history.append(log)
                if v and (self.best is None or _rank(v) > _rank(self.best)):
                    self.best = {"epoch": epoch, **v}
                    if on_best:
                        on_best(self)
        if self.valid is None and on_best:
            on_best(self)
        self.router.train_mode(False)
        return self.history

    # ------------------------------------------------------------------------------------ output
    def save_checkpoint(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        info = {"sft": self.cfg.model_dump(mode="json"), "best": self.best,
                "history": [h.__dict__ for h in self.history]}
        return self.router.save(path, meta={**info, **(meta or {})})


# ---------------------------------------------------------------------------------------- from data
def build_datasets(actions: str | Path, cfg: SFTConfig):
    """(train examples, validation set, warm-up stats, collection) from an action-level data folder."""
    from haps.evaluate import ActionTable
    from haps.routing.prompt import build_routing_prompt
    from haps.train.collect import open_collection
    from haps.train.warmup import build_warmup

    col = open_collection(actions, workflow=cfg.workflow)
    space = col.space
    examples, stats = build_warmup(col.records, split=cfg.train_split, tie=cfg.tie,
                                   drop_all_zero=cfg.drop_all_zero, balance=cfg.balance, seed=cfg.seed)
    wf = col.workflow()
    pool_cfg = col.pool_config()
    problems = {p.id: p for p in col.problems()}
    prompts: dict[str, RoutingPrompt] = {}

    def prompt(pid: str) -> RoutingPrompt:
        if pid not in prompts:
            if pid not in problems:
                raise ConfigError(f"problem {pid!r} of {actions} is not in the recorded data file.")
            prompts[pid] = build_routing_prompt(wf, pool_cfg, problems[pid])
        return prompts[pid]

    train = [Example(prompt(e.problem_id), space.from_names(e.assignment)) for e in examples]
    valid = None
    vids = col.split_ids(cfg.valid_split)
    if vids:
        vids = vids[: cfg.valid_limit] if cfg.valid_limit else vids
        vrec = [r for r in col.records if r["problem_id"] in set(vids)]
        valid = ValidationSet([prompt(pid) for pid in vids], ActionTable.from_records(vrec, space))
    return train, valid, stats, col


def run_sft(actions: str | Path, out: str | Path, cfg: SFTConfig, progress: bool = True,
            router: HighLevelRouter | None = None) -> SFTRecipe:
    """The `haps sft` command: build data and router, train, keep the best checkpoint at ``out``."""
    from rich.console import Console

    console = Console()
    train, valid, stats, col = build_datasets(actions, cfg)
    console.print(stats.table())
    if router is None:
        router = HighLevelRouter.from_pool(col.space, cfg.router)
    recipe = SFTRecipe(cfg)
    recipe.setup(router, train, valid)
    meta = {"actions": str(actions), "warmup": stats.to_dict()}
    recipe.train(progress=progress, on_best=lambda r: r.save_checkpoint(out, meta))
    write_json_atomic(Path(out, "history.json"), [h.__dict__ for h in recipe.history])
    return recipe
