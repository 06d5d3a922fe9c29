"""CPU inference benchmark: opengemma vs Hugging Face transformers (vs llama.cpp when installed).

What it measures, for the embedded Gemma 3 270M (Q4_K_M GGUF, dequantized to fp32 by the PyTorch
engines) at batch 1 on the CPU with ``--threads`` torch threads:

* **load** -- in-process wall time of the engine's load call until the model is ready
  (``opengemma.load()``; transformers' ``from_pretrained`` of the model *and* tokenizer from the
  GGUF; ``llama_cpp.Llama(...)``). The engine's import is timed separately.
* **cold start to first token** -- a fresh ``python -c`` that imports the engine, loads the model,
  and generates one token, timed from outside (spawn to exit). It runs ``--cold-runs`` times and
  the last run is reported, so the OS page cache is warm (the figure is start-up cost, not disk).
  Its peak RSS comes from ``wait4`` (the child's own ``ru_maxrss``).
* **prefill** -- one forward over a fixed ``--prompt-tokens`` prompt into a fresh KV cache,
  computing logits at the last position only (opengemma: ``generate.prefill``, which passes
  ``logits_at``; transformers: ``forward(..., logits_to_keep=1)``; llama.cpp: ``eval``).
  One warm-up, then the median of ``--prefill-reps`` repetitions, reported as ms and tokens/s.
* **decode** -- after an untimed prefill, ``--decode-tokens`` greedy steps, one token each, with
  the cache: per step argmax of the last logits, host sync of the id (as a streaming generator
  does), then one forward (opengemma: ``generate.decode_step``; transformers: ``forward`` with its
  ``DynamicCache`` and ``cache_position``; llama.cpp: ``eval([id])``). Only the loop is timed, per
  token. tokens/s = decode tokens / loop time; median over ``--decode-reps`` repetitions after a
  short warm-up.
* **peak RSS** -- ``ru_maxrss`` of the engine's own worker process (load + all measurements),
  plus the RSS right after load (opengemma memory-maps its weight cache: pages count once touched).
* **agreement** -- whether the engines' tokenizers give the same ids for the prompt, and for how
  many greedy decode tokens each peer agrees with opengemma (all engines decode the same ids).

Each engine runs in its own worker process (this script re-invoked with ``--worker``), so its
memory peak is its own; the parent drives the workers command by command over pipes and only one
computes at a time. The engines are loaded one after the other, then timed in alternation,
repetition by repetition (the engine going first rotates), so that other work on the machine
affects every engine alike rather than whichever ran during a busy spell. For every engine the
table also reports how much CPU *other* processes used while it was being measured (from
/proc/stat), and ``--wait-idle`` waits for a quiet machine first. The parent prints a table with
a ratio column opengemma/peer (for tokens/s higher is better for opengemma; for seconds and MiB
lower is better).

With ``--record NAME`` the results are written to ``bench/results/NAME.json`` and ``NAME.md``
with the date and the machine (CPU model, cores, torch version, threads).

    python bench/bench_inference.py --quick             # smoke run (3-5 minutes: transformers' load)
    python bench/bench_inference.py --record first-cpu  # the full run (about 5 minutes on an idle 2-core machine)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("opengemma", "transformers", "llama.cpp")

# A fixed, realistic English prompt: three distinct paragraphs, cycled until the prompt is long
# enough, then cut to exactly --prompt-tokens tokens (BOS included).
PARAGRAPHS = (
    "The history of the lighthouse is, in many ways, the history of coastal trade. Long before "
    "electric lamps and automated beacons, keepers climbed narrow spiral stairs every evening to "
    "trim wicks, polish lenses and wind the clockwork that turned the great glass prisms. A single "
    "missed night could mean a wrecked ship, a lost cargo and a drowned crew, so the job demanded "
    "patience, discipline and an almost stubborn sense of duty. Many keepers lived with their "
    "families on isolated rocks for months at a time, receiving supplies by boat when the weather "
    "allowed and keeping detailed logs of every storm, every passing vessel and every repair.",
    "In the kitchen, bread making follows a similar rhythm of small, careful steps. Flour, water, "
    "salt and yeast are mixed into a shaggy dough, which is then kneaded until it becomes smooth "
    "and elastic. The dough rests while the yeast ferments the sugars, releasing carbon dioxide "
    "that stretches the gluten network and makes the loaf rise. A baker shapes the dough, lets it "
    "proof a second time, scores the top with a sharp blade and bakes it in a hot oven, often with "
    "a tray of water underneath so that the steam keeps the crust supple for the first minutes.",
    "Modern computers, for all their speed, still depend on the same basic idea of doing simple "
    "operations very quickly and very reliably. A processor fetches an instruction, decodes it, "
    "executes it and writes back the result, billions of times per second. Caches keep recently "
    "used data close to the cores, because reading from main memory takes far longer than an "
    "addition. Much of the work of making software fast is therefore not about clever arithmetic "
    "but about arranging data so that the processor finds what it needs exactly when it needs it.",
)
COLD_PROMPT = "The capital of France is"
BUSY_CORES = 0.25  # other processes using more CPU than this during a measurement: contended


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
    p = argparse.ArgumentParser(
        prog="bench_inference.py",
        description="Benchmark CPU inference of the embedded Gemma 3 270M (Q4_K_M GGUF) in opengemma "
                    "against Hugging Face transformers loading the same GGUF, and llama.cpp "
                    "(llama-cpp-python) when it is installed. Batch 1, fp32, greedy. Each engine runs "
                    "in its own worker process; the engines are timed in alternation, repetition by "
                    "repetition; the table shows medians and the ratio opengemma/peer.",
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
                   help="fresh-process 'import + load + 1 token' runs per engine; the last one is "
                        "reported so the OS file cache is warm; 0 skips cold start (default 2, 1 with "
                        "--quick)")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help="comma-separated engines to run, from: " + ", ".join(ENGINES) +
                        " (opengemma is the reference of the ratio column and of token agreement)")
    p.add_argument("--quick", action="store_true",
                   help="fast smoke run: shorter prompt and decode, fewer repetitions (figures are "
                        "noisier and not comparable to a full run)")
    p.add_argument("--record", metavar="NAME", default=None,
                   help="write bench/results/NAME.json (all raw timings) and bench/results/NAME.md "
                        "(the table, date and machine)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before loading each engine, before the timed repetitions and before each "
                        "cold start, wait until other processes use less than 0.25 cores (measured "
                        "from /proc/stat over 3 s), at most SECONDS in all over the run; 0 does not "
                        "wait. Either way the table reports the CPU other processes used during each "
                        "measurement")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds one worker command (load, one prefill or decode repetition) or one "
                        "cold-start process may take before it is killed")
    # Internal: the parent re-invokes this script once per engine.
    p.add_argument("--worker", choices=ENGINES, default=None,
                   help="internal: be the worker process of one engine: read settings and commands "
                        "on stdin, reply on --worker-reply-fd (the parent does this; not for direct use)")
    p.add_argument("--worker-reply-fd", type=int, default=None,
                   help="internal: file descriptor the --worker process writes its JSON replies to")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"prompt_tokens": (512, 128), "decode_tokens": (128, 16), "prefill_reps": (5, 2),
                "decode_reps": (3, 1), "cold_runs": (2, 1)}
    for name, (full, fast) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, fast if quick else full)
    for name in ("threads", "prompt_tokens", "decode_tokens", "prefill_reps", "decode_reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.cold_runs < 0:
        p.error("--cold-runs must be >= 0")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        p.error(f"--engines: unknown {bad}; choose from {', '.join(ENGINES)}")
    args.engines = engines
    return args


# ---------------------------------------------------------------------------------------------
# worker side (one engine per process)
# ---------------------------------------------------------------------------------------------

def prompt_text(n_tokens: int) -> str:
    """Enough text for ``n_tokens`` tokens (a paragraph is ~110 tokens; cycle with margin)."""
    reps = n_tokens // 80 + 2
    return "\n\n".join(PARAGRAPHS[i % len(PARAGRAPHS)] for i in range(reps))


def rss_now_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _OpenGemma:
    """opengemma: ``opengemma.load()``, ``generate.prefill`` (logits_at), ``generate.decode_step``."""

    def __init__(self, s: dict):
        import torch

        self.torch = torch
        t = time.perf_counter()
        import opengemma
        from opengemma import generate as gen

        self.import_s = time.perf_counter() - t
        self.gen = gen
        t = time.perf_counter()
        self.g = opengemma.load(s["gguf"], dtype="float32", device="cpu")
        self.load_s = time.perf_counter() - t
        self.cache = None

    def encode(self, text: str) -> list[int]:
        return self.g.tokenizer.encode(text, bos=True)

    def prefill(self, ids: list[int], max_len: int):
        torch = self.torch
        with torch.inference_mode():
            if self.cache is None or self.cache.max_len != max_len:
                self.cache = self.g.model.make_cache(1, max_len)
            logits = self.gen.prefill(self.g.model, self.cache, [ids])  # [1, V], resets the row first
        return logits

    def decode(self, ids: list[int], steps: int) -> tuple[list[float], list[int]]:
        torch = self.torch
        model, P = self.g.model, len(ids)
        logits = self.prefill(ids, P + steps)
        times, out = [], []
        with torch.inference_mode():
            tok = torch.zeros((1, 1), dtype=torch.long)
            pos = torch.zeros((1, 1), dtype=torch.long)
            for i in range(steps):
                t = time.perf_counter()
                nxt = logits.argmax(-1)  # [1]
                out.append(nxt.item())
                tok.copy_(nxt[:, None])
                pos.fill_(P + i)
                logits = self.gen.decode_step(model, tok, pos, self.cache)  # [1, V]
                times.append(time.perf_counter() - t)
            out.append(int(logits.argmax(-1).item()))
        return times, out


def hf_load(gguf: str):
    """transformers' model (fp32, default attention) and tokenizer from the GGUF -> (model, tok, how).

    ``from_pretrained(dir, gguf_file=name)`` needs ``accelerate`` for GGUF files. Without it we take
    the same steps by hand (what tests/conftest.py does): ``load_gguf_checkpoint`` dequantizes the
    file, ``from_config`` builds the model, and the tensors are assigned; ``how`` says which ran.
    """
    import importlib.util

    import torch
    import transformers

    path = Path(gguf)
    if importlib.util.find_spec("accelerate") is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32)
        how = "from_pretrained"
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        parsed = load_gguf_checkpoint(str(path))
        config = transformers.AutoConfig.for_model(**parsed["config"])
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model,
                                       torch_dtype=torch.float32)["tensors"]
        result = model.load_state_dict(tensors, strict=False, assign=True)
        model.tie_weights()
        expected = {n for n, _ in model.named_parameters()}  # tied weights are listed once
        missing = sorted(expected & set(result.missing_keys))
        if missing or result.unexpected_keys:
            raise RuntimeError(f"transformers fallback load: missing {missing[:3]}, "
                               f"unexpected {result.unexpected_keys[:3]}")
        how = "load_gguf_checkpoint + from_config (accelerate not installed)"
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tok, how


class _Transformers:
    """transformers: the GGUF in fp32 (default attention, see :func:`hf_load`), forward with
    ``logits_to_keep=1`` for prefill, and a manual greedy loop over its DynamicCache for decode."""

    def __init__(self, s: dict):
        import torch

        self.torch = torch
        t = time.perf_counter()
        import transformers

        self.import_s = time.perf_counter() - t
        t = time.perf_counter()
        self.model, self.tok, how = hf_load(s["gguf"])
        self.load_s = time.perf_counter() - t
        self.info = {"transformers": transformers.__version__, "load": how,
                     "attn_implementation": getattr(self.model.config, "_attn_implementation", None)}

    def encode(self, text: str) -> list[int]:
        return self.tok(text).input_ids

    def _prefill_out(self, ids: list[int]):
        torch = self.torch
        x = torch.tensor([ids], dtype=torch.long)
        return self.model(input_ids=x, use_cache=True, logits_to_keep=1)

    def prefill(self, ids: list[int], max_len: int):
        with self.torch.inference_mode():
            return self._prefill_out(ids).logits[:, -1]

    def decode(self, ids: list[int], steps: int) -> tuple[list[float], list[int]]:
        torch = self.torch
        P = len(ids)
        times, out = [], []
        with torch.inference_mode():
            o = self._prefill_out(ids)
            past, logits = o.past_key_values, o.logits[:, -1]
            for i in range(steps):
                t = time.perf_counter()
                nxt = logits.argmax(-1)  # [1]
                out.append(nxt.item())
                o = self.model(input_ids=nxt[:, None], past_key_values=past, use_cache=True,
                               cache_position=torch.tensor([P + i]), logits_to_keep=1)
                past, logits = o.past_key_values, o.logits[:, -1]
                times.append(time.perf_counter() - t)
            out.append(int(logits.argmax(-1).item()))
        return times, out


class _LlamaCpp:
    """llama.cpp through llama-cpp-python: ``Llama(model_path)``, ``eval(ids)``, greedy from ``scores``."""

    def __init__(self, s: dict):
        t = time.perf_counter()
        import llama_cpp
        import numpy as np

        self.import_s = time.perf_counter() - t
        self.np = np
        t = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=s["gguf"], n_ctx=s["prompt_tokens"] + s["decode_tokens"] + 16,
                                   n_batch=max(512, s["prompt_tokens"]), n_threads=s["threads"],
                                   n_threads_batch=s["threads"], logits_all=False, verbose=False)
        self.load_s = time.perf_counter() - t
        self.info = {"llama_cpp": getattr(llama_cpp, "__version__", "?")}

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def _last_logits(self):
        # Without logits_all, Llama.eval keeps no scores (sampling moved into llama.cpp): read the
        # context's logits of the last evaluated token directly. A view, valid until the next eval.
        return self.np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def prefill(self, ids: list[int], max_len: int):
        self.llm.reset()
        self.llm.eval(ids)
        return self._last_logits()

    def decode(self, ids: list[int], steps: int) -> tuple[list[float], list[int]]:
        np = self.np
        logits = self.prefill(ids, len(ids) + steps)
        times, out = [], []
        for _ in range(steps):
            t = time.perf_counter()
            nxt = int(np.argmax(logits))
            out.append(nxt)
            self.llm.eval([nxt])
            logits = self._last_logits()
            times.append(time.perf_counter() - t)
        out.append(int(np.argmax(logits)))
        return times, out


WORKERS = {"opengemma": _OpenGemma, "transformers": _Transformers, "llama.cpp": _LlamaCpp}


def serve_worker(engine: str, settings: dict, reply_fd: int) -> int:
    """The worker process of one engine: load, say "ready", then answer the parent's commands
    (one JSON object per line on stdin: prefill, decode, finish) with one JSON line each on
    ``reply_fd``. Only the parent decides when this process computes, so engines never overlap."""
    import traceback

    out = os.fdopen(reply_fd, "w", buffering=1)

    def reply(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:
        threads = settings["threads"]
        if engine != "llama.cpp":
            import torch

            torch.set_num_threads(threads)
        eng = WORKERS[engine](settings)
        ready: dict = {"import_s": eng.import_s, "load_s": eng.load_s, "rss_after_load_mib": rss_now_mib(),
                       "info": getattr(eng, "info", {})}
        P = settings["prompt_tokens"]
        own = eng.encode(prompt_text(P))[:P]
        if len(own) < P:
            raise RuntimeError(f"prompt text gave only {len(own)} tokens, {P} needed")
        ref = settings.get("prompt_ids")
        ready["prompt_ids_match_reference"] = None if ref is None else own == ref
        ids = ref if ref is not None else own
        ready["prompt_ids"] = ids
        max_len = P + settings["decode_tokens"]
        reply(ready)
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "prefill":
                t = time.perf_counter()
                logits = eng.prefill(ids, max_len)
                dt = time.perf_counter() - t
                reply({"s": dt, "argmax": int(logits.argmax())})
            elif cmd["op"] == "decode":
                times, toks = eng.decode(ids, cmd["steps"])
                reply({"step_s": times, "ids": toks})
            elif cmd["op"] == "finish":
                reply({"peak_rss_mib": peak_rss_mib()})
                return 0
            else:
                raise ValueError(f"unknown command {cmd!r}")
    except Exception:
        reply({"error": traceback.format_exc()})
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------

def child_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["PYTHONWARNINGS"] = "ignore"
    return env


class CpuMeter:
    """CPU used by *other* processes while we measure, in cores: (all busy CPU time on the machine,
    from /proc/stat) minus (ours and our reaped children's, from getrusage), over wall time. On a
    machine with as many cores as threads, anything above ~0.1 means the figures are contended."""

    def __init__(self, workers: list | tuple = ()):
        self.workers = list(workers)  # live Worker processes: their CPU is ours too
        self.t, self.busy, self.mine = time.perf_counter(), self._busy(), self._mine()

    @staticmethod
    def _busy() -> float:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return float("nan")
        # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")

    def _mine(self) -> float:
        import resource

        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                      resource.getrusage(resource.RUSAGE_CHILDREN))
                   ) + sum(w.cpu_s() for w in self.workers)

    def other(self) -> tuple[float, float]:
        """(CPU seconds used by other processes, wall seconds) since the meter started."""
        wall = time.perf_counter() - self.t
        return max(0.0, (self._busy() - self.busy) - (self._mine() - self.mine)), wall

    def other_cores(self) -> float:
        cpu, wall = self.other()
        return cpu / wall if wall > 0 else float("nan")


def wait_idle(max_wait: float, t0: float, workers: list | tuple = (), threshold: float = BUSY_CORES,
              window: float = 3.0) -> float:
    """Wait (at most ``max_wait`` s) until other processes use < ``threshold`` cores over ``window`` s;
    returns the last measured load."""
    start = time.perf_counter()
    said = -1e9
    while True:
        m = CpuMeter(workers)
        time.sleep(window)
        load = m.other_cores()
        now = time.perf_counter()
        if load < threshold or now - start >= max_wait:
            return load
        if now - said >= 30:
            log(f"machine busy ({load:.2f} cores used by other processes): waiting "
                f"(up to {max_wait - (now - start):.0f} s more)", t0)
            said = now


def maybe_wait_idle(args: argparse.Namespace, t0: float, workers: list | tuple = ()) -> None:
    """Wait for an idle machine out of what is left of the run's --wait-idle budget."""
    if args.wait_idle > 0:
        start = time.perf_counter()
        wait_idle(args.wait_idle, t0, workers)
        waited = time.perf_counter() - start
        args.wait_idle -= waited
        args.waited_s = getattr(args, "waited_s", 0.0) + waited


def engine_available(engine: str) -> str | None:
    """None when the engine can run here, else why not."""
    import importlib.util

    mod = {"opengemma": "opengemma", "transformers": "transformers", "llama.cpp": "llama_cpp"}[engine]
    if importlib.util.find_spec(mod) is None:
        return "llama-cpp-python not installed" if engine == "llama.cpp" else f"{mod} not installed"
    return None


class Worker:
    """One engine's worker process (this script with ``--worker``), driven command by command."""

    def __init__(self, engine: str, settings: dict, threads: int, timeout: float):
        self.engine, self.timeout = engine, timeout
        self.log = tempfile.TemporaryFile()  # its stdout and stderr: progress bars, warnings, tracebacks
        r, w = os.pipe()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine,
               "--worker-reply-fd", str(w), "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, env=child_env(threads), stdin=subprocess.PIPE, stdout=self.log,
                                     stderr=subprocess.STDOUT, pass_fds=(w,), text=True)
        os.close(w)
        self.replies = os.fdopen(r, "r")
        self.proc.stdin.write(json.dumps(settings) + "\n")
        self.proc.stdin.flush()

    def _read(self) -> dict:
        import select

        ready, _, _ = select.select([self.replies], [], [], self.timeout)
        line = self.replies.readline() if ready else ""
        if line:
            return json.loads(line)
        if not ready:
            self.proc.kill()
        code = self.proc.wait()
        self.log.seek(0)
        tail = "\n".join(self.log.read().decode(errors="replace").strip().splitlines()[-15:])
        how = ("timed out" if not ready else f"crashed ({signal.Signals(-code).name})" if code < 0
               else f"exited with {code}")
        return {"error": f"worker {how}:\n{tail}"}

    def ready(self) -> dict:
        return self._read()

    def ask(self, op: str, **kw) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died; _read reports how
        return self._read()

    def cpu_s(self) -> float:
        """CPU time of the live worker (all its threads), from /proc/PID/stat."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        except (OSError, ValueError, IndexError):
            return 0.0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.replies.close()
        self.log.close()


def cold_start(engine: str, gguf: str, threads: int) -> None:
    """What the fresh ``python -c`` process runs: import the engine, load, generate one token."""
    if engine == "llama.cpp":
        import llama_cpp

        llm = llama_cpp.Llama(model_path=gguf, n_ctx=256, n_threads=threads, n_threads_batch=threads,
                              verbose=False)
        llm(COLD_PROMPT, max_tokens=1, temperature=0.0)
        return
    import torch

    torch.set_num_threads(threads)
    if engine == "opengemma":
        import opengemma

        g = opengemma.load(gguf, dtype="float32", device="cpu")
        g.generate(COLD_PROMPT, max_new_tokens=1)
    else:
        model, tok, _ = hf_load(gguf)
        with torch.inference_mode():
            model.generate(**tok(COLD_PROMPT, return_tensors="pt"), max_new_tokens=1, do_sample=False)


def cold_start_code(engine: str, gguf: str, threads: int) -> str:
    """``python -c`` source: this file's directory on sys.path (its import is stdlib only)."""
    here = str(Path(__file__).resolve().parent)
    return (f"import sys; sys.path.insert(0, {here!r}); import bench_inference; "
            f"bench_inference.cold_start({engine!r}, {gguf!r}, {threads})")


