"""Multi-agent workflows (Teacher/Student systems of the paper) and the lockstep episode runner."""

from haps.workflows.base import (
    WORKFLOWS,
    EpisodeResult,
    EpisodeState,
    PendingCall,
    Turn,
    Workflow,
    get_workflow,
    register_workflow,
    workflow_names,
)
from haps.workflows.runner import EpisodeJob, RunStats, Sampling, run_episodes, summarize

__all__ = [
    "WORKFLOWS", "EpisodeJob", "EpisodeResult", "EpisodeState", "PendingCall", "RunStats", "Sampling", "Turn",
    "Workflow", "get_workflow", "register_workflow", "run_episodes", "summarize", "workflow_names",
]
