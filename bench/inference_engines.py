"""The engine processes of ``bench_inference.py``: engines, fixed texts, worker, cold start.

Each engine runs in its own worker process: this file run as a script,
``python inference_engines.py ENGINE REPLY_FD``, started and driven by :class:`Worker` in the
parent. The parent sends the settings as one JSON line on stdin, then commands, one JSON line
each; every reply is one JSON line on the file descriptor REPLY_FD (stdout and stderr stay free for
the engines' own chatter). Commands: ``prefill``, ``decode`` (``steps``), ``stats`` (peak RSS so
far), ``ppl`` (perplexity on the fixed text, untimed; a failure is reported and the worker goes
on) and ``finish``. The cold-start processes (``python -c``, :func:`run_cold_start_once`) import this
module and call :func:`cold_start`. Importing this module takes only the standard library: each
engine imports its own packages (torch included) when it is built, so a llama.cpp cold start never
pays for torch.

Engines: the opengemma variants of :data:`VARIANTS` (one class, parameterised by dtype,
quantization and compilation; ``opengemma`` in fp32 is the reference of prompt ids and greedy
tokens), the speculative engines of :data:`SPECULATIVE` (a variant decoding with prompt-lookup
speculation, ``opengemma.speculative``; those of :data:`DRAFTED` with a trained draft head,
``opengemma.draft``), and the peers of ``inference_peers.py``: Hugging Face
transformers (the GGUF dequantized to fp32) and llama.cpp through llama-cpp-python (the Q4_K_M file
as it is).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from inference_peers import LlamaCppEngine, TransformersEngine, hf_load  # stdlib only at import

# opengemma variants: the keyword arguments of opengemma.load (device="cpu" besides); a cold start
# of a variant loads with the same options.
VARIANTS = {
    "opengemma": {"dtype": "float32"},
    "opengemma-bf16": {"dtype": "bfloat16"},
    "opengemma-int8": {"dtype": "float32", "quantize": "int8"},
    "opengemma-int4": {"dtype": "float32", "quantize": "int4"},
    "opengemma-int4-bf16": {"dtype": "bfloat16", "quantize": "int4"},
    "opengemma-int4-compile": {"dtype": "float32", "quantize": "int4", "compile": True},
    "opengemma-int4-bf16-compile": {"dtype": "bfloat16", "quantize": "int4", "compile": True},
    "opengemma-mixed": {"dtype": "float32", "quantize": "mixed"},
    "opengemma-mixed-bf16": {"dtype": "bfloat16", "quantize": "mixed"},
    # PyTorch's weight-only kernels (bf16 activations) instead of opengemma's native int8 x int8
    # ones, which every quantized variant above uses where the CPU allows (opengemma.quant.native)
    "opengemma-mixed-bf16-torch": {"dtype": "bfloat16", "quantize": "mixed", "kernels": "torch"},
    "opengemma-int8-torch": {"dtype": "float32", "quantize": "int8", "kernels": "torch"},
    "opengemma-mixed-bf16-compile": {"dtype": "bfloat16", "quantize": "mixed", "compile": True},
}
# Speculative engines: "<variant>-spec" loads as the variant and decodes with lossless speculative
# decoding (prompt-lookup drafts, up to the settings' "speculate" per forward: what `opengemma
# generate --speculate K` runs). Its prefill, perplexity and cold start are the variant's.
SPECULATIVE = {f"{v}-spec": v for v in ("opengemma", "opengemma-bf16", "opengemma-int8", "opengemma-mixed",
                                         "opengemma-mixed-bf16")
               if v in VARIANTS}
# Draft-head engines: "<variant>-draft" decodes as "-spec" does, with the trained draft head of the
# settings' "draft" directory (bench_inference --draft DIR; `opengemma generate --draft DIR`) instead
# of prompt lookup; skipped without one. bf16 first: there a k + 1-row forward costs ~1.1x one row.
DRAFTED = {f"{v}-draft": v for v in ("opengemma-bf16", "opengemma-mixed-bf16", "opengemma") if v in VARIANTS}
SPECULATIVE.update(DRAFTED)
# What `opengemma generate` runs with no flags (--quantize auto --speculate auto on this GGUF: mixed
# + bf16 with prompt lookup). It decodes as "opengemma-mixed-bf16-spec"; its cold start is the
# command's own (`opengemma generate PROMPT -n 1`: argument parsing and the auto choice included).
DEFAULT_ENGINE = "opengemma-default"
SPECULATIVE[DEFAULT_ENGINE] = "opengemma-mixed-bf16"
OWN_COLD_START = (DEFAULT_ENGINE,)
ENGINES = (*VARIANTS, *SPECULATIVE, "transformers", "llama.cpp")
REFERENCE = "opengemma"  # fp32: its prompt ids are every engine's input, its greedy tokens the reference

# A fixed, realistic English text: three distinct paragraphs, cycled until long enough, then cut
# to exactly the wanted number of tokens (BOS included): the prompt (and the perplexity text when
# --ppl-text names no file).
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
# The chat prompt set (bench_inference --decode-prompts chat): user turns in opengemma's chat format
# (the reference engine's ids feed every engine), each decoded for --decode-tokens tokens: text
# that repeats its prompt less than the cycled paragraphs do.
CHAT_PROMPTS = (
    "Explain in a few sentences why the sky is blue.",
    "Write a short Python function that checks whether a number is prime, then explain how it works.",
    "Summarize this paragraph in two sentences:\n\n" + PARAGRAPHS[1],
    "Give me a numbered list of five practical tips for sleeping better.",
)


# ---------------------------------------------------------------------------------------------
# worker side: texts, engines, the worker process, the cold start
# ---------------------------------------------------------------------------------------------

class Skipped(Exception):
    """The engine cannot run with this installation (reported as skipped, not as a failure)."""


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


def variant_of(engine: str) -> str | None:
    """The :data:`VARIANTS` entry an opengemma engine loads as (a speculative one: its variant)."""
    engine = SPECULATIVE.get(engine, engine)
    return engine if engine in VARIANTS else None


def load_variant(engine: str, gguf: str):
    """A model loaded as the commands load it, with the options of one :data:`VARIANTS` entry
    (worker and cold start)."""
    import opengemma

    opts = dict(VARIANTS[variant_of(engine)])
    if opts.get("compile"):
        import inspect

        if "compile" not in inspect.signature(opengemma.load).parameters:
            raise Skipped("opengemma.load has no compile option")
    else:
        opts.pop("compile", None)  # keeps the other variants loadable by an opengemma without it
    if opts.get("kernels") == "torch":
        import inspect

        if "kernels" not in inspect.signature(opengemma.load).parameters:
            opts.pop("kernels")  # an opengemma before the native kernels: PyTorch's were the only ones
    try:  # as the commands load (their process settings included): what `opengemma generate` runs
        from opengemma.process import load_for_command
    except ImportError:  # an opengemma whose load() applied them itself
        return opengemma.load(gguf, device="cpu", **opts)
    return load_for_command(gguf, device="cpu", **opts)


class _OpenGemma:
    """An opengemma variant: ``load_variant``, ``generate.prefill`` (logits_at),
    ``generate.decode_step`` (through the compiled step for ``compile``), ``logprobs.perplexity``."""

    def __init__(self, s: dict, engine: str):
        import torch

        self.torch = torch
        t = time.perf_counter()
        import opengemma
        from opengemma import generate as gen

        self.import_s = time.perf_counter() - t
        self.gen = gen
        try:  # greedy as generate() picks it (a chunked argmax on the CPU)
            from opengemma.sampling import argmax as fast_argmax

            self.argmax = fast_argmax
        except ImportError:  # an opengemma without it
            self.argmax = lambda x: x.argmax(-1)
        t = time.perf_counter()
        self.g = load_variant(engine, s["gguf"])
        self.load_s = time.perf_counter() - t
        self.compiled = getattr(self.g.model, "compiled_decode", None) is not None
        self.info = {"load_options": VARIANTS[variant_of(engine)], "compiled_decode": self.compiled,
                     "opengemma": getattr(opengemma, "__version__", "?")}
        try:  # weights one decode step reads (quant.decode_weight_bytes): effective GB/s = this x tok/s
            from opengemma.quant import decode_weight_bytes

            self.info["decode_weight_bytes"] = decode_weight_bytes(self.g.model)
        except ImportError:  # an opengemma without it
            pass
        self.cache, self.cache_for = None, None

    def encode(self, text: str) -> list[int]:
        return self.g.tokenizer.encode(text, bos=True)

    def chat_ids(self, prompts) -> list[list[int]]:
        """Each prompt as a user turn awaiting the model's reply, in the chat format."""
        from opengemma.chat import format_chat

        return [format_chat(self.g.tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True).ids
                for p in prompts]

    def _cache_len(self, max_len: int) -> int:
        """Slots as generate() would allocate them: a compiled model rounds up to a power of two
        (generate.cache_length(pow2=True)), so that its graph meets few shapes."""
        if not self.compiled:
            return max_len
        from types import SimpleNamespace

        row = SimpleNamespace(prompt_tokens=max_len, max_new_tokens=0)
        try:
            return self.gen.cache_length([row], self.g.config.context_length, pow2=True)
        except TypeError:  # an opengemma without pow2
            return max_len

    def _new_cache(self, max_len: int):
        return self.g.model.make_cache(1, self._cache_len(max_len))

    def prefill(self, ids: list[int], max_len: int):
        with self.torch.inference_mode():
            if self.cache_for != max_len:  # one cache per worker: the compiled step sees one shape
                self.cache = self._new_cache(max_len)
                self.cache_for = max_len
            return self.gen.prefill(self.g.model, self.cache, [ids])  # [1, V], resets the row first

    def decode(self, ids: list[int], steps: int, max_len: int) -> tuple[list[float], list[int]]:
        torch = self.torch
        model, P = self.g.model, len(ids)
        logits = self.prefill(ids, max_len)
        times, out = [], []
        with torch.inference_mode():
            tok = torch.zeros((1, 1), dtype=torch.long)
            pos = torch.zeros((1, 1), dtype=torch.long)
            for i in range(steps):
                t = time.perf_counter()
                nxt = self.argmax(logits)  # [1]
                out.append(nxt.item())
                tok.copy_(nxt[:, None])
                pos.fill_(P + i)
                logits = self.gen.decode_step(model, tok, pos, self.cache)  # [1, V]
                times.append(time.perf_counter() - t)
            out.append(int(self.argmax(logits).item()))
        return times, out

    def late_info(self) -> dict:
        """After the timed runs: whether torch.compile fell back to eager, or to inductor's Python
        wrapper (opengemma.compiled); for a screened head (``quantize="mixed"``) the rows it
        screened and how many fell back to the full 8-bit head."""
        info = {}
        stats = getattr(self.g.model.embed, "stats", None)
        if stats is not None:
            info["head_screen"] = {"rows": stats.rows, "fallbacks": stats.fallbacks}
        if not self.compiled:
            return info
        cd = self.g.model.compiled_decode
        return {**info, "compile_error": cd.error, "cpp_wrapper_error": getattr(cd, "cpp_error", None)}

    def ppl(self, ids: list[int]) -> float:
        from opengemma.logprobs import perplexity

        self.cache, self.cache_for = None, None
        # Native kernels take decode-sized calls only: score in forwards of that size, so that the
        # figure is what decoding computes (bulk forwards would run PyTorch's kernels).
        chunk = 512
        if any(getattr(m, "native", False) for m in self.g.model.modules()):
            from opengemma.quant.native import MAX_ROWS as chunk
        with self.torch.inference_mode():
            return perplexity(self.g.model, ids, chunk=chunk)


