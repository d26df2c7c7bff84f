"""The four-part routing prompt (paper Sec. 3.1, Figures 12-14), built from a workflow and a pool.

The prompt has (1) the role definitions, (2) the task description, (3) the problem, (4) the candidate
models with integer ids (pool order) and one-line descriptions. The system prompt demands a single JSON
object ``{"<role_0>": <id>, "<role_1>": <id>, ...}`` whose keys are the workflow's roles, in role order.
Nothing here names a model, a task or a role: all of it comes from the workflow and the pool.

``assignment_json`` writes the canonical answer string the router is trained on and scored with;
``parse_assignment_json`` reads a free-form answer back and returns None (never a default) when it is not a
valid assignment.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from haps.routing.space import Assignment, AssignmentSpace

SYSTEM_TEMPLATE = (
    "You are a router that must output only a single JSON object that matches the schema\n"
    "{schema}.\n"
    "The integers must be valid model IDs listed in the prompt.\n"
    "No explanation, no extra text. If unsure, still output a valid JSON object."
)

USER_TEMPLATE = (
    "Dataset Background\n\n{task}\n\n"
    "{roles}"
    "Specific Question\n\n{problem}\n\n"
    "Candidates\n\n{candidates}\n\n"
    "Task\n\nAssign a model to each agent to maximize performance.\n\n"
    "Return exactly one JSON object on a single line:\n\n{schema}\n\n"
    "where <id> is an integer, {id_range}. Do not include any extra text."
)


@dataclass(frozen=True)
class RoutingPrompt:
    """One routing query: the chat messages the router sees plus what it needs to decode the answer."""

    problem_id: str
    system: str
    user: str
    space: AssignmentSpace
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user}]

    @property
    def text(self) -> str:
        return f"{self.system}\n\n{self.user}"


def _pool_models(pool) -> list:
    """ModelSpecs of a PoolConfig, a ModelPool, or a plain list of specs."""
    cfg = getattr(pool, "config", pool)
    return list(getattr(cfg, "models", cfg))


def space_for(workflow, pool) -> AssignmentSpace:
    return AssignmentSpace.of(workflow.roles, [m.name for m in _pool_models(pool)])


def schema_text(roles: Sequence[str]) -> str:
    return "{ " + ", ".join(f'"{r}": <id>' for r in roles) + " }"


def _title(role: str) -> str:
    return role.replace("_", " ").title()


def candidates_text(pool) -> str:
    lines = []
    for i, m in enumerate(_pool_models(pool)):
        desc = getattr(m, "description", "") or ""
        lines.append(f"{i}: {m.name}" + (f" - {desc}" if desc else ""))
    return "\n".join(lines)


def id_range_text(k: int) -> str:
    if k == 1:
        return "0"
    if k == 2:
        return "0 or 1"
    return f"from 0 to {k - 1}"


def build_system_prompt(roles: Sequence[str]) -> str:
    return SYSTEM_TEMPLATE.format(schema=schema_text(roles))


def build_user_prompt(workflow, pool, problem) -> str:
    defs: Mapping[str, str] = workflow.role_definitions
    missing = [r for r in workflow.roles if r not in defs]
    if missing:
        from haps.errors import ConfigError

        raise ConfigError(f"workflow {getattr(workflow, 'name', '?')!r} has no role definition for {missing}.")
    roles = "".join(f"{_title(r)} Agent Introduction\n\n{defs[r].strip()}\n\n" for r in defs)
    return USER_TEMPLATE.format(
        task=workflow.task_description.strip(), roles=roles, problem=workflow.problem_text(problem).strip(),
        candidates=candidates_text(pool), schema=schema_text(workflow.roles),
        id_range=id_range_text(len(_pool_models(pool))),
    )


def build_routing_prompt(workflow, pool, problem) -> RoutingPrompt:
    """The routing prompt for one problem (``problem.id`` becomes ``problem_id``); ``meta`` records the
    problem text and the workflow name for routers that embed them (the baselines)."""
    return RoutingPrompt(
        problem_id=str(problem.id), system=build_system_prompt(workflow.roles),
        user=build_user_prompt(workflow, pool, problem), space=space_for(workflow, pool),
        meta={"problem": workflow.problem_text(problem), "task": getattr(workflow, "name", "")},
    )


def assignment_json(assignment_ids: Sequence[int] | Mapping[str, int], roles: Sequence[str]) -> str:
    """Canonical answer string: ``{"teacher": 0, "student": 1}`` (keys in role order, one space after
    each separator). ``assignment_ids`` is a sequence in role order or a ``{role: id}`` mapping."""
    if isinstance(assignment_ids, Mapping):
        ids = [int(assignment_ids[r]) for r in roles]
    else:
        ids = [int(v) for v in assignment_ids]
        if len(ids) != len(roles):
            from haps.errors import ConfigError

            raise ConfigError(f"assignment {ids} has {len(ids)} ids for roles {list(roles)}.")
    return json.dumps(dict(zip(roles, ids, strict=False)))


_OBJ = re.compile(r"\{[^{}]*\}")


def parse_assignment_json(text: str, space: AssignmentSpace) -> Assignment | None:
    """The first JSON object in ``text`` that is a valid assignment, else None.

    Valid: exactly the space's roles as keys, each an integer (not bool, not a string) in range.
    """
    for m in _OBJ.finditer(text):
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or set(obj) != set(space.roles):
            continue
        vals = [obj[r] for r in space.roles]
        if all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(space.models) for v in vals):
            return tuple(vals)
    return None
