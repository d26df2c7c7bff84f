"""Multi-agent workflows (Teacher/Student systems of the paper), the tasks they own, and the lockstep
episode runner. `load_workflow_class` finds a workflow by name, plugin or ``path/to/file.py:ClassName``."""

from haps.workflows.base import (
    WORKFLOWS,
    EpisodeResult,
    EpisodeState,
    PendingCall,
    Turn,
    Workflow,
    register_workflow,
)
from haps.workflows.loader import (
    ENTRY_POINT_GROUP,
    canonical_spec,
    get_workflow,
    load_workflow_class,
    workflow_names,
)
from haps.workflows.runner import EpisodeJob, RunStats, Sampling, run_episodes, summarize

__all__ = [
    "ENTRY_POINT_GROUP", "WORKFLOWS", "EpisodeJob", "EpisodeResult", "EpisodeState", "PendingCall", "RunStats",
    "Sampling", "Turn", "Workflow", "canonical_spec", "get_workflow", "load_workflow_class", "register_workflow",
    "run_episodes", "summarize", "workflow_names",
]
