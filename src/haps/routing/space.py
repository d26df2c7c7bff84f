"""The routing action space: assignments z of K pool models to N workflow roles.

An assignment is a tuple of model ids ``z = (z_0, ..., z_{N-1})``, one per role in the workflow's role
order; model ids are positions in the pool (the order of ``PoolConfig.models``). The space enumerates
all K^N assignments in ``itertools.product`` order (the last role varies fastest), which is the order
used everywhere: action-level data, router scores, lookup tables.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from haps.errors import ConfigError

Assignment = tuple[int, ...]


@dataclass(frozen=True)
class AssignmentSpace:
    """All assignments of ``models`` (names, pool order) to ``roles`` (workflow order)."""

    roles: tuple[str, ...]
    models: tuple[str, ...]
    _index: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.roles:
            raise ConfigError("an assignment space needs at least one role.")
        if not self.models:
            raise ConfigError("an assignment space needs at least one model.")
        for what, xs in (("role", self.roles), ("model", self.models)):
            dup = sorted({x for x in xs if xs.count(x) > 1})
            if dup:
                raise ConfigError(f"{what} names must be unique; repeated: {dup}.")

    @classmethod
    def of(cls, roles: Sequence[str], models: Sequence[str]) -> AssignmentSpace:
        return cls(tuple(roles), tuple(models))

    @property
    def size(self) -> int:
        """K^N."""
        return len(self.models) ** len(self.roles)

    def assignments(self) -> list[Assignment]:
        """Every assignment, in product order (only call when ``size`` is small enough to enumerate)."""
        return list(itertools.product(range(len(self.models)), repeat=len(self.roles)))

    def index(self, z: Sequence[int]) -> int:
        """Position of ``z`` in product order (mixed-radix number, first role most significant)."""
        z = self.check(z)
        k = len(self.models)
        i = 0
        for zi in z:
            i = i * k + zi
        return i

    def at(self, i: int) -> Assignment:
        """Inverse of ``index``."""
        if not 0 <= i < self.size:
            raise ConfigError(f"assignment index {i} out of range [0, {self.size}).")
        k = len(self.models)
        out = []
        for _ in self.roles:
            out.append(i % k)
            i //= k
        return tuple(reversed(out))

    def check(self, z: Sequence[int]) -> Assignment:
        z = tuple(int(v) for v in z)
        if len(z) != len(self.roles):
            raise ConfigError(f"assignment {z} has {len(z)} entries; the roles are {list(self.roles)}.")
        bad = [v for v in z if not 0 <= v < len(self.models)]
        if bad:
            raise ConfigError(f"assignment {z}: model ids must be in [0, {len(self.models)}); got {bad}.")
        return z

    def to_names(self, z: Sequence[int]) -> dict[str, str]:
        """``{role: model name}``."""
        z = self.check(z)
        return {r: self.models[i] for r, i in zip(self.roles, z, strict=False)}

    def from_names(self, assignment: Mapping[str, str]) -> Assignment:
        """Inverse of ``to_names``; raises on unknown roles or models."""
        if set(assignment) != set(self.roles):
            raise ConfigError(f"assignment {dict(assignment)} must name exactly the roles {list(self.roles)}.")
        out = []
        for r in self.roles:
            m = assignment[r]
            if m not in self.models:
                raise ConfigError(f"assignment {dict(assignment)}: unknown model {m!r}; the pool has {list(self.models)}.")
            out.append(self.models.index(m))
        return tuple(out)

    def key(self, z: Sequence[int] | Mapping[str, str]) -> str:
        """Canonical text key of an assignment: ``teacher=smollm2-135m,student=gemma3-270m``."""
        names = self.to_names(z) if not isinstance(z, Mapping) else self.to_names(self.from_names(z))
        return ",".join(f"{r}={names[r]}" for r in self.roles)

    def from_key(self, key: str) -> Assignment:
        """Inverse of ``key`` (any role order); see `parse_assignment` for the errors."""
        return self.from_names(parse_assignment(key, self.roles, self.models))


def parse_assignment(text: str, roles: Sequence[str], models: Sequence[str], *,
                     what: str = "assignment") -> dict[str, str]:
    """The one parser of assignment text: ``"teacher=m0,student=m1"`` -> ``{"teacher": "m0", "student": "m1"}``
    (keys in ``roles`` order). Every role exactly once, every model one of ``models``; anything else
    raises ConfigError naming ``what`` (e.g. ``"--assign"``), the problem and the fix: a malformed pair,
    an unknown or repeated role, an unknown model, or the missing roles."""
    example = ",".join(f"{r}={models[min(i, len(models) - 1)]}" for i, r in enumerate(roles)) if models else ""
    got: dict[str, str] = {}
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        role, sep, model = (s.strip() for s in part.partition("="))
        if not sep or not role or not model:
            raise ConfigError(f"{what}: expected ROLE=MODEL pairs separated by commas, got {part!r} "
                              f"(e.g. {example}).")
        if role not in roles:
            raise ConfigError(f"{what}: unknown role {role!r}; the roles are {list(roles)}.")
        if role in got:
            raise ConfigError(f"{what}: role {role!r} is assigned twice; give each role once (e.g. {example}).")
        if model not in models:
            raise ConfigError(f"{what}: unknown model {model!r} for role {role!r}; the pool has {list(models)}.")
        got[role] = model
    missing = [r for r in roles if r not in got]
    if missing:
        raise ConfigError(f"{what}: no model for role(s) {missing}; give one per role (e.g. {example}).")
    return {r: got[r] for r in roles}
