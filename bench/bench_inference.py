"""CPU inference benchmark: opengemma's variants vs Hugging Face transformers vs llama.cpp.

The embedded Gemma 3 270M (Q4_K_M GGUF), batch 1, on the CPU with ``--threads`` threads. Engines
(``--engines``; their code and worker process are in ``inference_engines.py``): the opengemma
variants of ``inference_engines.VARIANTS``, each ``opengemma.load(gguf, device="cpu", ...)`` with its
own options -- ``opengemma`` (fp32; the reference for prompt ids and greedy tokens), ``-bf16``,
``-int8``, ``-int4`` (weight-only, fp32 activations), ``-int4-bf16``, ``-int4-compile`` and
``-int4-bf16-compile`` (the decode step through ``torch.compile``, its cache rounded up to a power
of two as ``generate`` does; skipped when ``opengemma.load`` has no ``compile``), ``-mixed``,
``-mixed-bf16`` and ``-mixed-bf16-compile`` (int8's weights, the 8-bit head read through a 4-bit
screen when decoding, ``opengemma.quant.head``); ``transformers`` (the GGUF dequantized to
fp32); ``llama.cpp`` via llama-cpp-python (the Q4_K_M file as it is; skipped when not installed);
the speculative engines ``<variant>-spec`` of ``inference_engines.SPECULATIVE`` (``opengemma``,
``-bf16``, ``-int8``, ``-mixed``, ``-mixed-bf16``): the variant decoding with lossless speculative decoding,
prompt-lookup drafts, at most ``--speculate`` K per forward (``opengemma generate --speculate K``).

* **load** -- in-process wall time of the load call (``opengemma.load()``; transformers' model *and*
  tokenizer from the GGUF; ``llama_cpp.Llama(...)``); the engine's import is timed separately.
* **cold start to first token** -- a fresh ``python -c`` that imports the engine, loads the model
  (with the variant's options) and generates one token, timed spawn to exit; ``--cold-runs``
  (4) rounds over the engines, the first warming the OS file cache (start-up cost, not disk), the
  median of the others reported (one run is a noisy sample on a shared VM: ±0.4 s); peak RSS from
  ``wait4``, the largest of the counted runs. A process that only runs ``import torch`` is timed in
  the same rounds: the floor under every PyTorch engine's cold start, against which llama.cpp's
  (a 0.5 s import) is compared.
  The first token comes from the prefill, so a compiled decode step is compiled later, in the
  warm-up decode (``warmup_decode_s``, "first decode call" in the second table).
* **prefill** -- one forward over a fixed ``--prompt-tokens`` prompt into a fresh KV cache, logits
  at the last position only (``generate.prefill``; ``forward(..., logits_to_keep=1)``; ``eval``);
  one warm-up, median of ``--prefill-reps``, as ms and tokens/s.
* **decode** -- after an untimed prefill, ``--decode-tokens`` greedy steps through the cache: per
  step argmax, host sync of the id (as a streaming generator does), one forward
  (``generate.decode_step``; ``forward`` with a ``DynamicCache`` and ``cache_position``;
  ``eval([id])``). Only the loop is timed; tokens/s = tokens / loop time, median of
  ``--decode-reps`` after an 8-step warm-up. A speculative engine times each forward
  (``SpeculativeDecoder.step``: drafting, one forward over the drafts, acceptance, rollback) and
  spreads it over the tokens it gave; it also reports the drafts accepted and tokens per forward
  (over the timed repetitions). Its greedy tokens must agree with fp32's (lossless), up to
  near-ties. Note the prompt (the paragraphs below, cycled) repeats itself, which prompt lookup
  exploits: its speed-up there is an upper end, not what novel text gets. Its perplexity and
  cold start are its variant's (the same model and load), copied, not measured again.
* **perplexity** -- once per engine after the timed repetitions, untimed: the first
  ``--ppl-tokens`` (1024, BOS included) tokens of ``--ppl-text`` (default: the Gemma technical
  report in ``../shared/reference/``, a fixed text the model has not seen repeated; else the
  prompt's paragraphs, which repeat and so flatter every engine alike); exp of
  the mean NLL of tokens 1..N-1 (``logprobs.perplexity``; one forward, log_softmax in fp32; a second
  llama.cpp context with ``logits_all``, then its ``scores``).
* **peak RSS** -- ``ru_maxrss`` of the engine's worker over load and the timed measurements (read
  before the perplexity and its [N, 262144] logits), and the RSS right after load.
* **agreement** -- whether each engine's tokenizer gives opengemma's ids for the prompt and the
  perplexity text (all engines are fed opengemma's ids either way: the same work, comparable
  perplexities), and for how many greedy tokens each engine agrees with opengemma fp32.

Each engine runs in its own worker process, so its memory peak is its own; this parent drives the
workers command by command over pipes and only one computes at a time. The engines are loaded one
after the other, then timed in alternation, repetition by repetition (the engine going first
rotates), so that other work on the machine affects every engine alike. The table reports for every
engine the CPU *other* processes used while it was measured (from /proc/stat); ``--wait-idle``
waits for a quiet machine first. One row per engine, with ratios engine/peer (llama.cpp,
transformers) for tokens/s; below, whether each opengemma variant meets the targets: decode >= 1.0x
and prefill >= 1.5x llama.cpp, cold start <= 1.5x llama.cpp's, cold-start peak RSS <= 2x llama.cpp's.

``--record NAME`` writes ``bench/results/NAME.json`` (every raw timing) and ``NAME.md`` (the
tables, date, machine: CPU model, cores, torch version, threads); tables, targets and records are
made in ``inference_report.py``.

    python bench/bench_inference.py --quick             # smoke run
    python bench/bench_inference.py --record NAME       # the full run
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from machine import CpuMeter, git_state, machine_info, wait_idle  # noqa: E402 (stdlib only)
from inference_engines import (ENGINES, OWN_COLD_START, REFERENCE, SPECULATIVE, TORCH_IMPORT, VARIANTS,  # noqa: E402
                               Worker, engine_available, run_cold_start_once, summarize_cold_starts)
from inference_report import (RATIO_NOTE, contended, make_details, make_table,  # noqa: E402 (stdlib only)
                              targets, write_record)
DEFAULT_PPL_TEXT = HERE.parent.parent / "shared" / "reference" / "gemma-technical-report.txt"


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it has a plain one (the help text explains the others)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    variants = "; ".join(f"{e} = opengemma.load({', '.join(f'{k}={v!r}' for k, v in o.items())})"
                         for e, o in VARIANTS.items())
    p = argparse.ArgumentParser(
        prog="bench_inference.py",
        description="Benchmark CPU inference of the embedded Gemma 3 270M (Q4_K_M GGUF): opengemma's "
                    "variants (fp32, bf16, int8, int4, int4+bf16, int4 (+bf16) + torch.compile, mixed (+bf16, + torch.compile)) against Hugging "
                    "Face transformers loading the same GGUF (fp32) and llama.cpp (llama-cpp-python) "
                    "when it is installed. Batch 1, greedy. Each engine runs in its own worker "
                    "process; the engines are timed in alternation, repetition by repetition; the "
                    "table has one row per engine with medians, ratios to llama.cpp and transformers, "
                    "cold start, perplexity and agreement with opengemma fp32, then the targets.",
        formatter_class=_HelpFormatter)
    p.add_argument("--threads", type=int, default=2,
                   help="torch intra-op threads (torch.set_num_threads, OMP/MKL_NUM_THREADS) for every "
                        "engine; llama.cpp gets n_threads=n_threads_batch=THREADS")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="prefill prompt length in tokens, BOS included (default 512, 128 with --quick)")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="greedy decode steps timed per repetition (default 128, 16 with --quick)")
    p.add_argument("--prefill-reps", type=int, default=None,
                   help="timed prefill repetitions after one warm-up; the median is reported "
                        "(default 5, 2 with --quick)")
    p.add_argument("--decode-reps", type=int, default=None,
                   help="timed decode repetitions after a short warm-up; the median tokens/s is "
                        "reported (default 3, 1 with --quick)")
    p.add_argument("--cold-runs", type=int, default=None,
                   help="fresh-process 'import + load + 1 token' runs per engine, in rounds over the "
                        "engines; the first warms the OS file cache, the median of the others is "
                        "reported; 0 skips cold start (default 4, 1 with --quick)")
    p.add_argument("--ppl-text", default=str(DEFAULT_PPL_TEXT), metavar="FILE",
                   help="text whose first --ppl-tokens tokens give the perplexity figure (the prompt's "
                        "paragraphs when FILE does not exist)")
    p.add_argument("--ppl-tokens", type=int, default=1024,
                   help="perplexity text length in tokens, BOS included (the same with --quick): "
                        "computed once per engine, untimed, after the timed repetitions; 0 skips it")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help="comma-separated engines to run, from: " + ", ".join(ENGINES) + f" ({variants}; "
                        "all with device='cpu'). opengemma (fp32) is the reference of greedy-token "
                        "agreement; its prompt ids (or, without it, the first opengemma variant's) "
                        "are every engine's input")
    p.add_argument("--decode-prompts", choices=["bench", "chat"], default="bench",
                   help="what decode continues: the prefill prompt (bench), or each of the chat prompt set "
                        "(inference_engines.CHAT_PROMPTS, four user turns in the chat format) one after the "
                        "other, --decode-tokens each (chat)")
    p.add_argument("--speculate", type=int, default=8, metavar="K",
                   help="most drafted tokens per forward of the speculative engines (*-spec, *-draft)")
    p.add_argument("--draft", default=None, metavar="DIR",
                   help="the draft head of the *-draft engines (opengemma train draft; they are skipped without)")
    p.add_argument("--quick", action="store_true",
                   help="fast smoke run: shorter prompt and decode, fewer repetitions (figures are "
                        "noisier and not comparable to a full run)")
    p.add_argument("--record", metavar="NAME", default=None,
                   help="write bench/results/NAME.json (all raw timings) and bench/results/NAME.md "
                        "(the table, targets, date and machine)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before loading each engine, before the timed repetitions and before each "
                        "cold start, wait until other processes use less than 0.25 cores (measured "
                        "from /proc/stat over 3 s), at most SECONDS in all over the run; 0 does not "
                        "wait. Either way the table reports the CPU other processes used during each "
                        "measurement")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds one worker command (load, one prefill or decode repetition, the "
                        "perplexity) or one cold-start process may take before it is killed")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"prompt_tokens": (512, 128), "decode_tokens": (128, 16), "prefill_reps": (5, 2),
                "decode_reps": (3, 1), "cold_runs": (4, 1)}
    for name, (full, fast) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, fast if quick else full)
    for name in ("threads", "prompt_tokens", "decode_tokens", "prefill_reps", "decode_reps", "speculate"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.cold_runs < 0:
        p.error("--cold-runs must be >= 0")
    if args.ppl_tokens != 0 and args.ppl_tokens < 2:
        p.error("--ppl-tokens must be 0 or >= 2")
    engines = list(dict.fromkeys(e.strip() for e in args.engines.split(",") if e.strip()))
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        p.error(f"--engines: unknown {bad}; choose from {', '.join(ENGINES)}")
    args.engines = engines
    return args


# ---------------------------------------------------------------------------------------------
# machine load
# ---------------------------------------------------------------------------------------------

def maybe_wait_idle(args: argparse.Namespace, t0: float, workers: list | tuple = ()) -> None:
    """Wait for an idle machine out of what is left of the run's --wait-idle budget."""
    if args.wait_idle > 0:
        start = time.perf_counter()
        wait_idle(args.wait_idle, lambda text: log(text, t0), workers)
        waited = time.perf_counter() - start
        args.wait_idle -= waited
        args.waited_s = getattr(args, "waited_s", 0.0) + waited