class _OpenGemmaSpec(_OpenGemma):
    """A variant decoding speculatively: ``SpeculativeDecoder`` (prompt-lookup drafts, or for a
    ``-draft`` engine the draft head's, adaptive draft length, at most ``speculate`` per forward)
    over a cache with spare ring slots, greedy. Each forward is timed (drafting included) and its
    time spread over the tokens it yields, so the per-token times sum to the loop's time as the
    plain decode's do; ``last_decode_stats`` holds the forwards, drafted and accepted tokens of the
    latest decode."""

    def __init__(self, s: dict, engine: str):
        self.drafter = None
        if engine in DRAFTED and not s.get("draft"):
            raise Skipped("a draft-head engine needs --draft DIR (opengemma train draft)")
        super().__init__(s, engine)
        self.k = s["speculate"]
        self.info["speculate"] = self.k
        self.last_decode_stats = None
        if engine in DRAFTED:
            from opengemma.draft import load_drafter

            self.drafter = load_drafter(s["draft"], self.g.model)
            self.info["draft"] = str(s["draft"])

    def _new_cache(self, max_len: int):
        from opengemma.speculative import SpeculativeDecoder

        return SpeculativeDecoder.make_cache(self.g.model, self._cache_len(max_len), self.k)

    def decode(self, ids: list[int], steps: int, max_len: int) -> tuple[list[float], list[int]]:
        from opengemma.generate import GenerationConfig
        from opengemma.speculative import SpeculativeDecoder

        if self.cache_for != max_len:
            self.cache, self.cache_for = self._new_cache(max_len), max_len
        dec = SpeculativeDecoder(self.g.model, self.cache, GenerationConfig(speculate=self.k), ids,
                                 drafter=self.drafter)
        logits = dec.prefill()  # untimed, as the plain decode's prefill (a draft head reads the prompt's states)
        t = time.perf_counter()
        out = [int(logits.argmax(-1))]  # as the plain decode's first step: from the prefill's logits
        dec.context += out
        times = []
        first = time.perf_counter() - t  # the argmax and the set-up go to the first forward's tokens
        while len(out) <= steps:
            t = time.perf_counter()
            got = dec.step(steps + 1 - len(out), len(out) + 1).tokens
            dt = time.perf_counter() - t + first
            first = 0.0
            out += got
            times += [dt / len(got)] * len(got)
        self.last_decode_stats = {"forwards": dec.forwards, "drafted": dec.drafted, "accepted": dec.accepted,
                                  "tokens": steps}
        return times, out