def run_cold_start(engine: str, gguf: str, args: argparse.Namespace) -> dict:
    """Spawn-to-exit wall time of 'import + load + 1 token' in fresh processes; wait4 gives the peak RSS."""
    runs = []
    for _ in range(args.cold_runs):
        code = cold_start_code(engine, gguf, args.threads)
        errf = tempfile.TemporaryFile()  # a file, not a pipe: a chatty child cannot block on it
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code], env=child_env(args.threads),
                                stdout=subprocess.DEVNULL, stderr=errf)
        # wait4 (not proc.wait) so that the child's own resource usage comes back with its status.
        deadline = t + args.timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        errf.seek(0)
        err = errf.read().decode(errors="replace")
        errf.close()
        if proc.returncode != 0:
            tail = "\n".join(err.strip().splitlines()[-10:])
            return {"error": f"cold start exited with {proc.returncode}:\n{tail}", "runs_s": [r["s"] for r in runs]}
        runs.append({"s": wall, "peak_rss_mib": ru.ru_maxrss / 1024})
    return {"runs_s": [r["s"] for r in runs], "s": runs[-1]["s"], "peak_rss_mib": runs[-1]["peak_rss_mib"]}


def summarize(res: dict, P: int, D: int) -> dict:
    """Medians and rates from one worker's raw timings."""
    pre = sorted(res["prefill_s"])
    dec_tps = sorted(D / sum(r) for r in res["decode_step_s"])
    steps = sorted(t for r in res["decode_step_s"] for t in r)
    out = {
        "import_s": res["import_s"],
        "load_s": res["load_s"],
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
    return out


def agreement(ref: list[int] | None, other: list[int] | None) -> str:
    if not ref or not other:
        return "n/a"
    n = 0
    for a, b in zip(ref, other):
        if a != b:
            break
        n += 1
    total = min(len(ref), len(other))
    return f"{n}/{total}" + ("" if n == total else f" (first diff at step {n})")


def fmt(v, nd=1) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    return f"{v:,.{nd}f}"


ROWS = (  # (key, label, digits, higher is better)
    ("import_s", "import (s)", 2, False),
    ("load_s", "load until ready, in-process (s)", 2, False),
    ("cold_s", "cold start to first token, fresh process (s)", 2, False),
    ("cold_peak_rss_mib", "peak RSS of the cold start (MiB)", 0, False),
    ("prefill_ms", "prefill {P} tok, median (ms)", 1, False),
    ("prefill_tps", "prefill (tok/s)", 1, True),
    ("decode_tps", "decode {D} tok, median (tok/s)", 2, True),
    ("decode_ms_per_token_median", "decode per token, median (ms)", 2, False),
    ("decode_ms_per_token_p90", "decode per token, p90 (ms)", 2, False),
    ("rss_after_load_mib", "RSS after load (MiB)", 0, False),
    ("peak_rss_mib", "peak RSS of the bench worker (MiB)", 0, False),
    ("other_load_cores", "other processes' CPU during the worker (cores)", 2, None),
    ("cold_other_load_cores", "other processes' CPU during the cold starts (cores)", 2, None),
)


def make_table(report: dict) -> str:
    P, D = report["settings"]["prompt_tokens"], report["settings"]["decode_tokens"]
    ok = [e for e in report["engines"] if "summary" in report["results"][e]]
    peers = [e for e in ok if e != "opengemma"]
    has_ref = "opengemma" in ok
    head = ["figure"] + ok + ([f"opengemma/{p}" for p in peers] if has_ref else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, nd, _higher in ROWS:
        vals = {e: report["results"][e]["summary"].get(key) for e in ok}
        row = [label.format(P=P, D=D)] + [fmt(vals[e], nd) for e in ok]
        if has_ref:
            for p in peers:
                if _higher is None:  # a condition of the measurement, not a figure to compare
                    row.append("")
                    continue
                a, b = vals["opengemma"], vals[p]
                row.append(f"{a / b:.2f}×" if a is not None and b else "—")
        lines.append("| " + " | ".join(row) + " |")
    # correctness rows
    row = ["prompt token ids = opengemma's"] + [
        {True: "yes", False: "NO", None: "(reference)"}[report["results"][e].get("prompt_ids_match_reference")]
        for e in ok] + ([""] * len(peers) if has_ref else [])
    lines.append("| " + " | ".join(row) + " |")
    ref_ids = report["results"].get("opengemma", {}).get("decode_ids")
    row = ["greedy tokens agreeing with opengemma"] + [
        "(reference)" if e == "opengemma" else agreement(ref_ids, report["results"][e].get("decode_ids"))
        for e in ok] + ([""] * len(peers) if has_ref else [])
    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def contended(report: dict, threshold: float = BUSY_CORES) -> list[str]:
    """Measurements during which other processes used more than ``threshold`` cores."""
    out = []
    for e in report["engines"]:
        summ = report["results"][e].get("summary", {})
        for key, what in (("other_load_cores", "bench"), ("cold_other_load_cores", "cold start")):
            v = summ.get(key)
            if v is not None and v > threshold:
                out.append(f"{e} {what} ({v:.2f} cores)")
    return out


def git_state() -> dict:
    """The commit measured, and whether the package had uncommitted changes (read-only git calls)."""
    root = Path(__file__).resolve().parent.parent

    def git(*a: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    dirty = git("status", "--porcelain", "--", "opengemma")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "opengemma_uncommitted_changes": None if dirty is None else bool(dirty)}


def machine_info(threads: int) -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    info = {"cpu": cpu, "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch": torch.__version__, "threads": threads, "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def write_record(report: dict, table: str, name: str) -> tuple[Path, Path]:
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / f"{name}.json", out_dir / f"{name}.md"
    jpath.write_text(json.dumps(report, indent=1) + "\n")
    m, s = report["machine"], report["settings"]
    notes = [f"- {e}: {report['results'][e].get('skipped') or report['results'][e].get('error', '').splitlines()[0]}"
             for e in report["engines"] if "summary" not in report["results"][e]]
    peer_info = {e: report["results"][e].get("info") for e in report["engines"] if report["results"][e].get("info")}
    md = [f"# bench_inference: {name}", "",
          f"- date: {report['date']}",
          f"- machine: {m['cpu']}, {m['usable_cores']} usable cores ({m['logical_cores']} logical), "
          f"{m.get('mem_total_gib', '?')} GiB RAM; {m['platform']}",
          f"- software: Python {m['python']}, torch {m['torch']}, threads {m['threads']}"
          + "".join(f"; {k} {v}" for i in peer_info.values() for k, v in i.items()),
          f"- model: {report['model']} (embedded Gemma 3 270M, Q4_K_M, run in fp32 by the PyTorch engines)",
          f"- settings: batch 1, prompt {s['prompt_tokens']} tokens, decode {s['decode_tokens']} tokens greedy, "
          f"{s['prefill_reps']} prefill reps, {s['decode_reps']} decode reps, cold start run "
          f"{s['cold_runs']} of {s['cold_runs']}{', --quick' if s['quick'] else ''}",
          f"- command: `{report['command']}`",
          f"- opengemma: commit {report['git']['commit']}"
          + (" with uncommitted changes in opengemma/" if report["git"]["opengemma_uncommitted_changes"] else ""),
          f"- wall time of the whole run: {report['total_s']:.0f} s"
          + (f", of which {report['waited_idle_s']:.0f} s waiting for an idle machine (--wait-idle)"
             if report.get("waited_idle_s") else ""), "",
          table, "",
          "Ratios are opengemma/peer: above 1 is better for opengemma on tok/s rows, below 1 on s, ms "
          "and MiB rows. Raw timings (every repetition, every decode step) are in "
          f"`{jpath.name}`.", ""]
    if notes:
        md += ["Not measured:", ""] + notes + [""]
    busy = contended(report)
    if busy:
        md += ["**Contended:** other processes used CPU during " + ", ".join(busy) +
               "; those figures are pessimistic.", ""]
    mpath.write_text("\n".join(md))
    return jpath, mpath


def log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _rotate(items: list, k: int) -> list:
    k %= max(1, len(items))
    return items[k:] + items[:k]


def measure_engines(args: argparse.Namespace, settings: dict, report: dict, t0: float) -> None:
    """Load every engine in its own worker process, one after the other, then time them in
    alternation, repetition by repetition (the engine going first rotates), so that a change of
    machine load over the run affects every engine alike; then the cold starts, one at a time."""
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

    ref_ids = None
    try:
        # opengemma first: its prompt ids become every engine's input, its greedy tokens the reference.
        for engine in sorted(args.engines, key=lambda e: e != "opengemma"):
            why = engine_available(engine)
            if why:
                print(f"{why}: skipped", flush=True)
                results[engine] = {"skipped": why}
                continue
            maybe_wait_idle(args, t0, list(workers.values()))
            log(f"{engine}: loading in its own process ...", t0)
            w = Worker(engine, {**settings, "prompt_ids": ref_ids}, args.threads, args.timeout)
            workers[engine] = w
            ready = timed(engine, w.ready)
            if "error" in ready:
                failed(engine, ready["error"])
                continue
            results[engine] = {"engine": engine, **ready, "prefill_s": [], "decode_step_s": []}
            if engine == "opengemma":
                ref_ids = ready["prompt_ids"]
            log(f"{engine}: loaded in {ready['load_s']:.2f} s; warming up", t0)
            for op, kw in (("prefill", {}), ("decode", {"steps": min(8, D)})):
                r = timed(engine, lambda: w.ask(op, **kw))
                if "error" in r:
                    failed(engine, r["error"])
                    break
        if workers:
            maybe_wait_idle(args, t0, list(workers.values()))
        order = list(workers)
        log(f"prefill {P} tokens x{args.prefill_reps}, alternating {', '.join(order)} ...", t0)
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
                if "decode_ids" not in res:
                    res["decode_ids"] = r["ids"]
                elif r["ids"] != res["decode_ids"]:
                    res["decode_nondeterministic"] = True
        for engine in list(workers):
            r = workers[engine].ask("finish")
            if "error" in r:
                failed(engine, r["error"])
                continue
            results[engine]["peak_rss_mib"] = r["peak_rss_mib"]
            cpu, wall = other[engine]
            results[engine]["other_load_cores"] = cpu / wall if wall > 0 else None
            results[engine]["summary"] = summarize(results[engine], P, D)
            s = results[engine]["summary"]
            log(f"{engine}: prefill {s['prefill_tps']:.0f} tok/s, decode {s['decode_tps']:.1f} tok/s, "
                f"peak RSS {s['peak_rss_mib']:.0f} MiB", t0)
    finally:
        for w in workers.values():
            w.close()

    if not args.cold_runs:
        return
    for engine in args.engines:
        res = results[engine]
        if "summary" not in res:
            continue
        maybe_wait_idle(args, t0)
        log(f"{engine}: cold start x{args.cold_runs} ...", t0)
        meter = CpuMeter()
        cold = run_cold_start(engine, settings["gguf"], args)
        cold["other_load_cores"] = meter.other_cores()
        res["cold_start"] = cold
        if "error" in cold:
            print(f"{engine}: cold start FAILED\n{cold['error']}", file=sys.stderr, flush=True)
            continue
        res["summary"].update(cold_s=cold["s"], cold_peak_rss_mib=cold["peak_rss_mib"],
                              cold_other_load_cores=cold["other_load_cores"])
        log(f"{engine}: cold start {cold['s']:.2f} s (runs {', '.join(f'{x:.2f}' for x in cold['runs_s'])})", t0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        settings = json.loads(sys.stdin.readline())
        return serve_worker(args.worker, settings, args.worker_reply_fd)

    t0 = time.perf_counter()
    from opengemma.embedded import embedded_path

    gguf = str(embedded_path())
    P, D = args.prompt_tokens, args.decode_tokens
    settings = {"gguf": gguf, "threads": args.threads, "prompt_tokens": P, "decode_tokens": D}
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(([f"PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else [])
                                  + [Path(sys.executable).name] + sys.argv),
              "machine": machine_info(args.threads), "git": git_state(), "model": Path(gguf).name,
              "settings": {**settings, "prefill_reps": args.prefill_reps, "decode_reps": args.decode_reps,
                           "cold_runs": args.cold_runs, "quick": args.quick},
              "engines": args.engines, "results": {}}
    measure_engines(args, settings, report, t0)
    report["total_s"] = time.perf_counter() - t0
    report["waited_idle_s"] = getattr(args, "waited_s", 0.0)

    m = report["machine"]
    print(f"\n{m['cpu']}, {m['usable_cores']} cores, torch {m['torch']}, threads {args.threads}; "
          f"batch 1, fp32, prompt {P} tokens, decode {D} tokens (greedy)\n")
    table = make_table(report)
    print(table)
    print(f"\nratio = opengemma/peer (tok/s: >1 is better for opengemma; s, ms, MiB: <1 is). "
          f"Total {report['total_s']:.0f} s"
          + (f", of which {report['waited_idle_s']:.0f} s waiting for an idle machine." if report["waited_idle_s"] else "."))
    busy = contended(report)
    if busy:
        print(f"WARNING: other processes used CPU during {', '.join(busy)}: those figures are contended "
              "(rerun on an idle machine, e.g. with --wait-idle 600)")
    if args.record:
        jpath, mpath = write_record(report, table, args.record)
        print(f"recorded: {jpath}, {mpath}")
    failed = [e for e in args.engines if "error" in report["results"][e]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
