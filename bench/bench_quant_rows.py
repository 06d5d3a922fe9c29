"""How the cost of the quantized modules grows with the number of input rows, route by route
(issue 19, part C: a few-row forward, as speculative verification runs, should cost little more
than a one-row forward).

For the embedded Gemma 3 270M's real shapes, and rows M in ``--rows``, times every route PyTorch
offers for each quantized module kind:

* ``packed`` -- the packed weight-only kernel (``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu``,
  bf16 activations);
* ``dense`` -- the module's dense route: dequantize into the activation dtype (whole, or in ~4 MB
  tiles for a matrix over 8 MB), then a dense GEMM (:func:`opengemma.quant.linear.tiled_matmul`);
* ``bf16 copy`` -- a dense GEMM on a bf16 copy of the weight kept in memory (2 bytes per weight
  more; not used by opengemma, measured to show what it would give);
* for ``mixed`` mode's screened head: ``screened`` (its ``attend``), ``screened (topk)`` (the
  same with ``torch.topk`` and ``scatter_``, as before part C), and its pieces.

Then the whole model: one forward over M rows into a filled KV cache (a verification forward of
M - 1 drafts), per mode, as a ratio to one row. Routes are timed in alternation, the fastest of
``--reps`` repetitions, so that load from other processes disturbs them alike and least; the
table says how busy the machine was. Writes ``bench/results/<--record>.md`` and ``.json``.

    python bench/bench_quant_rows.py --threads 2 --record quant-rows-xeon   # ~5 min on an idle machine
    python bench/bench_quant_rows.py --threads 1 --rows 1,4,9 --quick          # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch
import torch.nn.functional as F
from machine import BUSY_CORES, CpuMeter, git_state, machine_info

import opengemma
from opengemma.generate import prefill
from opengemma.quant import linear as quant
from opengemma.quant.head import top_candidates

PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of"


def time_routes(routes: dict, x, reps: int, min_s: float = 0.005) -> dict[str, float]:
    """Milliseconds per call of each route on x: the fastest of ``reps`` repetitions (the least
    disturbed by other processes; the routes take turns within every repetition), after one
    warm-up call each, a repetition repeating the call enough times to last ``min_s``."""
    calls = {}
    for name, fn in routes.items():
        t = time.perf_counter()
        fn(x)
        calls[name] = max(1, int(min_s / max(time.perf_counter() - t, 1e-6)))
    times = {name: [] for name in routes}
    for _ in range(reps):
        for name, fn in routes.items():
            t = time.perf_counter()
            for _ in range(calls[name]):
                fn(x)
            times[name].append((time.perf_counter() - t) / calls[name])
    return {name: min(v) * 1e3 for name, v in times.items()}


def linear_routes(m, dt: torch.dtype) -> dict:
    """Route name -> fn(x2) for an Int8Linear / Int4Linear."""
    routes = {"packed": m.packed, "dense": m.dense}
    w = (m.dequantize(dtype=torch.bfloat16) if isinstance(m, quant.Int8Linear)
         else m.dequantize_t(torch.bfloat16).t().contiguous())  # [N, K]
    routes["bf16 copy"] = lambda x: F.linear(x.to(torch.bfloat16), w).to(x.dtype)
    return routes


def screened_topk(emb, x):
    """The screened head as before part C: ``torch.topk`` and ``scatter_`` (same values)."""
    logits = emb.screen(x)
    top, idx = logits.topk(emb.candidates, dim=-1)
    exact = emb.inner.columns(x, idx)
    logits.scatter_(1, idx, exact)
    risky = exact.max(dim=-1).values <= top[:, -1]
    if int(risky.sum()):
        rows = risky.nonzero()[:, 0]
        logits[rows] = emb.inner(x[rows])
    return logits


def head_routes(emb, _dt) -> dict:
    """Route name -> fn(x2) for the screened head; names indented are its pieces (not contenders)."""
    C, scores = emb.candidates, {}

    def scored(x):  # the 4-bit scores of x, computed once: the top-C rows time the selection alone
        if scores.get("x") is not x:
            scores["x"], scores["s"] = x, emb.screen(x)
        return scores["s"]

    return {"screened": emb.attend, "screened (topk)": lambda x: screened_topk(emb, x),
            "  its 4-bit screen (packed)": emb.screen.packed,
            "  its top-C (two passes)": lambda x: top_candidates(scored(x), C),
            "  its top-C (torch.topk)": lambda x: scored(x).topk(C, dim=-1),
            "exact 8-bit head": emb.inner}


def measure_modules(sections, rows, reps, dts, prefill_rows) -> list[dict]:
    out = []
    g = torch.Generator().manual_seed(0)
    for title, m, routes_of, K in sections:
        for dt in dts:
            routes = routes_of(m, dt)
            res = {name: {} for name in routes}
            for M in rows + ([prefill_rows] if prefill_rows and "head" not in title else []):
                x = torch.randn(M, K, generator=g).to(dt)
                # the packed kernels' cost is linear in rows past 64: known from the smaller M
                timed = time_routes({n: f for n, f in routes.items() if M <= 64 or n != "packed"}, x, reps)
                for name, ms in timed.items():
                    res[name][M] = ms
                print(f"{title} {str(dt)[6:]} M={M}: " + ", ".join(f"{n.strip()} {v:.2f}" for n, v in timed.items()),
                      flush=True)
            out.append({"module": title, "act": str(dt)[6:], "ms": res})
            del routes
    return out


def measure_forward(models, rows, reps) -> list[dict]:
    out = []
    for name, g in models.items():
        ids = g.tokenizer.encode(PROMPT, bos=True)
        res = {}
        with torch.inference_mode():
            cache = g.model.make_cache(1, 128)
            prefill(g.model, cache, [ids])
            for M in rows:  # the same positions each time: a verification forward of M - 1 drafts
                tok = torch.full((1, M), 100)
                pos = torch.arange(len(ids), len(ids) + M)[None]
                step = lambda _, m=g.model, tok=tok, pos=pos, cache=cache: m(tok, pos, cache)
                res[M] = time_routes({"fwd": step}, None, reps)["fwd"]
                print(f"forward {name} M={M}: {res[M]:.1f} ms ({res[M] / res[rows[0]]:.2f}x)", flush=True)
        out.append({"mode": name, "ms": res})
    return out


def markdown(info: dict, modules: list[dict], forwards: list[dict], rows: list[int]) -> str:
    busy = info["other_cores"]
    lines = ["# Quantized modules: cost by input rows, route by route (issue 19, part C)", "",
             (f"- machine: {info['machine']['cpu']}, {info['machine']['usable_cores']} usable cores, torch "
             f"{info['machine']['torch']}, **{info['threads']} thread(s)**"),
             (f"- commit {info['git'].get('commit')} (uncommitted changes in opengemma/: "
             f"{info['git'].get('opengemma_uncommitted_changes')})"),
             (f"- other processes used {busy:.2f} cores during the run: "
              + ("**busy machine: absolute times are inflated and noisy; compare routes within a column**"
                 if busy > BUSY_CORES else "idle machine")),
             f"- command: `{info['command']}`", "",
             "Milliseconds per call, the fastest of the repetitions; the fastest route per column in bold.", ""]
    for mod in modules:
        ms = mod["ms"]
        cols = sorted({M for v in ms.values() for M in v})
        lines += [f"## {mod['module']}, {mod['act']} activations", "",
                  ("| route | " + " | ".join(f"M={M}" for M in cols) + " |"),
                  "|---|" + "---|" * len(cols)]
        contenders = [n for n in ms if not n.startswith("  ")]
        for name, v in ms.items():
            cells = []
            for M in cols:
                if M not in v:
                    cells.append("")
                    continue
                best = min(ms[n][M] for n in contenders if M in ms[n])
                cell = f"{v[M]:.2f}" if v[M] < 10 else f"{v[M]:.1f}"
                cells.append(f"**{cell}**" if v[M] == best and name in contenders else cell)
            lines.append(f"| {name.strip() if not name.startswith('  ') else '&nbsp;&nbsp;' + name.strip()} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    if forwards:
        lines += ["## The whole model: one forward over M rows into a filled cache (ms, and x one row)", "",
                  ("| mode | " + " | ".join(f"M={M}" for M in rows) + " |"), "|---|" + "---|" * len(rows)]
        for f in forwards:
            ms = f["ms"]
            lines.append(f"| {f['mode']} | " + " | ".join(f"{ms[M]:.1f} ({ms[M] / ms[rows[0]]:.2f}x)" for M in rows)
                         + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,4,5,8,9,16,32,64", help="input rows M, comma-separated")
    ap.add_argument("--prefill-rows", type=int, default=512, help="an extra M for the linear layers' dense "
                    "routes (a prefill chunk); 0 = none")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--act", default="bfloat16,float32", help="activation dtypes of the module tables")
    ap.add_argument("--quick", action="store_true", help="the linear layers and the screened head only, bf16")
    ap.add_argument("--record", help="write bench/results/NAME.md and NAME.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = sorted({int(r) for r in args.rows.split(",")})
    dts = [getattr(torch, d) for d in args.act.split(",")] if not args.quick else [torch.bfloat16]

    mixed = opengemma.load(None, quantize="mixed", device="cpu", dtype="bfloat16")
    int4 = opengemma.load(None, quantize="int4", device="cpu", dtype="bfloat16")
    L = mixed.model.layers
    q4k = next(i for i, b in enumerate(L) if isinstance(b.mlp.down_proj, quant.Int4Linear))
    q6k = next(i for i, b in enumerate(L) if isinstance(b.mlp.down_proj, quant.Int8Linear))
    sections = [("int8 q+k+v 1536x640", L[0].attn.qkv_proj, linear_routes, 640),
                ("int8 gate+up 4096x640", L[0].mlp.gate_up_proj, linear_routes, 640),
                ("int8 down 640x2048", L[q6k].mlp.down_proj, linear_routes, 2048),
                ("int4 o 640x1024", L[0].attn.o_proj, linear_routes, 1024),
                ("int4 down 640x2048", L[q4k].mlp.down_proj, linear_routes, 2048),
                ("int4 gate+up 4096x640 (int4 mode)", int4.model.layers[0].mlp.gate_up_proj, linear_routes, 640),
                ("screened head 262144x640 (mixed)", mixed.model.embed, lambda m, dt: head_routes(m, dt), 640)]
    if not args.quick:
        sections += [("int8 head 262144x640 (int8 mode)", mixed.model.embed.inner,
                      linear_routes, 640),
                     ("int4 head 262144x640 (int4 mode)", int4.model.embed.inner,
                      linear_routes, 640)]
    meter = CpuMeter()
    with torch.inference_mode():
        modules = measure_modules(sections, rows, args.reps, dts, args.prefill_rows)
    forwards = []
    if not args.quick:
        models = {"mixed, bf16": mixed, "int4, bf16": int4,
                  "int8, fp32": opengemma.load(None, quantize="int8", device="cpu", dtype="float32")}
        forwards = measure_forward(models, [r for r in rows if r <= 16], args.reps)
    info = {"machine": machine_info(args.threads), "git": git_state(), "threads": args.threads,
            "other_cores": meter.other_cores(), "command": " ".join(["python", "bench/bench_quant_rows.py", *sys.argv[1:]])}
    text = markdown(info, modules, forwards, [r for r in rows if r <= 16])
    print(text)
    if args.record:
        out = HERE / "results" / args.record
        out.with_suffix(".md").write_text(text)
        out.with_suffix(".json").write_text(json.dumps({"info": info, "modules": modules, "forward": forwards},
                                                       indent=1, default=str))
        print(f"wrote {out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