def engine_available(engine: str) -> str | None:
    """None when the engine's package is importable here, else why not."""
    import importlib.util

    mod = "opengemma" if variant_of(engine) else {"transformers": "transformers", "llama.cpp": "llama_cpp"}[engine]
    if importlib.util.find_spec(mod) is None:
        return "llama-cpp-python not installed" if engine == "llama.cpp" else f"{mod} not installed"
    return None


def make_engine(engine: str, settings: dict):
    cls = (_OpenGemmaSpec if engine in SPECULATIVE else _OpenGemma if engine in VARIANTS
           else {"transformers": TransformersEngine, "llama.cpp": LlamaCppEngine}[engine])
    return cls(settings, engine)


def serve_worker(engine: str, settings: dict, reply_fd: int) -> int:
    """The worker process of one engine: load, say "ready" (or "skipped"), then answer the
    parent's commands (one JSON object per line on stdin) with one JSON line each on ``reply_fd``.
    Only the parent decides when this process computes, so engines never overlap."""
    import traceback

    out = os.fdopen(reply_fd, "w", buffering=1)

    def reply(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:
        if engine != "llama.cpp":
            import torch

            torch.set_num_threads(settings["threads"])
        try:
            eng = make_engine(engine, settings)
        except Skipped as e:
            reply({"skipped": str(e)})
            return 0
        ready: dict = {"import_s": eng.import_s, "load_s": eng.load_s, "rss_after_load_mib": rss_now_mib(),
                       "info": getattr(eng, "info", {})}
        texts = {}  # name -> the ids this engine is fed
        for name, n in (("prompt", settings["prompt_tokens"]), ("ppl", settings["ppl_tokens"])):
            if not n:
                continue
            text = settings.get("ppl_text") if name == "ppl" else None
            own = eng.encode(text or prompt_text(n))[:n]
            if len(own) < n:
                raise RuntimeError(f"{name} text gave only {len(own)} tokens, {n} needed")
            ref = settings.get(f"{name}_ids")
            ready[f"{name}_ids_match_reference"] = None if ref is None else own == ref
            texts[name] = ready[f"{name}_ids"] = ref if ref is not None else own
        ids = texts["prompt"]
        decode_set = [ids]  # the prompts a decode command decodes after, one after the other
        if settings.get("decode_prompts") == "chat":
            decode_set = settings.get("chat_ids")
            if decode_set is None:
                if not hasattr(eng, "chat_ids"):
                    raise RuntimeError("the chat prompt set needs an opengemma engine to format it first")
                decode_set = ready["chat_ids"] = eng.chat_ids(CHAT_PROMPTS)
        max_len = max(len(p) for p in [ids, *decode_set]) + settings["decode_tokens"]
        reply(ready)
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "prefill":
                t = time.perf_counter()
                logits = eng.prefill(ids, max_len)
                dt = time.perf_counter() - t
                reply({"s": dt, "argmax": int(logits.argmax())})
            elif cmd["op"] == "decode":
                t = time.perf_counter()
                times, toks, spec = [], [], {}
                for prompt_ids in decode_set:
                    step_s, got = eng.decode(prompt_ids, cmd["steps"], max_len)
                    times, toks = times + step_s, toks + got
                    for key, v in (getattr(eng, "last_decode_stats", None) or {}).items():  # speculative engines
                        spec[key] = spec.get(key, 0) + v
                reply({"step_s": times, "ids": toks, "wall_s": time.perf_counter() - t,
                       **({"spec": spec} if spec else {})})
            elif cmd["op"] == "stats":
                reply({"peak_rss_mib": peak_rss_mib(), "info": getattr(eng, "late_info", dict)()})
            elif cmd["op"] == "ppl":  # a failure here is reported, and the worker goes on
                t = time.perf_counter()
                try:
                    reply({"ppl": eng.ppl(texts["ppl"]), "s": time.perf_counter() - t,
                           "peak_rss_mib": peak_rss_mib()})
                except Exception:
                    reply({"ppl_error": traceback.format_exc()})
            elif cmd["op"] == "finish":
                reply({"peak_rss_mib": peak_rss_mib()})
                return 0
            else:
                raise ValueError(f"unknown command {cmd!r}")
    except Exception:
        reply({"error": traceback.format_exc()})
        return 1
    return 0


# Not an engine: a fresh process that only imports torch, timed with the cold starts. It is the
# floor of any cold start that runs on PyTorch (opengemma's and transformers').
TORCH_IMPORT = "import torch"


def cold_start(engine: str, gguf: str, threads: int) -> None:
    """What the fresh ``python -c`` process runs: import the engine, load, generate one token (or,
    for :data:`TORCH_IMPORT`, import torch and nothing else)."""
    if engine == TORCH_IMPORT:
        import torch  # noqa: F401

        return
    if engine == "llama.cpp":
        import llama_cpp

        llm = llama_cpp.Llama(model_path=gguf, n_ctx=256, n_threads=threads, n_threads_batch=threads,
                              verbose=False)
        llm(COLD_PROMPT, max_tokens=1, temperature=0.0)
        return
    if engine in OWN_COLD_START:  # the command line itself (OMP_NUM_THREADS sets its threads)
        from opengemma.cli import main

        sys.exit(main(["generate", COLD_PROMPT, "-n", "1", "--model", gguf]))
    import torch

    torch.set_num_threads(threads)
    if variant_of(engine):
        g = load_variant(engine, gguf)
        g.generate(COLD_PROMPT, max_new_tokens=1)
    else:
        model, tok, _ = hf_load(gguf)
        with torch.inference_mode():
            model.generate(**tok(COLD_PROMPT, return_tensors="pt"), max_new_tokens=1, do_sample=False)


def cold_start_code(engine: str, gguf: str, threads: int) -> str:
    """``python -c`` source for :func:`cold_start`: this file's directory on sys.path (importing
    this module costs only the standard library)."""
    here = str(Path(__file__).resolve().parent)
    return (f"import sys; sys.path.insert(0, {here!r}); import inference_engines; "
            f"inference_engines.cold_start({engine!r}, {gguf!r}, {threads})")


# ---------------------------------------------------------------------------------------------
# parent side: starting and driving these processes
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


class Worker:
    """One engine's worker process (``inference_engines.py ENGINE FD``), driven command by command."""

    def __init__(self, engine: str, settings: dict, threads: int, timeout: float):
        import subprocess
        import tempfile

        self.engine, self.timeout = engine, timeout
        self.log = tempfile.TemporaryFile()  # its stdout and stderr: progress bars, warnings, tracebacks
        r, w = os.pipe()
        cmd = [sys.executable, str(Path(__file__).resolve()), engine, str(w)]
        self.proc = subprocess.Popen(cmd, env=child_env(threads), stdin=subprocess.PIPE, stdout=self.log,
                                     stderr=subprocess.STDOUT, pass_fds=(w,), text=True)
        os.close(w)
        self.replies = os.fdopen(r, "r")
        self.proc.stdin.write(json.dumps(settings) + "\n")
        self.proc.stdin.flush()

    def _read(self) -> dict:
        import select

        import signal

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


def run_cold_start_once(engine: str, gguf: str, threads: int, timeout: float) -> dict:
    """Spawn-to-exit wall time of 'import + load + 1 token' in one fresh process: ``{"s",
    "peak_rss_mib"}`` (wait4 gives the child's own peak RSS), or ``{"error"}``."""
    import subprocess
    import tempfile

    code = cold_start_code(engine, gguf, threads)
    errf = tempfile.TemporaryFile()  # a file, not a pipe: a chatty child cannot block on it
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], env=child_env(threads),
                            stdout=subprocess.DEVNULL, stderr=errf)
    # wait4 (not proc.wait) so that the child's own resource usage comes back with its status.
    deadline = t + timeout
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
        return {"error": f"cold start exited with {proc.returncode}:\n{tail}"}
    return {"s": wall, "peak_rss_mib": ru.ru_maxrss / 1024}


def summarize_cold_starts(runs: list[dict]) -> dict:
    """The first run warms the OS file cache and is not counted (unless it is the only one); the
    reported time is the median of the others, the peak RSS their largest."""
    counted = runs[1:] or runs
    times = sorted(r["s"] for r in counted)
    return {"runs_s": [r["s"] for r in runs], "s": times[len(times) // 2] if len(times) % 2 else
            (times[len(times) // 2 - 1] + times[len(times) // 2]) / 2,
            "peak_rss_mib": max(r["peak_rss_mib"] for r in counted), "counted_runs": len(counted)}


if __name__ == "__main__":
    # python inference_engines.py ENGINE REPLY_FD, settings as one JSON line on stdin (the parent
    # does this; not for direct use).
    if len(sys.argv) != 3 or sys.argv[1] not in ENGINES:
        sys.exit(f"usage: {Path(__file__).name} ENGINE REPLY_FD (started by bench_inference.py); "
                 f"ENGINE one of {', '.join(ENGINES)}")
    sys.exit(serve_worker(sys.argv[1], json.loads(sys.stdin.readline()), int(sys.argv[2])))
