"""How much prefix reuse saves (report section "Evaluation", Table 6 scoring): the same multiple-choice
requests scored by the engine (few-shot prefix once per run, each context once, continuations on
copied rows, batched) and by scoring every (prefix + context + choice) alone from position 0.

Usage: python bench/eval_prefix_reuse.py OUT.json [--runs hellaswag:0:8,arc_challenge:5:4] [--dtype bfloat16]
Both paths give the same log-likelihoods (checked here too, and in tests/test_eval_engine.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import opengemma
from opengemma.eval.engine import Scorer
from opengemma.eval.runner import build_mc_requests
from opengemma.eval.tasks import get_task
from opengemma.eval.tasks.base import DataSource


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--runs", default="hellaswag:0:8,arc_challenge:5:4")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "benchmarks"))
    args = ap.parse_args()
    g = opengemma.load(dtype=args.dtype, device="cpu")
    src = DataSource(args.data_dir)
    rows = []
    for spec in args.runs.split(","):
        name, shots, n = spec.split(":")
        task = get_task(name)
        docs, pool, _ = task.load(src)
        reqs, _ = build_mc_requests(task, docs[:int(n)], pool, int(shots), g.tokenizer)
        scorer = Scorer(g.model, batch_size=args.batch_size)
        t = time.monotonic()
        fast = scorer.score(reqs)
        t_fast = time.monotonic() - t
        t = time.monotonic()
        slow = scorer.score_naive(reqs)
        t_slow = time.monotonic() - t
        diff = max(abs(a[0] - b[0]) for x, y in zip(fast, slow) for a, b in zip(x, y))
        tokens_naive = sum(len(r.prefix) + len(c) + len(t) for r in reqs for c, t in r.pairs)
        row = {"task": name, "shots": int(shots), "items": int(n), "choices": sum(len(r.pairs) for r in reqs),
               "naive_tokens": tokens_naive, "reuse_s": round(t_fast, 2), "naive_s": round(t_slow, 2),
               "speedup": round(t_slow / t_fast, 2), "max_abs_loglik_diff": diff}
        rows.append(row)
        print(row, flush=True)
    Path(args.out).write_text(json.dumps({"model": "embedded gemma3-270m", "dtype": args.dtype, "device": "cpu",
                                          "threads": torch.get_num_threads(), "machine": platform.platform(),
                                          "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
