"""Router interface and registry, plus the two simplest routers (`fixed`, `random`).

A router scores: it implements one method, ``log_probs(prompts) -> (B, A)``, the log-probability of
every assignment of the space (product order) for each routing prompt. The base class decides:
``route`` takes the arg max (ties -> lowest index) or samples, per the router's ``decision``. Routers
are built by name from this registry (`haps.routers.get_router`, which loads the built-in ones first:
``get_router("fixed:teacher=a,student=b", space=...)`` passes the text after the colon to the class's
``from_spec``; unknown names raise an error listing the known ones).

Spaces larger than ``max_enumerate`` assignments cannot be scored in full: ``route`` then calls
``route_factorised`` (role by role), which a router implements if it can.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch

from haps.errors import ConfigError
from haps.registry import class_registrar
from haps.routing.prompt import RoutingPrompt
from haps.routing.space import Assignment, AssignmentSpace

Decision = Literal["argmax", "sample"]

ROUTERS: dict[str, type[Router]] = {}


#: Class decorator: ``@register_router(name)`` makes a class available by name.
register_router = class_registrar(ROUTERS, "router")


class Router(ABC):
    """Scores every assignment of ``space`` for a routing prompt; the base class decides."""

    name: ClassVar[str] = ""
    decision: ClassVar[Decision] = "argmax"

    def __init__(self, space: AssignmentSpace, *, max_enumerate: int = 64, seed: int = 0) -> None:
        if max_enumerate < 1:
            raise ConfigError(f"max_enumerate must be >= 1, got {max_enumerate}.")
        self.space = space
        self.max_enumerate = max_enumerate
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_spec(cls, arg: str, *, space: AssignmentSpace, **kwargs) -> Router:
        if arg:
            raise ConfigError(f"router {cls.name!r} takes no argument, got {arg!r}.")
        return cls(space, **kwargs)

    @property
    def enumerable(self) -> bool:
        return self.space.size <= self.max_enumerate

    @abstractmethod
    def log_probs(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        """(B, A) log P(z | p) over ``space.assignments()`` (rows sum to 1 after exp)."""

    def probs(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        with torch.no_grad():
            return self.log_probs(prompts).exp()

    def route(self, prompts: Sequence[RoutingPrompt], decision: Decision | None = None) -> list[Assignment]:
        """One valid assignment per prompt."""
        decision = decision or self.decision
        if not prompts:
            return []
        if not self.enumerable:
            return self.route_factorised(prompts, decision)
        with torch.no_grad():
            lp = self.log_probs(prompts).float()  # (B, A)
        if decision == "argmax":
            idx = lp.argmax(dim=-1)  # first maximum on ties
        else:
            idx = torch.multinomial(lp.exp().cpu(), 1, generator=self.generator).squeeze(1)
        return [self.space.at(int(i)) for i in idx]

    def route_factorised(self, prompts: Sequence[RoutingPrompt], decision: Decision) -> list[Assignment]:
        raise ConfigError(
            f"router {self.name!r}: the space has {self.space.size} assignments, more than max_enumerate="
            f"{self.max_enumerate}, and this router cannot decide role by role; raise max_enumerate."
        )


@register_router("fixed")
class FixedRouter(Router):
    """Always the same assignment. Spec: ``fixed:<role>=<model>,...`` or ``fixed:<id>,<id>,...``."""

    def __init__(self, space: AssignmentSpace, assignment: Sequence[int], **kwargs) -> None:
        super().__init__(space, **kwargs)
        self.assignment = space.check(assignment)

    @classmethod
    def from_spec(cls, arg: str, *, space: AssignmentSpace, **kwargs) -> FixedRouter:
        if not arg:
            raise ConfigError(
                "router 'fixed' needs an assignment, e.g. fixed:" + space.key(space.at(0)) + " or fixed:"
                + ",".join("0" for _ in space.roles) + "."
            )
        if "=" in arg:
            z = space.from_key(arg)
        else:
            try:
                z = tuple(int(v) for v in arg.split(","))
            except ValueError as e:
                raise ConfigError(f"fixed router: {arg!r} is neither role=model pairs nor model ids.") from e
        return cls(space, z, **kwargs)

    def log_probs(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        lp = torch.full((len(prompts), self.space.size), -math.inf)
        lp[:, self.space.index(self.assignment)] = 0.0
        return lp

    def route_factorised(self, prompts, decision) -> list[Assignment]:
        return [self.assignment for _ in prompts]


@register_router("random")
class RandomRouter(Router):
    """Uniform over all assignments; decides by sampling (seeded)."""

    decision: ClassVar[Decision] = "sample"

    def log_probs(self, prompts: Sequence[RoutingPrompt]) -> torch.Tensor:
        return torch.full((len(prompts), self.space.size), -math.log(self.space.size))

    def route_factorised(self, prompts, decision) -> list[Assignment]:
        k = len(self.space.models)
        ids = torch.randint(0, k, (len(prompts), len(self.space.roles)), generator=self.generator)
        return [tuple(int(v) for v in row) for row in ids]
