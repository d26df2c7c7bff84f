"""Shared machinery of the baseline routers: fitting on an action table, utilities, checkpoints.

A baseline router is fitted once on the **train split** of an action table r(p, z) (a
`haps.evaluate.ActionTable`, (P, A) tensors in the space's product order) plus each problem's text
(what ``Workflow.problem_text`` returns, which the routing prompt carries as ``meta["problem"]``), and
then estimates a utility per routing prompt and assignment::

    router = KNNRouter(space, KNNConfig(k=10), embedder=emb).fit(train_table, texts, valid=valid_table)
    u = router.utility(prompts)            # (B, A): higher is better
    router.route(prompts)                  # the base Router's decision: arg max of log_probs
    router.save(DIR); get_router("knn:" + DIR, space=space, embedder=emb)

Semantics of the decision (the base `haps.routing.base.Router` takes the arg max, ties -> lowest index)::

    log_probs(p) = log_softmax(decision_scores(p) / temperature)   # (B, A)
    decision_scores = utility                                      # threshold routers override log_probs

Query embeddings come from an injectable **embedder**: any callable ``texts -> (n, d)`` float tensor
(an optional ``model_id`` attribute names it in checkpoints). The default, `MiniLMEmbedder`, is the
offline all-MiniLM-L6-v2 of `haps.retrieval` (unit-norm rows, d = 384), loaded on first call.

Checkpoints are a folder with ``router.json`` (format, router name, config, space, embedder id and
dimension, the sha256 of the weights) and ``weights.safetensors``; no pickle. Both files are written to a
temp name and renamed (weights first, so a reader never sees a JSON whose weights are missing); the
hash catches a weights file from another save.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from haps.errors import ConfigError, DataError, ShapeError
from haps.routing.base import ROUTERS, Router
from haps.routing.prompt import RoutingPrompt
from haps.routing.space import AssignmentSpace

CHECKPOINT_FORMAT = "haps-baseline-router/1"
WEIGHTS = "weights.safetensors"
INFO = "router.json"

#: An embedder maps texts to an (n, d) float tensor (one row per text).
Embedder = Callable[[Sequence[str]], torch.Tensor]


class BaselineConfig(BaseModel):
    """Fields every baseline has; each baseline's config extends it."""

    model_config = ConfigDict(extra="forbid")
    seed: int = Field(default=0, description="Seed of initialisation, shuffling, noise and masks (fits are "
                      "deterministic given it) and of the sampled decision.")
    temperature: float = Field(default=0.1, gt=0, description="Softmax temperature turning utilities into "
                               "P(z|p); only sampled decisions and expected-value policies depend on it.")
    threads: int | None = Field(default=1, ge=1, description="torch CPU threads while fitting (restored "
                                "after; the models are tiny, so one thread is fastest); None: leave as is.")


