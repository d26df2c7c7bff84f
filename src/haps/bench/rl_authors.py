"""The authors' RL loop (HAPS `joint_rl/`), re-implemented on haps' models for `haps bench rl`.

Per training problem (one update each)::

    reload every pool model from disk                       # their code rebuilds the models per problem
    z = argmax P(z | p)  (no grad)                           # greedy routing, no routing term
    w_z = s_z(p)         (with grad)
    for each agent call, one at a time:
        for each token: one forward of the merged model W + alpha A B (KV cache, grad kept), sample (T, top-p)
    L = -r_hat * sum of every sampled token's log-prob (top-p renormalised); backward; AdamW step

The merged weight is haps' ``row_loop`` strategy (``W + alpha A_i B_i`` per row, F.linear), so the adapter's
gradient flows through the merged weight as in their code.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from haps.models.types import Generation


class TokenLoopPool:
    """A pool whose `generate` samples each request alone, token by token, with gradients kept."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.config = pool.config
        self.names = pool.names
        self.logprobs: list[torch.Tensor] = []  # every sampled token's log-prob (with grad), this episode

    def spec(self, name: str):
        return self.pool.spec(name)

    def generate(self, name: str, requests, seed: int | None = None) -> list[Generation]:
        gen = torch.Generator().manual_seed(seed if seed is not None else 0)
        return [self._one(self.pool.backend(name), r, gen) for r in requests]

    def _one(self, m, req, gen: torch.Generator) -> Generation:
        from haps.models.adapters import adapters_in_scope
        from haps.models.hf_compat import with_cache
        from haps.models.picking import nucleus
        from haps.models.rows import Row

        text, ids = m.encode(req)
        row = Row(text, ids)
        batch = None if req.adapter is None else dataclasses.replace(
            m.adapter_batch([req.adapter], self.config.lora), strategy="row_loop")  # the merged weight, per row
        from transformers import DynamicCache

        cache = DynamicCache(config=m.model.config)
        x = torch.tensor([ids])
        with torch.enable_grad(), adapters_in_scope(batch):
            while True:
                logits = m.model(input_ids=x, use_cache=True, **with_cache(m.model, cache)).logits[0, -1].float()
                scaled = logits / max(req.temperature, 1e-6)
                with torch.no_grad():
                    w, idx = nucleus(torch.softmax(scaled, -1)[None], torch.tensor([req.top_p]))
                    tok = int(idx[0, torch.multinomial(w[0], 1, generator=gen)])
                    kept = idx[0][w[0] > 0]
                lp = scaled[tok] - torch.logsumexp(scaled[kept], -1)
                self.logprobs.append(lp)
                if not m._append(req, row, tok, float(lp.detach())):
                    break
                x = torch.tensor([[tok]])
        return m._generation(req, row, None)


def bench_authors(cfg, rec) -> dict[str, Any]:
    """`authors_problems` updates of the authors' loop on ``rec``'s router, workflow and sampling settings."""
    from haps.config import cache_root, load_pool
    from haps.models.local import LocalModel
    from haps.models.pool import ModelPool
    from haps.routing.prompt import build_routing_prompt
    from haps.workflows import EpisodeJob, Sampling, run_episodes

    router, workflow = rec.router, rec.workflow
    optimizer = torch.optim.AdamW([{"params": router.parameters("backbone"), "lr": rec.cfg.lr_backbone},
                                   {"params": router.parameters("heads"), "lr": rec.cfg.lr_heads}])
    sampling = Sampling(temperature=rec.cfg.temperature, top_p=rec.cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    phases = {"reload": 0.0, "routing": 0.0, "episodes": 0.0, "backward": 0.0, "optimizer": 0.0}
    problems = rec.data.train[len(rec.data.train) - cfg.authors_problems:]
    tokens = 0
    for k, p in enumerate(problems):
        t = time.perf_counter()
        pc = load_pool(cfg.pool)
        pool = ModelPool(pc, backends={m.name: LocalModel.load(m, cache_root(pc)) for m in pc.models
                                       if m.backend == "local"})
        tl = TokenLoopPool(pool)
        t1 = time.perf_counter()
        prompt = build_routing_prompt(workflow, pc, p)
        with torch.no_grad():
            z = router.decide([prompt], "argmax", adapters=False)[0].assignment
        with torch.enable_grad():
            d = router.decide([prompt], "given", assignments=[z])[0]
        t2 = time.perf_counter()
        job = EpisodeJob(p, router.space.to_names(z), d.adapters)
        res = run_episodes(tl, workflow, [job], sampling=sampling, seed=k, progress=False, max_live=1)[0]
        t3 = time.perf_counter()
        reward = rec.cfg.reward.compute(res.score if res.score is not None else 0.0, res.cost, rec.normalizer)
        loss = -reward * torch.stack(tl.logprobs).sum()
        loss.backward()
        t4 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        tokens += res.tokens_out
        for name, a, b in (("reload", t, t1), ("routing", t1, t2), ("episodes", t2, t3), ("backward", t3, t4),
                           ("optimizer", t4, t5)):
            phases[name] += b - a
    total = sum(phases.values())
    n = len(problems)
    return {"updates": n, "problems": n, "seconds": total, "updates_per_hour": 3600 * n / total,
            "problems_per_hour": 3600 * n / total, "phase_seconds": phases, "tokens": tokens}
