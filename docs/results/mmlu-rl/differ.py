"""How often the generated adapters change what the models write: episode logs of the same problems and
routing with and without adapters (`haps infer` and `haps infer --no-adapters`, or `haps rl`'s test episodes).

    python docs/results/mmlu-rl/differ.py WITH.jsonl WITHOUT.jsonl

Per model: calls compared, calls whose output text differs, and the first differing token position
(median); per episode: predictions that differ.
"""

from __future__ import annotations

import json
import statistics
import sys


def read(path: str) -> dict[str, dict]:
    return {e["id"]: e for e in (json.loads(x) for x in open(path) if x.strip())}


def main(with_path: str, without_path: str) -> dict:
    a, b = read(with_path), read(without_path)
    ids = sorted(set(a) & set(b))
    per_model: dict[str, dict] = {}
    preds = 0
    for i in ids:
        ea, eb = a[i], b[i]
        preds += ea.get("prediction") != eb.get("prediction")
        for ta, tb in zip(ea["turns"], eb["turns"], strict=False):
            if (ta["role"], ta.get("round"), ta.get("kind")) != (tb["role"], tb.get("round"), tb.get("kind")):
                break  # the episodes took different paths from here
            m = per_model.setdefault(ta["model"], {"calls": 0, "differ": 0, "first_diff_chars": []})
            m["calls"] += 1
            if ta["output"] != tb["output"]:
                m["differ"] += 1
                k = next((j for j, (x, y) in enumerate(zip(ta["output"], tb["output"])) if x != y),
                         min(len(ta["output"]), len(tb["output"])))
                m["first_diff_chars"].append(k)
            if ta["output"] != tb["output"]:
                break  # later calls see different inputs
    out = {"problems": len(ids), "predictions_differ": preds,
           "per_model": {m: {"calls": v["calls"], "differ": v["differ"],
                             "median_first_diff_char": statistics.median(v["first_diff_chars"])
                             if v["first_diff_chars"] else None} for m, v in per_model.items()}}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
