"""`haps eval`: every routing method on the same test problems, with intervals and router metrics.

Modules:

| module | what |
| --- | --- |
| `haps.evaluation.config` | `EvalConfig`: what `haps eval` runs (the CLI builds it; YAML via ``--config``) |
| `haps.evaluation.outcomes` | `Outcomes`: r(p, z), score and cost of the test problems, looked up or played; `MethodRows`: one method's per-problem results |
| `haps.evaluation.methods` | method specs (``--methods``), their policies (fixed, oracle, random, baselines, SFT router) and HAPS through ``haps.infer.run_infer`` |
| `haps.evaluation.curves` | quality-vs-share and cost-quality curves (RouteLLM threshold sweeps, cost-penalty sweeps) |
| `haps.evaluation.summary` | per-method metrics (intervals, paired differences, PGR/APGR/CPT, AIQ, gap to the oracle) and the terminal tables |
| `haps.evaluation.run` | `run_eval`: the whole evaluation, writing ``per_problem.jsonl`` and ``summary.json`` |

Importing this package imports nothing heavy.
"""
