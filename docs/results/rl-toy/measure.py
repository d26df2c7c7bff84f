"""Planted-signal RL on the tiny random models: token_norm (sum | mean) x init (zero_update | xavier) x seeds.

The toy world of tests/rl_toy.py: score = 0.5 [teacher on tiny-gemma3] + 0.5 * share of the Student's tokens
in a planted half of its model's vocabulary (one embedding direction an adapter can learn). Per run: P(good
teacher | p) and the planted-token mass of each student model under its generated adapter, before and after
20 updates of 4 problems, and the mean reward of the first and last 4 updates.

    OMP_NUM_THREADS=1 python docs/results/rl-toy/measure.py docs/results/rl-toy/results.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests"))

from transformers import AutoTokenizer  # noqa: E402

import conftest  # noqa: E402
import test_rl  # noqa: E402
from haps.config import load_pool  # noqa: E402
from haps.models.sources import resolve  # noqa: E402
from haps.routing.low_level import LowLevelConfig  # noqa: E402


def main(out: str) -> None:
    tok = AutoTokenizer.from_pretrained(resolve(load_pool("tiny").get("smollm2-135m")).path)
    llama, gemma = conftest.build_tiny_llama(tok), conftest.build_tiny_gemma3(tok)
    rows = []
    for norm in ("sum", "mean"):
        for init in ("zero_update", "xavier"):
            for seed in (0, 1, 2):
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    rec = test_rl._recipe(Path(tmp), tok, llama, gemma, n=40, epochs=2, baseline="mean",
                                          token_norm=norm, max_new_tokens=6, seed=seed,
                                          low_level_config=LowLevelConfig(init=init))
                    good = rec.router.space.models.index(test_rl.GOOD_TEACHER)
                    probe = rec.data.train[:8]
                    before = test_rl._probe(rec, probe, good)
                    recs = [rec.step(k) for k in range(20)]
                    after = test_rl._probe(rec, probe, good)
                    rows.append({"token_norm": norm, "init": init, "seed": seed, "before": before, "after": after,
                                 "reward_first4": sum(r.reward_mean for r in recs[:4]) / 4,
                                 "reward_last4": sum(r.reward_mean for r in recs[-4:]) / 4,
                                 "seconds": time.perf_counter() - t0})
                    print(json.dumps(rows[-1]), flush=True)
    Path(out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
