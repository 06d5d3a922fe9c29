"""Native int8 x int8 kernels against PyTorch's weight-only kernels, one layer at a time (issue 19).

For each weight shape of the embedded Gemma 3 270M's decode step (q+k+v and gate+up stacked, o,
down, the 262,144 x 640 head), int8 (per-row scales) and int4 (groups of 32): the median time of
one call with one bf16 input row through PyTorch's kernel (``Int8Linear.packed`` /
``Int4Linear.packed``: ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu``) and through
opengemma's native kernel (:mod:`opengemma.quant.native`), the ratio, and the weight bytes read per
second. Random weights of the real shapes (speed does not depend on the values); one and two
threads. Prints a markdown table; ``--record NAME`` writes it to ``bench/results/NAME.md``.

    python bench/bench_native.py [--threads 1,2] [--reps 200] [--record NAME]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from opengemma.quant import native
from opengemma.quant.linear import Int4Linear, Int8Linear

SHAPES = (("q+k+v", 1536, 640), ("gate+up", 4096, 640), ("o", 640, 1024), ("down", 640, 2048),
          ("head", 262144, 640))


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--reps", type=int, default=200, help="timed calls per layer shape (the head: a tenth)")
    p.add_argument("--record", metavar="NAME", help="also write the table to bench/results/NAME.md")
    args = p.parse_args(argv)
    if not native.available():
        print(f"bench_native: the native kernels are unavailable here: {native.unavailable_reason()}", file=sys.stderr)
        return 1
    gen = torch.Generator().manual_seed(0)
    rows = ["| weight | N x K | kind | threads | PyTorch (ms) | native (ms) | × PyTorch | native GB/s |",
            "|---|---|---|---|---|---|---|---|"]
    with torch.inference_mode():
        for name, N, K in SHAPES:
            w = torch.randn(N, K, generator=gen) * 0.05
            x = torch.randn(1, K, generator=gen).bfloat16()
            for kind, cls, bytes_per in (("int8", Int8Linear, 1.0 + 2 / K), ("int4", Int4Linear, 0.5 + 4 / 32)):
                mod = cls.from_float(w, act_dtype=torch.bfloat16)
                fn = native.linear_q8 if kind == "int8" else native.linear_q4
                for th in (int(t) for t in args.threads.split(",")):
                    torch.set_num_threads(th)
                    reps = max(5, args.reps // 10) if N > 100_000 else args.reps
                    a = median_ms(lambda: mod.packed(x), reps)
                    b = median_ms(lambda: fn(mod, x), reps)
                    gbs = N * K * bytes_per / (b * 1e-3) / 1e9
                    rows.append(f"| {name} | {N} x {K} | {kind} | {th} | {a:.3f} | {b:.3f} | {a / b:.2f}× | {gbs:.1f} |")
                    print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "?"
    head = [f"# bench_native: {args.record or 'run'}", "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
            f"- machine: {cpu_name()}, {torch.get_num_threads()} threads max; torch {torch.__version__}",
            f"- command: `python bench/bench_native.py --threads {args.threads} --reps {args.reps}`; opengemma commit {commit}",
            "- one bf16 input row; median of the timed calls; GB/s = the weight bytes (with scales) / the native time", ""]
    table = "\n".join(head + rows) + "\n"
    if args.record:
        out = Path(__file__).parent / "results" / f"{args.record}.md"
        out.write_text(table)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
