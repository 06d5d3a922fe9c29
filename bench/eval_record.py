"""Recorded benchmark run (report section "Evaluation", Table 6): the embedded Gemma 3 270M on the
full validation/test sets in ``../shared/benchmarks``, with the Gemma 1 report's shot counts and the
Gemma 3 model card's (10-shot HellaSwag, 25-shot ARC-c, 5-shot WinoGrande).

Usage: python bench/eval_record.py OUT.json [--limit N] [--data-dir DIR] [--runs task:shots[:N],...]

Every finished run is appended to OUT.json at once (partial results survive an interrupted run),
with its n, shots, metrics, standard errors and wall time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import opengemma
from opengemma.eval.runner import run_task
from opengemma.eval.tasks import get_task
from opengemma.eval.tasks.base import DataSource

DEFAULT_RUNS = ("winogrande:0,arc_challenge:0,siqa:0,piqa:0,arc_easy:0,winogrande:5,arc_challenge:25,"
                "boolq:0,hellaswag:0,hellaswag:10")


def merge(a: dict, b: dict) -> dict:
    """Two consecutive chunks of one run -> one result (accuracies are 0/1 means: exact merge)."""
    n = a["n"] + b["n"]
    m = {}
    for key in a["metrics"]:
        if key.endswith("_stderr"):
            continue
        p = (a["metrics"][key] * a["n"] + b["metrics"][key] * b["n"]) / n
        m[key], m[key + "_stderr"] = p, math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
    out = dict(a, n=n, metrics=m)
    out["value"], out["stderr"] = m[a["main_metric"]], m[a["main_metric"] + "_stderr"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--limit", type=int, default=None, help="items per run unless the run spec says task:shots:N")
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16 (AMX on this CPU: ~1.5x faster) or float32")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "benchmarks"))
    ap.add_argument("--runs", default=DEFAULT_RUNS)
    ap.add_argument("--chunk", type=int, default=200, help="save after every CHUNK items")
    args = ap.parse_args()
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {
        "model": "embedded gemma3-270m (Q4_K_M GGUF, dequantized)", "device": "cpu",
        "threads": torch.get_num_threads(), "machine": platform.platform(), "runs": []}
    have = {(r["task"], r["shots"]): r for r in record["runs"]}
    t = time.monotonic()
    g = opengemma.load(dtype=args.dtype, device="cpu")
    record.setdefault("dtype", args.dtype)
    if record["dtype"] != args.dtype:
        raise SystemExit(f"{out} holds {record['dtype']} runs; use another file for {args.dtype}")
    print(f"loaded in {time.monotonic() - t:.1f}s", flush=True)
    src = DataSource(args.data_dir)
    for spec in args.runs.split(","):
        name, shots, *lim = spec.split(":")  # task:shots[:limit]
        task = get_task(name)
        n_total = len(task.load(src)[0])
        want = min(int(lim[0]) if lim else (args.limit or n_total), n_total)
        res = have.get((name, int(shots)))  # resume: continue after the items already recorded
        if res is not None and res["n"] >= want:
            continue
        t0 = time.monotonic() - (res["wall_s"] if res else 0.0)
        for start in range((res["n"] if res else 0), want, args.chunk):  # saved after every chunk
            part = run_task(g, task, src, shots=int(shots), limit=min(args.chunk, want - start), start=start,
                            batch_size=args.batch_size)
            res = part if res is None else merge(res, part)
            res["n_total"] = n_total
            res["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            res["wall_s"] = round(time.monotonic() - t0, 1)
            record["runs"] = [r for r in record["runs"] if (r["task"], r["shots"]) != (name, int(shots))] + [res]
            have[(name, int(shots))] = res
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, out)
            print(f"  {name} {shots}-shot {res['n']}/{want} {res['main_metric']}={res['value']:.4f} "
                  f"{res['wall_s']:.0f}s", flush=True)
        print(f"{name} {shots}-shot n={res['n']}/{n_total} {res['main_metric']}={res['value']:.4f} "
              f"(acc {res['metrics']['acc']:.4f}, acc_norm {res['metrics']['acc_norm']:.4f}) "
              f"{res['wall_s']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
