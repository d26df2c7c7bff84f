"""Finding a workflow class from a spec: a registered name, an installed plugin, or a Python file.

    load_workflow_class("mmlu")                                  # built-in (registered) name
    load_workflow_class("arith")                                 # entry point of group "haps.workflows"
    load_workflow_class("examples/custom_workflow.py:ArithmeticWorkflow")   # a class in a file

Every command that takes ``--task/--workflow`` (run, collect, sft, eval-lookup, route, demo, the
benchmarks) resolves it here, and so does `haps.data.load_problems`. A class loaded from a file or an
entry point is registered under its ``name``, so within one process the name works too; configs and
manifests record `canonical_spec` (file specs with an absolute path) so that a later process finds the
same class.

A plugin package declares, in its pyproject.toml::

    [project.entry-points."haps.workflows"]
    arith = "my_package.workflows:ArithmeticWorkflow"
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path

from haps.errors import ConfigError
from haps.workflows.base import WORKFLOWS, Workflow, register_workflow

ENTRY_POINT_GROUP = "haps.workflows"


def is_file_spec(spec: str) -> bool:
    """``path/to/file.py:ClassName``."""
    path, sep, cls = spec.rpartition(":")
    return bool(sep) and path.endswith(".py") and bool(cls)


def canonical_spec(spec: str) -> str:
    """The spec as recorded in configs: names unchanged, a file spec with its absolute path."""
    spec = spec.strip()
    if not is_file_spec(spec):
        return spec
    path, _, cls = spec.rpartition(":")
    return f"{Path(path).expanduser().resolve()}:{cls}"


def _unknown(spec: str) -> ConfigError:
    plugins = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    extra = f" (installed plugins: {plugins})" if plugins else ""
    return ConfigError(f"unknown task or workflow {spec!r}; valid names: {sorted(WORKFLOWS)}{extra}, or a class in "
                       "a Python file as path/to/file.py:ClassName (see examples/custom_workflow.py).")


def _checked(cls: object, where: str) -> type[Workflow]:
    if not (inspect.isclass(cls) and issubclass(cls, Workflow)):
        raise ConfigError(f"{where} is not a haps.workflows.Workflow subclass; derive the class from Workflow.")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise ConfigError(f"{where} does not implement {missing}; define them (see haps.workflows.base.Workflow).")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where} has no name; set a class attribute, e.g. name = \"{cls.__name__.lower()}\".")
    if WORKFLOWS.get(name) is not cls:
        register_workflow(name)(cls)  # refuses a name taken by another class
    return cls


def _from_file(spec: str) -> type[Workflow]:
    path_text, _, cls_name = spec.rpartition(":")
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"workflow file {path_text!r} does not exist; give path/to/file.py:ClassName.")
    module_name = "haps_workflow_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ConfigError(f"workflow file {str(path)!r} cannot be imported as a Python module.")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look classes up by module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise ConfigError(f"workflow file {str(path)!r} failed to import: {type(e).__name__}: {e}. Fix the "
                              "file (run with --debug for the traceback).") from e
    cls = getattr(module, cls_name, None)
    if cls is None:
        found = sorted(n for n, v in vars(module).items()
                       if inspect.isclass(v) and issubclass(v, Workflow) and v is not Workflow)
        raise ConfigError(f"{str(path)!r} has no class {cls_name!r}; workflow classes there: {found}.")
    return _checked(cls, f"{cls_name} in {str(path)!r}")


def load_builtin_workflows() -> None:
    """Import the built-in workflow modules (importing them registers them)."""
    from haps.workflows import hotpotqa as _h  # noqa: F401
    from haps.workflows import mmlu as _m  # noqa: F401


def load_workflow_class(spec: str) -> type[Workflow]:
    """The workflow class ``spec`` names (see the module docstring); unknown specs raise ConfigError
    listing the valid names."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"a workflow spec must be a non-empty string, got {spec!r}.")
    spec = spec.strip()
    if is_file_spec(spec):
        return _from_file(spec)
    load_builtin_workflows()
    if spec in WORKFLOWS:
        return WORKFLOWS[spec]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == spec:
            try:
                cls = ep.load()
            except Exception as e:
                raise ConfigError(f"workflow plugin {spec!r} ({ep.value}) failed to load: {type(e).__name__}: "
                                  f"{e}. Reinstall or fix the plugin package.") from e
            return _checked(cls, f"workflow plugin {spec!r} ({ep.value})")
    raise _unknown(spec)


def workflow_names() -> list[str]:
    """Registered workflow names plus installed plugins (not yet loaded)."""
    load_builtin_workflows()
    return sorted(set(WORKFLOWS) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def get_workflow(spec: str, **options) -> Workflow:
    """The workflow ``spec`` names (a registered name, a plugin, or ``path/to/file.py:ClassName``) built with
    ``options`` (e.g. budget=3, top_k=1, summaries=True)."""
    return load_workflow_class(spec)(**options)