# ---------------------------------------------------------------------------------------------
# one engine's summary (the tables and the record: inference_report.py)
# ---------------------------------------------------------------------------------------------

def summarize(res: dict, P: int, D: int) -> dict:
    """Medians and rates from one worker's raw timings."""
    pre = sorted(res["prefill_s"])
    dec_tps = sorted(len(r) / sum(r) for r in res["decode_step_s"])  # D tokens per decode prompt
    steps = sorted(t for r in res["decode_step_s"] for t in r)
    spec = res.get("spec_stats")  # speculative engines: per timed repetition
    if spec:
        drafted, forwards = sum(x["drafted"] for x in spec), sum(x["forwards"] for x in spec)
        spec = {"acceptance": sum(x["accepted"] for x in spec) / drafted if drafted else None,
                "tokens_per_forward": sum(x["tokens"] for x in spec) / forwards if forwards else None}
    return {**(spec or {}),
        "import_s": res["import_s"],
        "load_s": res["load_s"],
        "warmup_decode_s": res.get("warmup_decode_s"),
        "prefill_ms": statistics.median(pre) * 1e3,
        "prefill_ms_range": [pre[0] * 1e3, pre[-1] * 1e3],
        "prefill_tps": P / statistics.median(pre),
        "decode_tps": statistics.median(dec_tps),
        "decode_tps_range": [dec_tps[0], dec_tps[-1]],
        "decode_ms_per_token_median": statistics.median(steps) * 1e3,
        "decode_ms_per_token_p90": steps[min(len(steps) - 1, int(0.9 * len(steps)))] * 1e3,
        "rss_after_load_mib": res["rss_after_load_mib"],
        "peak_rss_mib": res["peak_rss_mib"],
        "other_load_cores": res.get("other_load_cores"),
    }


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _rotate(items: list, k: int) -> list:
    k %= max(1, len(items))
    return items[k:] + items[:k]


