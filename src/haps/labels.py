"""Short, readable labels for models, roles, assignments and evaluation methods (tables, plots, reports).

Labels are shortened, never truncated: a model keeps the fewest leading ``-``-separated parts of its
name that still tell it apart from every other model of the pool (so a size or ``-instruct`` suffix
goes whenever the rest is unique)::

    short_model_names(["smollm2-135m", "gemma3-270m"])       -> {"smollm2-135m": "smollm2", "gemma3-270m": "gemma3"}
    short_model_names(["llama-3.2-1b", "llama-3.1-8b"])      -> {"llama-3.2-1b": "llama-3.2", "llama-3.1-8b": "llama-3.1"}
    short_model_names(["qwen-7b", "qwen-14b"])               -> {"qwen-7b": "qwen-7b", "qwen-14b": "qwen-14b"}

Roles get their upper-case initial when the initials are unique (``teacher`` -> ``T``), else their name.
An assignment reads ``T=smollm2 S=gemma3`` (roles in workflow order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from haps.routing.space import AssignmentSpace

#: display names of the evaluation methods (`haps eval --methods`); others are shown as given
METHOD_LABELS: dict[str, str] = {
    "oracle": "oracle",
    "random": "random",
    "best_static": "best static",
    "knn": "kNN",
    "routellm_mf": "RouteLLM-MF",
    "routellm_clf": "RouteLLM-clf",
    "graphrouter": "GraphRouter",
    "irt": "IRT-Router",
    "sft": "SFT router",
    "haps": "HAPS",
    "haps-no-lora": "HAPS w/o LoRA",
}


def short_model_names(models: Sequence[str]) -> dict[str, str]:
    """name -> the shortest unique prefix of its ``-`` parts (at least one part); see the module docstring."""
    models = list(models)
    parts = {m: m.split("-") for m in models}
    out: dict[str, str] = {}
    for m in models:
        chosen = m
        for n in range(1, len(parts[m]) + 1):
            cand = "-".join(parts[m][:n])
            clash = [o for o in models if o != m and "-".join(parts[o][:n]) == cand]
            if not clash:
                chosen = cand
                break
        out[m] = chosen
    if len(set(out.values())) != len(out):  # cannot happen for distinct names; keep them whole if it does
        return {m: m for m in models}
    return out


def short_role_names(roles: Sequence[str]) -> dict[str, str]:
    """role -> its upper-case initial when all initials differ, else the role itself."""
    initials = [r[:1].upper() for r in roles]
    if len(set(initials)) == len(initials) and all(initials):
        return dict(zip(roles, initials, strict=True))
    return {r: r for r in roles}


class Labeler:
    """Labels of one assignment space (and of the methods evaluated on it)."""

    def __init__(self, space: AssignmentSpace) -> None:
        self.space = space
        self.models = short_model_names(space.models)
        self.roles = short_role_names(space.roles)

    def assignment(self, z: Sequence[int] | Mapping[str, str] | str) -> str:
        """``T=smollm2 S=gemma3`` for an assignment given as ids, ``{role: model}`` or its key."""
        if isinstance(z, str):
            z = self.space.from_key(z)
        names = self.space.to_names(self.space.from_names(z) if isinstance(z, Mapping) else z)
        return " ".join(f"{self.roles[r]}={self.models[names[r]]}" for r in self.space.roles)

    def method(self, name: str) -> str:
        """Display label of an evaluation method name (``static:<key>`` -> the assignment's label)."""
        kind, _, arg = name.partition(":")
        if kind == "static" and arg:
            try:
                return self.assignment(arg)
            except Exception:  # a key from another space: show it as given
                return arg
        base = METHOD_LABELS.get(kind, kind)
        return f"{base} ({arg})" if arg else base

    def legend(self) -> str:
        """``T = teacher, S = student; smollm2 = smollm2-135m, ...`` (only the shortened ones)."""
        roles = [f"{s} = {r}" for r, s in self.roles.items() if s != r]
        models = [f"{s} = {m}" for m, s in self.models.items() if s != m]
        return "; ".join(p for p in (", ".join(roles), ", ".join(models)) if p)


def key_labels(keys: Sequence[str]) -> dict[str, str]:
    """Assignment keys (``teacher=smollm2-135m,student=gemma3-270m``) -> ``T=smollm2 S=gemma3``, shortened over
    the roles and models the keys name (for tables that have the keys but not the space)."""
    pairs = {k: [p.split("=", 1) for p in k.split(",") if "=" in p] for k in keys}
    roles = list(dict.fromkeys(r for ps in pairs.values() for r, _ in ps))
    models = list(dict.fromkeys(m for ps in pairs.values() for _, m in ps))
    if not roles or not models:
        return {k: k for k in keys}
    short_r, short_m = short_role_names(roles), short_model_names(models)
    return {k: " ".join(f"{short_r[r]}={short_m[m]}" for r, m in ps) or k for k, ps in pairs.items()}
