"""Baseline routers over assignments z (issue 14, paper Sec. 4 and App. C), each a registered router.

| name | module | paper |
| --- | --- | --- |
| ``knn`` | `haps.baselines.knn` | kNN over query embeddings (LLMRouterBench's strong simple baseline) |
| ``best_static`` | `haps.baselines.static` | the single assignment best on the validation split |
| ``routellm_mf`` | `haps.baselines.routellm_mf` | RouteLLM matrix factorisation (Ong et al. 2024) |
| ``routellm_clf`` | `haps.baselines.routellm_clf` | RouteLLM-style classifier on query embeddings |
| ``graphrouter`` | `haps.baselines.graphrouter` | GraphRouter (Feng et al., ICLR 2025) |
| ``irt`` | `haps.baselines.irt` | IRT-Router, MIRT variant (Song et al., ACL 2025) |

Random, every static assignment and the oracle are policies of `haps.evaluate` (and the ``fixed`` /
``random`` routers); they are not duplicated here.

Every baseline is fitted on the train split of an `haps.evaluate.ActionTable` plus the problems' texts
(`BaselineRouter.fit`), estimates a (B, A) utility per routing prompt (`BaselineRouter.utility`), and is
saved as safetensors + JSON (`BaselineRouter.save`); ``get_router("<name>:<DIR>", space=...)`` loads one.
`haps.baselines.train.fit_from_collection` fits one from a ``haps collect`` folder.
Importing this package imports nothing heavy; ``torch_geometric`` is imported when a GraphRouter is built.
"""

BASELINES = ("knn", "best_static", "routellm_mf", "routellm_clf", "graphrouter", "irt")