def gguf_tensor_bytes(path: str) -> int | None:
    """Bytes of all tensors of a GGUF file: what llama.cpp reads per decoded token (every tensor
    once; the tied embedding is the head). Parsed here, in the parent: the llama.cpp worker must
    not import torch (its memory is measured), and gguf.GGUFReader takes ~25 s on the vocabulary."""
    try:
        from opengemma.checkpoints.gguf import read_header

        return sum(t.n_bytes for t in read_header(path).tensors)
    except Exception:  # noqa: BLE001 (a figure of the report, never a reason to fail the bench)
        return None


def measure_engines(args: argparse.Namespace, settings: dict, report: dict, t0: float) -> None:
    """Load every engine in its own worker process, one after the other, then time them in
    alternation, repetition by repetition (the engine going first rotates), so that a change of
    machine load over the run affects every engine alike; then the perplexities (untimed), then the
    cold starts, one at a time."""
    P, D = settings["prompt_tokens"], settings["decode_tokens"]
    results = report["results"]
    workers: dict[str, Worker] = {}
    other: dict[str, list[float]] = {}  # engine -> [other processes' CPU s, wall s] over its commands

    def timed(engine: str, fn):
        meter = CpuMeter(list(workers.values()))
        out = fn()
        cpu, wall = meter.other()
        acc = other.setdefault(engine, [0.0, 0.0])
        acc[0] += cpu
        acc[1] += wall
        return out

    def failed(engine: str, err: str) -> None:
        print(f"{engine}: FAILED\n{err}", file=sys.stderr, flush=True)
        results[engine] = {"engine": engine, "error": err}
        w = workers.pop(engine, None)
        if w is not None:
            w.close()

    ref: dict = {}  # prompt_ids / ppl_ids of the first opengemma variant loaded: every engine's input
    try:
        # opengemma fp32 first, then the other variants (same tokenizer), then the peers.
        for engine in sorted(args.engines, key=lambda e: (e != REFERENCE, e not in VARIANTS)):
            why = engine_available(engine)
            if why:
                print(f"{engine}: {why}: skipped", flush=True)
                results[engine] = {"skipped": why}
                continue
            maybe_wait_idle(args, t0, list(workers.values()))
            log(f"{engine}: loading in its own process ...", t0)
            w = Worker(engine, {**settings, **ref}, args.threads, args.timeout)
            workers[engine] = w
            ready = timed(engine, w.ready)
            if "error" in ready:
                failed(engine, ready["error"])
                continue
            if "skipped" in ready:
                print(f"{engine}: {ready['skipped']}: skipped", flush=True)
                results[engine] = {"skipped": ready["skipped"]}
                workers.pop(engine).close()
                continue
            if engine in VARIANTS and not ref:
                ref = {"prompt_ids": ready["prompt_ids"], "ppl_ids": ready.get("ppl_ids"),
                       "chat_ids": ready.get("chat_ids")}
                report["id_reference"] = engine
            elif ref:  # it was fed the reference's ids: the JSON keeps them once
                ready.pop("prompt_ids", None), ready.pop("ppl_ids", None), ready.pop("chat_ids", None)
            results[engine] = {"engine": engine, **ready, "prefill_s": [], "decode_step_s": []}
            log(f"{engine}: loaded in {ready['load_s']:.2f} s; warming up", t0)
            for op, kw in (("prefill", {}), ("decode", {"steps": min(8, D)})):
                r = timed(engine, lambda: w.ask(op, **kw))
                if "error" in r:
                    failed(engine, r["error"])
                    break
                if op == "decode":
                    results[engine]["warmup_decode_s"] = r["wall_s"]
        if not workers:
            return
        maybe_wait_idle(args, t0, list(workers.values()))
        log(f"prefill {P} tokens x{args.prefill_reps}, alternating {', '.join(workers)} ...", t0)
        for rep in range(args.prefill_reps):
            for engine in _rotate(list(workers), rep):
                r = timed(engine, lambda: workers[engine].ask("prefill"))
                if "error" in r:
                    failed(engine, r["error"])
                    continue
                results[engine]["prefill_s"].append(r["s"])
        log(f"decode {D} tokens x{args.decode_reps}, alternating ...", t0)
        for rep in range(args.decode_reps):
            for engine in _rotate(list(workers), rep):
                r = timed(engine, lambda: workers[engine].ask("decode", steps=D))
                if "error" in r:
                    failed(engine, r["error"])
                    continue
                res = results[engine]
                res["decode_step_s"].append(r["step_s"])
                if "spec" in r:
                    res.setdefault("spec_stats", []).append(r["spec"])
                if "decode_ids" not in res:
                    res["decode_ids"] = r["ids"]
                elif r["ids"] != res["decode_ids"]:
                    res["decode_nondeterministic"] = True
        for engine in list(workers):
            r = workers[engine].ask("stats")  # peak RSS before the perplexity's big logits
            if "error" in r:
                failed(engine, r["error"])
                continue
            results[engine]["peak_rss_mib"] = r["peak_rss_mib"]
            results[engine]["info"].update(r["info"])
            if r["info"].get("compile_error"):
                report["warnings"].append(f"{engine}: torch.compile failed ({r['info']['compile_error']}); "
                                          "it decoded eagerly")
            elif r["info"].get("cpp_wrapper_error"):
                report["warnings"].append(f"{engine}: inductor's C++ wrapper failed ({r['info']['cpp_wrapper_error']}); "
                                          "the step ran with its Python wrapper")
            if results[engine].get("decode_nondeterministic"):
                report["warnings"].append(f"{engine}: greedy tokens differed between decode repetitions")
            cpu, wall = other[engine]
            results[engine]["other_load_cores"] = cpu / wall if wall > 0 else None
            results[engine]["summary"] = summarize(results[engine], P, D)
            s = results[engine]["summary"]
            wbytes = results[engine]["info"].get("decode_weight_bytes")
            if engine == "llama.cpp" and wbytes is None:
                wbytes = results[engine]["info"]["decode_weight_bytes"] = gguf_tensor_bytes(settings["gguf"])
            if wbytes:  # weights read per decoded token x tokens/s: the effective bandwidth
                per_token = wbytes / (s.get("tokens_per_forward") or 1.0)  # a forward reads them once
                s["decode_weight_mb"], s["decode_gbps"] = per_token / 1e6, per_token * s["decode_tps"] / 1e9
            log(f"{engine}: prefill {s['prefill_tps']:.0f} tok/s, decode {s['decode_tps']:.1f} tok/s"
                + (f" ({s['decode_weight_mb']:.0f} MB of weights per token, {s['decode_gbps']:.1f} GB/s)" if wbytes else "")
                + f", peak RSS {s['peak_rss_mib']:.0f} MiB", t0)
        ppl_engines = [e for e in workers if e not in SPECULATIVE] if settings["ppl_tokens"] else []
        if ppl_engines:
            log(f"perplexity on {settings['ppl_tokens']} tokens, one engine at a time (untimed) ...", t0)
        for engine in ppl_engines:
            res, r = results[engine], workers[engine].ask("ppl")
            if "ppl" in r:
                res.update(ppl=r["ppl"], ppl_s=r["s"], ppl_peak_rss_mib=r["peak_rss_mib"])
                res["summary"]["ppl"] = r["ppl"]
                log(f"{engine}: perplexity {r['ppl']:.3f} ({r['s']:.1f} s)", t0)
                continue
            res["ppl_error"] = r.get("ppl_error") or r["error"]  # the timings stand either way
            print(f"{engine}: perplexity FAILED\n{res['ppl_error']}", file=sys.stderr, flush=True)
            if "error" in r:
                workers.pop(engine).close()
        for w in workers.values():
            w.ask("finish")
    finally:
        for w in workers.values():
            w.close()

    for engine in (e for e in SPECULATIVE if e in results):  # a speculative engine's model is its variant's
        base = results.get(SPECULATIVE[engine], {})
        if "summary" in results.get(engine, {}) and "ppl" in base:
            results[engine]["summary"]["ppl"] = base["ppl"]
    if not args.cold_runs:
        return
    # Rounds over the engines (the first going first rotates), as for the timed measurements: a
    # burst of other work on the machine hits every engine alike instead of one engine's runs.
    engines = [e for e in args.engines if "summary" in results[e] and (e not in SPECULATIVE or e in OWN_COLD_START)]
    if any(e != "llama.cpp" for e in engines):  # the floor of the PyTorch engines' cold starts
        engines.append(TORCH_IMPORT)
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    other: dict[str, list[float]] = {e: [] for e in engines}
    broken: dict[str, str] = {}
    for r in range(args.cold_runs):
        log(f"cold start round {r + 1} of {args.cold_runs} ...", t0)
        for engine in _rotate(engines, r):
            if engine in broken:
                continue
            maybe_wait_idle(args, t0)
            meter = CpuMeter()
            one = run_cold_start_once(engine, settings["gguf"], args.threads, args.timeout)
            if "error" in one:
                broken[engine] = one["error"]
                print(f"{engine}: cold start FAILED\n{one['error']}", file=sys.stderr, flush=True)
                continue
            other[engine].append(meter.other_cores())
            runs[engine].append(one)
    for engine in engines:
        if engine == TORCH_IMPORT:
            if runs[engine]:
                report["torch_import"] = summarize_cold_starts(runs[engine])
                log(f"import torch alone: {report['torch_import']['s']:.2f} s", t0)
            continue
        res = results[engine]
        if engine in broken:
            res["cold_start"] = {"error": broken[engine], "runs_s": [x["s"] for x in runs[engine]]}
            continue
        cold = summarize_cold_starts(runs[engine])
        counted = other[engine][1:] or other[engine]
        cold["other_load_cores"] = sum(counted) / len(counted)
        res["cold_start"] = cold
        res["summary"].update(cold_s=cold["s"], cold_peak_rss_mib=cold["peak_rss_mib"],
                              cold_other_load_cores=cold["other_load_cores"])
        for spec in (e for e, v in SPECULATIVE.items()
                     if v == engine and e not in OWN_COLD_START and "summary" in results.get(e, {})):
            results[spec]["summary"].update(cold_s=cold["s"], cold_peak_rss_mib=cold["peak_rss_mib"])
        log(f"{engine}: cold start {cold['s']:.2f} s (runs {', '.join(f'{x:.2f}' for x in cold['runs_s'])})", t0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    from opengemma.embedded import embedded_path

    gguf = str(embedded_path())
    P, D = args.prompt_tokens, args.decode_tokens
    ppl_path = Path(args.ppl_text)
    ppl_text = ppl_path.read_text(errors="replace")[:40000] if ppl_path.is_file() else None
    settings = {"gguf": gguf, "threads": args.threads, "prompt_tokens": P, "decode_tokens": D,
                "speculate": args.speculate, "draft": args.draft, "decode_prompts": args.decode_prompts,
                "ppl_tokens": args.ppl_tokens, "ppl_text": ppl_text,
                "ppl_source": str(ppl_path) if ppl_text else "the prompt's paragraphs"}
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(([f"PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else [])
                                  + [Path(sys.executable).name] + sys.argv),
              "machine": machine_info(args.threads), "git": git_state(), "model": Path(gguf).name,
              "settings": {**{k: v for k, v in settings.items() if k != "ppl_text"}, "prefill_reps": args.prefill_reps, "decode_reps": args.decode_reps,
                           "cold_runs": args.cold_runs, "quick": args.quick},
              "variants": {e: VARIANTS[e] for e in args.engines if e in VARIANTS},
              "speculative": {e: SPECULATIVE[e] for e in args.engines if e in SPECULATIVE},
              "engines": args.engines, "id_reference": None, "results": {}, "warnings": []}
    measure_engines(args, settings, report, t0)
    report["total_s"] = time.perf_counter() - t0
    report["waited_idle_s"] = getattr(args, "waited_s", 0.0)

    m = report["machine"]
    print(f"\n{m['cpu']}, {m['usable_cores']} cores, torch {m['torch']}, threads {args.threads}; "
          f"batch 1, prompt {P} tokens, decode {D} tokens (greedy"
          f"{', after each of the chat prompt set' if args.decode_prompts == 'chat' else ''}), "
          f"perplexity on {args.ppl_tokens} tokens of {settings['ppl_source']}\n")
    goals = report["targets"] = targets(report)
    text = "\n".join([make_table(report)] + (["", make_details(report)] if any(
        "summary" in r for r in report["results"].values()) else [])
                     + (["", "Targets (decode ≥ 1.0× and prefill ≥ 1.5× llama.cpp, cold start ≤ 1.5× "
                         "llama.cpp's, cold-start peak RSS ≤ 2× llama.cpp's; speculative engines: decode ≥ 1.5×):",
                         ""]
                        + goals if goals else []))
    print(text)
    print(f"\n{RATIO_NOTE} Total {report['total_s']:.0f} s"
          + (f", of which {report['waited_idle_s']:.0f} s waiting for an idle machine." if report["waited_idle_s"] else "."))
    for w in report["warnings"]:
        print(f"WARNING: {w}")
    busy = contended(report)
    if busy:
        print(f"WARNING: other processes used CPU during {', '.join(busy)}: those figures are contended "
              "(rerun on an idle machine, e.g. with --wait-idle 600)")
    if args.record:
        jpath, mpath = write_record(report, text, args.record)
        print(f"recorded: {jpath}, {mpath}")
    failed = [e for e in args.engines if "error" in report["results"][e]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
