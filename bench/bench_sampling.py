"""Sampling micro-benchmark: ``opengemma.sampling`` vs the full-vocabulary sort it replaced.

What it measures. For each setting (temperature only, top-k, top-p, both) and each shape -- [1, V]
(the server samples one sequence at a time, each with its own generator) and [16, V] (``generate``
samples a batch in one call) -- the median wall time of one call of

* **new** -- ``opengemma.sampling.sample_next_token`` (inverse CDF without a sort; top-p alone by
  rejection; top-k, then top-p, on ``torch.topk`` candidates);
* **sort** -- the previous implementation, kept below as the peer: one descending sort of all V
  logits per row, top-k and top-p as cuts in sorted order, an exponential race over all V entries;
* **argmax** -- what a greedy step costs for the same logits (the floor).

The three run in alternation, repetition by repetition, so other load on the machine touches all
alike. Printed: milliseconds per call, sort / new (the speed-up) and new / argmax. The logits are
the embedded Gemma 3 270M's (V = 262,144) along its own sampled continuations of a few prompts,
because the nucleus size, which sets the cost of top-p, depends on how peaked real distributions
are (``--random``: Gaussian logits instead, no model load).

    python bench/bench_sampling.py                  # embedded model's logits, ~1-2 minutes on 2 cores
    python bench/bench_sampling.py --random --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from opengemma.sampling import sample_next_token

SETTINGS = [
    ("T=1", dict(temperature=1.0)),
    ("T=1 top_k=50", dict(temperature=1.0, top_k=50)),
    ("T=1 top_p=0.95", dict(temperature=1.0, top_p=0.95)),
    ("T=1 top_k=50 top_p=0.95", dict(temperature=1.0, top_k=50, top_p=0.95)),
    ("T=0.7 top_p=0.9", dict(temperature=0.7, top_p=0.9)),
    ("T=1 top_p=0.99", dict(temperature=1.0, top_p=0.99)),
]
PROMPTS = [
    "The history of the lighthouse is, in many ways, the history of coastal trade. Ships that",
    "Once upon a time, in a village at the edge of a great forest, there lived",
    "def quicksort(items):\n    if len(items) <= 1:\n        return items\n",
    "The three primary colors are",
]


def sort_sample(logits: torch.Tensor, generator: torch.Generator, temperature: float, top_k: int | None = None,
                top_p: float | None = None) -> torch.Tensor:
    """The sampler before the candidate rewrite (scalar settings, T > 0): logits [B, V] -> ids [B]."""
    x, order = (logits.float() / temperature).sort(dim=-1, descending=True)  # [B, V] each
    if top_k:
        x[:, top_k:] = float("-inf")
    probs = torch.softmax(x, dim=-1)  # [B, V]
    if top_p is not None and top_p < 1:
        probs = probs * (probs.cumsum(dim=-1) - probs < top_p)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(1e-38)  # [B, V]
    return order.gather(1, (probs / race).argmax(dim=-1, keepdim=True)).squeeze(1)  # [B]


def model_logits(rows: int) -> torch.Tensor:
    """Next-token logits [rows, V] of the embedded model along its own sampled continuations of
    PROMPTS (T = 1, top_p 0.95, fixed seeds): the distributions a server samples from, which are
    flatter (larger nuclei) than those along greedy text."""
    import opengemma

    g = opengemma.load()
    per = -(-rows // len(PROMPTS))
    out = []
    with torch.inference_mode():
        for i, p in enumerate(PROMPTS):
            prompt = g.tokenizer.encode(p, bos=True)
            text = g.generate(p, max_new_tokens=per, temperature=1.0, top_p=0.95, seed=i)
            ids = torch.tensor([g.tokenizer.encode(p + text, bos=True)])  # [1, T]
            out.append(g.model(ids)[0, len(prompt) - 1:][:per])  # [per, V]: each continuation step
    return torch.cat(out)[:rows].clone()


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random", action="store_true", help="Gaussian logits (std 3) instead of the model's")
    p.add_argument("--vocab", type=int, default=262144, help="vocabulary of --random logits (default 262144)")
    p.add_argument("--rows", type=int, default=48, help="distinct logit rows cycled through (default 48)")
    p.add_argument("--batches", default="1,16", help="batch sizes, comma-separated (default 1,16)")
    p.add_argument("--reps", type=int, default=9, help="timed calls per setting and batch size (default 9)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random:
        logits = torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0)) * 3.0  # [R, V]
    else:
        print("bench_sampling: computing the embedded model's logits ...", file=sys.stderr)
        logits = model_logits(args.rows)  # [R, V]
    R, V = logits.shape
    g_new, g_old = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    print(f"logits [{R}, {V}] ({'random' if args.random else 'embedded model'}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.reps} calls\n")
    print("| setting | batch | argmax (ms) | sort (ms) | new (ms) | sort / new | new / argmax |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for b in (int(x) for x in args.batches.split(",")):
        for name, kw in SETTINGS:
            times: dict[str, list[float]] = {"argmax": [], "sort": [], "new": []}
            calls = {"argmax": lambda x: x.argmax(dim=-1), "sort": lambda x: sort_sample(x, g_old, **kw),
                     "new": lambda x: sample_next_token(x, g_new, **kw)}
            for rep in range(args.reps + 1):  # the first round warms up
                x = logits[torch.arange(rep * b, rep * b + b) % R]  # [b, V]
                for key, fn in calls.items():
                    t0 = time.perf_counter()
                    fn(x)
                    if rep:
                        times[key].append(time.perf_counter() - t0)
            a, s, n = (median_ms(times[k]) for k in ("argmax", "sort", "new"))
            print(f"| {name} | {b} | {a:.2f} | {s:.1f} | {n:.2f} | {s / n:.1f}x | {n / a:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
