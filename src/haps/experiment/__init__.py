"""`haps experiment`: the paper's chain for one config, resumable stage by stage.

Per task and setting (a pool)::

    collect     every assignment of every problem            OUT/runs/<task>/<setting>/actions/
    warmup      the SFT warm-up set and its statistics       OUT/runs/<task>/<setting>/warmup.json
    sft         the high-level router                        OUT/runs/<task>/<setting>/sft/
    rl/<v>      joint RL, one run per HAPS variant v         OUT/runs/<task>/<setting>/rl/<v>/   (best/: the router)
    baselines   every baseline fitted on the train split     OUT/runs/<task>/<setting>/baselines/<name>/
    eval/main   all methods on the test split                OUT/results/<task>/<setting>/summary.json
    eval/<v>    variant v's HAPS (tradeoff: every method)    OUT/results/<task>/<setting>/<folder>/summary.json
    report      `haps report` over OUT/results               OUT/report/report.html

``OUT/results`` is `haps report`'s layout (`haps.report`); the variants and their folders are in
`haps.experiment.config.Variant`. ``OUT/stages.json`` records each stage's fingerprint and when it finished;
``OUT/pools/<setting>.yaml`` is the pool every stage of a setting reads (the profile's prices and the closed
models applied); ``OUT/experiment.json`` the last run's config and command line.

Resuming (`haps.experiment.plan`): a stage is skipped when it finished with the same fingerprint and its
output exists; a partial collection or RL run resumes where it stopped (both are resumable after SIGKILL);
a partial warm-up, SFT, eval or report starts again; fitted baselines are kept. A stage whose config or
inputs changed runs again (an RL run from scratch); a collection made with other settings is an error, never
thrown away. The stage table printed at the start says which stages are done, partial or to do, the work
left and an estimate of the time (how it is estimated: `haps.experiment.plan`).

Mixed settings (``closed:`` models, `haps.experiment.closed`): the experiment starts `haps serve` for the
closed models on 127.0.0.1 at a free port when a stage first needs them, rewrites the setting's pool file
with that port, and stops the server at the end (or when it dies: the server gets SIGTERM with its parent).
"""

from haps.experiment.config import ExperimentConfig, SettingConfig, Variant
from haps.experiment.run import ExperimentResult, load_experiment_config, plan_experiment, run_experiment

__all__ = ["ExperimentConfig", "ExperimentResult", "SettingConfig", "Variant", "load_experiment_config",
           "plan_experiment", "run_experiment"]