class MiniLMEmbedder:
    """The default query embedder: sentence-transformers all-MiniLM-L6-v2 (offline package), via
    `haps.retrieval.DenseRetriever` (unit-norm rows, cached by text, loaded on first call).

    Args:
        model: sentence-transformers folder or hub name (default: `haps.retrieval.default_model_path`).
        device: torch device of the encoder.
        batch_size: texts per encoder batch.
    """

    def __init__(self, model: str | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        from haps.retrieval import DenseRetriever

        self._retriever = DenseRetriever(model=model, device=device, batch_size=batch_size)

    @property
    def model_id(self) -> str:
        return self._retriever.model_id

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self._retriever.encode(list(texts))  # (n, d)


def default_embedder_id() -> str:
    from haps.retrieval import DEFAULT_MODEL_PACKAGE

    return f"{DEFAULT_MODEL_PACKAGE}:all-MiniLM-L6-v2"


def embedder_id(embedder: Embedder) -> str:
    """What names ``embedder`` in a checkpoint: its ``model_id``, else its (qualified) name."""
    mid = getattr(embedder, "model_id", None)
    if isinstance(mid, str) and mid:
        return mid
    return getattr(embedder, "__qualname__", None) or type(embedder).__qualname__


def assignment_texts(space: AssignmentSpace, descriptions: Mapping[str, str] | None = None) -> list[str]:
    """One text per assignment (product order): ``teacher=m0 (its description), student=m1``; models
    without a description appear by name only. GraphRouter and IRT-Router embed these as the "LLM
    profile" of each assignment."""
    descriptions = descriptions or {}
    out = []
    for z in space.assignments():
        parts = []
        for role, model in space.to_names(z).items():
            d = (descriptions.get(model) or "").strip()
            parts.append(f"{role}={model}" + (f" ({d})" if d else ""))
        out.append(", ".join(parts))
    return out


def nan_minmax(t: torch.Tensor) -> tuple[float, float]:
    """(min, max) over the non-NaN entries of ``t`` (0, 1 when there are none)."""
    v = t[~torch.isnan(t)]
    if v.numel() == 0:
        return 0.0, 1.0
    return float(v.min()), float(v.max())


def minmax_normalise(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """(t - lo) / (hi - lo), clamped to [0, 1]; all zeros when hi == lo (NaN stays NaN)."""
    if hi <= lo:
        return torch.where(torch.isnan(t), t, torch.zeros_like(t))
    return ((t - lo) / (hi - lo)).clamp(0.0, 1.0)


@dataclass
class FitData:
    """What a baseline is fitted on; built by `BaselineRouter.fit`.

    Attributes:
        table: the train split (P problems x A assignments; NaN where (p, z) was not collected).
        texts: P problem texts, aligned with ``table.problem_ids``.
        tasks: P task texts (the workflow name), aligned likewise.
        emb: (P, d) query embeddings of ``texts``, or None for routers that need none.
        valid: the validation split, or None.
        descriptions: A assignment texts (`assignment_texts`).
    """

    table: Any
    texts: list[str]
    tasks: list[str]
    emb: torch.Tensor | None
    valid: Any
    descriptions: list[str]


class BaselineRouter(Router):
    """A router fitted on action-level data; subclasses implement ``_fit``, ``_utility`` and the
    ``_state`` / ``_restore`` pair of their checkpoint.

    Trained state every baseline has: ``assignment_cost`` (A,), the mean train cost of each assignment
    (NaN-free; never-collected assignments get the largest cost), used for cost orders and cost terms.
    """

    config_cls: ClassVar[type[BaselineConfig]] = BaselineConfig
    needs_embeddings: ClassVar[bool] = True

    def __init__(self, space: AssignmentSpace, config: BaselineConfig | None = None, *,
                 embedder: Embedder | None = None) -> None:
        config = config if config is not None else self.config_cls()
        if not isinstance(config, self.config_cls):
            raise ConfigError(f"router {self.name!r} takes a {self.config_cls.__name__}, got "
                              f"{type(config).__name__}.")
        super().__init__(space, max_enumerate=max(64, space.size), seed=config.seed)
        self.config = config
        self._embedder = embedder
        self.emb_dim: int | None = None
        self.assignment_cost = torch.zeros(space.size, dtype=torch.float64)
        self.fitted = False

    # ---------------------------------------------------------------- embeddings
    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = MiniLMEmbedder()
        return self._embedder

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, d) float32 embeddings of ``texts``; d must match the one the router was fitted with."""
        texts = list(texts)
        e = torch.as_tensor(self.embedder(texts)).detach().to("cpu", torch.float32)
        if e.ndim != 2 or e.shape[0] != len(texts):
            raise ShapeError(f"the embedder returned shape {tuple(e.shape)} for {len(texts)} texts; it must "
                             "return (n, d).")
        if self.emb_dim is not None and e.shape[1] != self.emb_dim:
            raise ShapeError(f"router {self.name!r} was fitted with {self.emb_dim}-dim embeddings, the embedder "
                             f"gives {e.shape[1]}; pass the embedder it was trained with.")
        return e

    @staticmethod
    def prompt_texts(prompts: Sequence[RoutingPrompt], key: str = "problem") -> list[str]:
        """``meta[key]`` of every prompt (``problem``: the problem text; ``task``: the workflow name)."""
        out = []
        for p in prompts:
            v = p.meta.get(key)
            if not isinstance(v, str):
                raise ConfigError(f"routing prompt {p.problem_id!r} has no meta[{key!r}]; build prompts with "
                                  "haps.routing.prompt.build_routing_prompt (it records the problem and task).")
            out.append(v)
        return out

    # ---------------------------------------------------------------- fitting
    def fit(self, table, texts: Mapping[str, str], *, valid=None, tasks: str | Mapping[str, str] = "",
            descriptions: Mapping[str, str] | None = None) -> BaselineRouter:
        """Fit on the train split ``table`` (an `ActionTable` over this router's space).

        Args:
            table: the train split's action table (P, A).
            texts: problem id -> problem text (``Workflow.problem_text``) for every problem of ``table``.
            valid: the validation split's action table (``best_static`` needs it; others ignore it).
            tasks: the task text of every problem, one string or problem id -> text; it must be what routing
                prompts carry as ``meta["task"]`` (the workflow name). Only GraphRouter reads it.
            descriptions: model name -> one-line description (the pool's), for assignment texts.

        Returns ``self``, fitted; deterministic given ``config.seed``.
        """
        if table.space != self.space:
            raise ConfigError(f"router {self.name!r} routes {self.space}; the table is over {table.space}.")
        missing = [p for p in table.problem_ids if p not in texts]
        if missing:
            raise DataError(f"no problem text for {len(missing)} problems of the table (first: {missing[:3]}); "
                            "pass texts for every problem of the train split.")
        ptexts = [texts[p] for p in table.problem_ids]
        ptasks = [tasks] * len(ptexts) if isinstance(tasks, str) else [tasks.get(p, "") for p in table.problem_ids]
        cost = torch.nanmean(table.cost.double(), dim=0)  # (A,)
        worst = float(cost[~torch.isnan(cost)].max()) if (~torch.isnan(cost)).any() else 0.0
        self.assignment_cost = torch.nan_to_num(cost, nan=worst)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            emb = self.embed(ptexts) if self.needs_embeddings else None
            if emb is not None:
                self.emb_dim = int(emb.shape[1])
            data = FitData(table=table, texts=ptexts, tasks=ptasks, emb=emb, valid=valid,
                           descriptions=assignment_texts(self.space, descriptions))
            with threads(self.config.threads):
                self._fit(data)
        self.fitted = True
        return self

    @abstractmethod
    def _fit(self, data: FitData) -> None:
        """Learn the router's parameters (called under a seeded, forked RNG)."""

    # ---------------------------------------------------------------- scoring
    def utility(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        """(B, A) float64 estimated utility of every assignment (product order) for each prompt."""
        self._check_fitted()
        if not prompts:
            return torch.zeros(0, self.space.size, dtype=torch.float64)
        with torch.no_grad():
            u = self._utility(prompts).double()
        if u.shape != (len(prompts), self.space.size):
            raise ShapeError(f"{self.name}._utility returned {tuple(u.shape)}, expected "
                             f"({len(prompts)}, {self.space.size}).")
        return u

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise ConfigError(f"router {self.name!r} is not fitted; call fit(...) or load a checkpoint.")

    @abstractmethod
    def _utility(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        """(B, A) utilities (no grad)."""

    def log_probs(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        """(B, A) log_softmax(utility / temperature): its arg max is the utility's arg max."""
        return torch.log_softmax(self.utility(prompts) / self.config.temperature, dim=-1)

    # ---------------------------------------------------------------- checkpoints
    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able extras) of the fitted router."""
        return {}, {}

    def _restore(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        """Inverse of ``_state`` (the config and space are already set)."""

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``router.json`` + ``weights.safetensors`` into folder ``path`` (created), atomically per file."""
        from safetensors.torch import save_file

        from haps.files import atomic_path, write_json_atomic

        if not self.fitted:
            raise ConfigError(f"router {self.name!r} is not fitted; fit it before save().")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors, extra = self._state()
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        tensors["assignment_cost"] = self.assignment_cost.contiguous()
        with atomic_path(path / WEIGHTS) as tmp:
            save_file(tensors, tmp, metadata={"format": CHECKPOINT_FORMAT, "router": self.name})
            digest = _sha256(tmp)
        info = {
            "format": CHECKPOINT_FORMAT, "router": self.name, "config": self.config.model_dump(),
            "roles": list(self.space.roles), "models": list(self.space.models),
            "embedder": ({"id": embedder_id(self.embedder), "dim": self.emb_dim}
                         if self.needs_embeddings else None),
            "weights_sha256": digest, "extra": extra,
        }
        write_json_atomic(path / INFO, info)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, embedder: Embedder | None = None) -> BaselineRouter:
        """Restore a router written by ``save`` (same class or a subclass of ``cls``).

        ``embedder``: the one it was fitted with; None means the default MiniLM, which must then be what
        the checkpoint records."""
        from safetensors.torch import load_file

        path = Path(path)
        info = read_info(path, cls.name or None)
        router_cls = ROUTERS[info["router"]]
        if not issubclass(router_cls, cls):
            raise ConfigError(f"{str(path)!r} holds a {info['router']!r} router, not a {cls.__name__}.")
        space = AssignmentSpace.of(info["roles"], info["models"])
        emb_info = info.get("embedder")
        if emb_info and embedder is None and emb_info.get("id") != default_embedder_id():
            raise ConfigError(f"{str(path)!r} was fitted with embedder {emb_info.get('id')!r}; pass embedder=<that "
                              "callable> when loading it.")
        router = router_cls(space, router_cls.config_cls.model_validate(info["config"]), embedder=embedder)
        weights = path / WEIGHTS
        if not weights.exists() or _sha256(weights) != info.get("weights_sha256"):
            raise ConfigError(f"{str(weights)!r} is missing or is not the file {INFO} was saved with; save the "
                              "router again.")
        tensors = load_file(str(weights))
        router.assignment_cost = tensors.pop("assignment_cost").double()
        router.emb_dim = emb_info.get("dim") if emb_info else None
        router._restore(tensors, info.get("extra") or {})
        router.fitted = True
        return router

    @classmethod
    def from_spec(cls, arg: str, *, space: AssignmentSpace, embedder: Embedder | None = None,
                  **kwargs) -> BaselineRouter:
        """``<name>:<DIR>``: the router saved in folder DIR (it must route ``space``)."""
        if kwargs:
            raise ConfigError(f"router {cls.name!r}: unexpected options {sorted(kwargs)}; only embedder= is taken.")
        if not arg:
            raise ConfigError(f"router {cls.name!r} needs a checkpoint folder: {cls.name}:<DIR> (fit one and save it "
                              "with haps.baselines.train.fit_from_collection(...).save(DIR)).")
        router = cls.load(arg, embedder=embedder)
        if router.space != space:
            raise ConfigError(f"checkpoint {arg!r} routes roles {list(router.space.roles)} over models "
                              f"{list(router.space.models)}, not {list(space.roles)} over {list(space.models)}; "
                              "fit it on this collection.")
        return router


def read_info(path: Path, expected: str | None = None) -> dict[str, Any]:
    """The validated ``router.json`` of a baseline checkpoint folder (one-line ConfigErrors otherwise)."""
    name = expected or "baseline"
    fix = f"fit a {name} router and save it there (haps.baselines.train.fit_from_collection(...).save(DIR))"
    if not path.is_dir():
        raise ConfigError(f"{str(path)!r} is not a folder; {fix}.")
    p = path / INFO
    if not p.exists():
        raise ConfigError(f"{str(path)!r} is not a baseline router checkpoint (no {INFO}); {fix}.")
    try:
        info = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(p)!r} is not valid JSON ({e.__class__.__name__}); {fix}.") from e
    if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{str(p)!r} is not a {CHECKPOINT_FORMAT} checkpoint; {fix}.")
    router = info.get("router")
    if router not in ROUTERS:
        raise ConfigError(f"{str(p)!r} names unknown router {router!r}; known routers: {sorted(ROUTERS)}.")
    if expected is not None and router != expected:
        raise ConfigError(f"{str(path)!r} holds a {router!r} router, not {expected!r}; load it as {router}:{path}.")
    return info


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (None: unchanged), restoring the count after."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A shuffled epoch of index batches over range(n) (in order when ``generator`` is None)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[s:s + batch_size] for s in range(0, n, batch_size)]


def observed(table) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(problem index, assignment index, reward) of every collected (p, z) of ``table``, row-major."""
    have = ~torch.isnan(table.reward)
    p, z = have.nonzero(as_tuple=True)
    return p, z, table.reward[p, z].double()


def check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise DataError(f"{name} is {value}; the training data holds no usable values.")
