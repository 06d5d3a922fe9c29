"""The native decode block against PyTorch's block, one decode step's trunk at a time (issue 19).

The embedded Gemma 3 270M as ``generate`` loads it (``quantize="auto"``: mixed, bf16 activations;
native linear kernels in both columns), its KV cache filled to ``--contexts`` positions; the median
time of ``model.trunk`` for one token (18 blocks, the head excluded) with the blocks as
:class:`~opengemma.quant.native_block.NativeBlock` (``block.c``: one call per block) and as plain
:class:`~opengemma.model.Block` (PyTorch's ops around the same native linears), the ratio, and the
largest difference of the two trunks' outputs relative to their size. One and two threads. Prints a
markdown table; ``--record NAME`` writes it to ``bench/results/NAME.md``.

    python bench/bench_native_block.py [--threads 1,2] [--contexts 64,512,2048] [--reps 50] [--record NAME]
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
from pathlib import Path

import torch
from bench_native import cpu_name, median_ms

import opengemma
from opengemma.quant import native
from opengemma.quant.native_block import use_native_blocks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--contexts", default="64,512,2048", help="cached positions before the timed step (default 64,512,2048)")
    p.add_argument("--reps", type=int, default=50, help="timed steps per setting (default 50)")
    p.add_argument("--record", metavar="NAME", help="also write the table to bench/results/NAME.md")
    args = p.parse_args(argv)
    if not native.available():
        print(f"native kernels unavailable: {native.unavailable_reason()}")
        return 1
    g = opengemma.load(quantize="auto")
    m = g.model
    contexts = [int(c) for c in args.contexts.split(",")]
    gen = torch.Generator().manual_seed(0)
    rows = ["| threads | cached positions | PyTorch's block (ms) | native block (ms) | × | max relative difference |",
            "|---:|---:|---:|---:|---:|---:|"]
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for n in contexts:
            cache = m.make_cache(1, n + 8)
            tok = torch.randint(0, g.config.vocab_size, (1, 1), generator=gen)
            pos = torch.tensor([[n]])
            with torch.inference_mode():
                m(torch.randint(0, g.config.vocab_size, (1, n), generator=gen), torch.arange(n)[None], cache)
                out, ms = {}, {}
                for on in (False, True):
                    use_native_blocks(m, on)
                    # rewriting position n each call gives the same keys: every call is the same step
                    ms[on] = median_ms(lambda: m.trunk(tok, pos, cache), args.reps)
                    out[on] = m.trunk(tok, pos, cache).float()
            diff = ((out[True] - out[False]).abs().max() / out[False].abs().max()).item()
            rows.append(f"| {threads} | {n} | {ms[False]:.2f} | {ms[True]:.2f} | {ms[False] / ms[True]:.2f}× | {diff:.1e} |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    if args.record:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown"
        head = (f"# Native decode block vs PyTorch's block: one decode step's trunk\n\n"
                f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n"
                f"- machine: {cpu_name()}; torch {torch.__version__}\n"
                f"- model: the embedded Gemma 3 270M, `opengemma.load(quantize='auto')` (mixed, bf16), native "
                f"linear kernels in both columns; the head is not included\n"
                f"- command: `python bench/bench_native_block.py --threads {args.threads} --contexts "
                f"{args.contexts} --reps {args.reps} --record {args.record}`; opengemma commit {commit}\n"
                f"- median of the timed steps; max relative difference: the largest |native - PyTorch| of the "
                f"trunk's output over its largest |value|\n\n")
        path = Path(__file__).parent / "results" / f"{args.record}.md"
        path.write_text(head + table + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
