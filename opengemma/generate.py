"""Text generation: batched prefill + static-shape decode over one preallocated KV cache.

Part of the inference side of report section "Model Architecture" (the decoder runs one token at
a time at per-row positions) and of instruction tuning (the formatter's ``<end_of_turn>`` ends a
model turn, so it is a stop token like EOS).

Layers, from low to high, each reusable on its own (the server's continuous batching builds on
the first three):

* :func:`decode_step` -- one token per row: tokens [B, 1], positions [B, 1] -> logits [B, V].
  Static shapes, no allocation in the cache: this is the function a later issue compiles.
* :func:`prefill` -- write prompts into chosen rows of a cache (right padding, position -1,
  chunked for long prompts) and return each row's next-token logits.
* :class:`RowState` -- one sequence's bookkeeping: generated ids, budget, stop ids, incremental
  detokenisation (StreamDecoder), stop-string holdback, finish reason.
* :func:`run_rows` -- drive prefill + decode for a list of rows and yield one :class:`StepEvent`
  per step; :func:`generate_tokens`, :func:`stream`, :func:`stream_text` and :func:`generate` are
  thin front ends over it. Non-finite logits (corrupt weights that passed the load check, or a
  dtype that overflows) end it with :class:`NonFiniteLogitsError` rather than sampling garbage;
  the check (:func:`finite_rows`) is one reduction per step, read back with the sampled ids.

``GenerationConfig.speculate`` = k > 0 turns on lossless speculative decoding for a single prompt
(:mod:`opengemma.speculative`: k drafted tokens verified per forward; same greedy tokens, same
sampling distribution); batches of several prompts decode plainly. Tokens still come out one
:class:`StepEvent` at a time, so streaming, stop tokens, stop strings and budgets behave as without
it. Every front end fills an optional :class:`GenerationStats` (tokens, prefill and decode time,
drafts accepted).

Sampling comes from :mod:`opengemma.sampling` with one explicit ``torch.Generator`` per call.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import OpenGemmaError
from .cache import KVCache
from .sampling import sample_next_token

CACHE_ROUND = 64  # cache lengths are rounded up to this, so nearby requests share shapes
PREFILL_CHUNK = 512  # longest prefill forward; bounds the [T, S] attention scores of long prompts
# top_k beyond any vocabulary means "no limit" to the sampler; the bound keeps it a C int (a
# 64-bit overflow in torch.topk was a crash). Seeds: what torch.Generator.manual_seed accepts.
MAX_TOP_K = 2**31 - 1
SEED_RANGE = (-(2**63), 2**64)
MAX_SPECULATE = 64  # drafted tokens per forward: beyond this a forward costs more than it can win


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. The library default is greedy (temperature 0): deterministic and what the
    report evaluates with; front ends (CLI, server) may choose a sampling default of their own.

    The one sampling-parameter type: the Python API, the command line, the server (one per
    choice of a request) and evaluation all describe a generation with it.

    ``max_new_tokens`` counts every sampled token, a final stop token included. ``top_k`` 0/None
    and ``top_p`` None/1.0 disable those filters. ``seed`` None draws a seed from ``os.urandom``.
    ``stop``: strings that end generation; the text is cut just before the first one.
    ``logprobs`` (serving): None reports none; k >= 0 the sampled token's log-probability plus the
    k most likely. ``ignore_eos``: keep going past end-of-sequence tokens (load tests; stop strings
    still apply). ``speculate``: draft tokens verified per forward (0 = off; :mod:`opengemma.speculative`,
    prompt-lookup drafts unless a drafter is given); lossless, used for single-prompt generation.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False
    speculate: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a lone string would otherwise become one stop per char
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise OpenGemmaError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise OpenGemmaError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        # NaN fails every comparison, so "not x >= 0" also rejects it; infinity is refused
        # explicitly (logits / inf are 0 or NaN).
        if (isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float))
                or not 0 <= self.temperature < math.inf):
            raise OpenGemmaError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or not 0 <= self.top_k <= MAX_TOP_K):
            raise OpenGemmaError(f"top_k must be an integer in 0..{MAX_TOP_K}, got {self.top_k!r}")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            raise OpenGemmaError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            raise OpenGemmaError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise OpenGemmaError("stop strings must be non-empty strings")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or self.logprobs < 0):
            raise OpenGemmaError(f"logprobs must be None or an integer >= 0, got {self.logprobs!r}")
        if (isinstance(self.speculate, bool) or not isinstance(self.speculate, int)
                or not 0 <= self.speculate <= MAX_SPECULATE):
            raise OpenGemmaError(f"speculate must be an integer in 0..{MAX_SPECULATE} (0 = off), "
                                 f"got {self.speculate!r}")


@dataclass
class Completion:
    """The result for one prompt. ``token_ids`` are the sampled tokens minus a final stop token
    (EOS / <end_of_turn>); after a stop *string* they keep every sampled token although ``text``
    is cut. ``completion_tokens`` counts every sampled token, a stop token included."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop token or stop string) or "length" (max_new_tokens)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class GenerationStats:
    """What one generation call did, filled in as it runs (pass one to a front end's ``stats``).

    ``prefill_s``: from the call's start to the first sampled token (the prompt's forward);
    ``decode_s``: from there to the last token, including the time the caller spends between
    streamed pieces. ``forwards`` counts decode forwards; with speculation each verifies
    ``drafted`` tokens in all, ``accepted`` of them kept. ``stopped`` counts the rows that ended on a
    stop token or string (the others ran out of tokens)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    stopped: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    forwards: int = 0
    speculate: int = 0
    drafted: int = 0
    accepted: int = 0
    rows: int = 1

    @property
    def decode_tokens(self) -> int:
        """Tokens from decode forwards: all but each row's first, which the prefill gives."""
        return max(0, self.generated_tokens - self.rows)

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_forward(self) -> float | None:
        return self.decode_tokens / self.forwards if self.forwards else None

    def summary(self) -> str:
        """A few lines for people (``opengemma generate --stats``)."""
        def rate(n: int, s: float) -> str:
            return f"{n / s:,.1f} tok/s" if s > 0 and n else "-"

        lines = [f"tokens: {self.prompt_tokens} prompt, {self.generated_tokens} generated",
                 f"prefill: {self.prompt_tokens} tokens in {self.prefill_s:.3f} s "
                 f"({rate(self.prompt_tokens, self.prefill_s)}, first token included)",
                 f"decode: {self.decode_tokens} tokens in {self.decode_s:.3f} s "
                 f"({rate(self.decode_tokens, self.decode_s)})"]
        if self.speculate:
            acc = f"{self.acceptance:.1%}" if self.acceptance is not None else "-"
            tpf = f"{self.tokens_per_forward:.2f}" if self.tokens_per_forward is not None else "-"
            lines.append(f"speculation (k={self.speculate}): acceptance {acc} ({self.accepted}/{self.drafted} "
                         f"drafted tokens), {tpf} tokens per forward ({self.forwards} forwards)")
        return "\n".join(lines)


@dataclass
class StepEvent:
    """One decode step. Per row: the token sampled this step and the text released this step
    ('' while held back or without a tokenizer), both None for a row that had already finished."""

    tokens: list[int | None]
    texts: list[str | None]


# -- the compute pieces -------------------------------------------------------------------------

class NonFiniteLogitsError(OpenGemmaError):
    """The model's logits held NaN/inf: corrupt weights, or activations that overflow the dtype."""


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[B] bool: whether each row of logits [B, V] is all finite; no host sync.

    One reduction: a row's sum is NaN/inf exactly when one of its entries is (finite logits would
    need |l| > 1e33 for 262,144 of them to overflow an fp32 sum), and the fp32 accumulator keeps a
    row of fp16 logits from overflowing fp16. Measured on 2 CPU cores: 0.03 ms for one 262k-entry
    row, 0.4 ms for 16, against ~20 ms for a 270M decode step."""
    return torch.isfinite(logits.sum(dim=-1, dtype=torch.float32))  # [B]


def nonfinite_error(step: int, dtype: torch.dtype) -> NonFiniteLogitsError:
    """The one-line error for non-finite logits at generation step ``step`` (1 = the first token)."""
    why = ("activations can overflow float16's range; try bfloat16 or float32" if dtype == torch.float16
           else "the weights are probably corrupt")
    return NonFiniteLogitsError(f"the model produced non-finite logits (NaN/inf) at step {step}: {why}")


def decode_step(model, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One decode step: tokens [B, 1] at positions pos [B, 1] (-1: idle row) -> logits [B, V].

    Writes the new keys/values into ``cache`` in place; shapes never change from step to step.
    A model with a compiled step (:mod:`opengemma.compiled`) runs through it.
    """
    compiled = getattr(model, "compiled_decode", None)
    if compiled is not None:
        return compiled(tokens, pos, cache)  # [B, V]
    return model(tokens, pos, cache)[:, 0]  # [B, V]


def prefill(model, cache: KVCache, prompts: Sequence[Sequence[int] | None], *, start: int | Sequence[int] = 0,
            pad_id: int = 0, chunk_size: int = PREFILL_CHUNK) -> torch.Tensor:
    """Write token runs into rows of ``cache`` and return each row's logits at its last one [B, V]:
    the one prefill routine of generation, serving (prompt chunks) and evaluation (contexts
    after a shared prefix).

    ``prompts`` has one entry per cache row; None leaves that row untouched (position -1), so a
    server can admit new sequences into a cache whose other rows are mid-decode. Row i's tokens go
    to positions ``start[i]..`` (``start``: one int for every row, or one per row); a row starting
    at 0 is a new sequence and is reset first, a row starting later continues what its row holds.
    All rows go in one right-padded forward per chunk of ``chunk_size`` positions (rows not
    written get meaningless logits).
    """
    B = cache.batch_size
    if len(prompts) != B:
        raise ValueError(f"prefill got {len(prompts)} prompts for a cache of {B} rows")
    starts = [start] * B if isinstance(start, int) else list(start)
    rows = [i for i, p in enumerate(prompts) if p is not None]
    if not rows:
        raise ValueError("prefill needs at least one prompt")
    lens = [len(p) if p is not None else 0 for p in prompts]
    if any(lens[i] == 0 for i in rows):
        raise OpenGemmaError("a prompt is empty: it needs at least one token (e.g. <bos>)")
    if (end := max(starts[i] + lens[i] for i in rows)) > cache.max_len:
        raise OpenGemmaError(f"prompt has {end} tokens, the cache holds {cache.max_len}")
    if fresh := [i for i in rows if starts[i] == 0]:
        cache.reset(fresh)  # forget the row's previous tenant (its ring holds old positions)
    T = max(lens)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T], built on the host, moved once
    pos = torch.full((B, T), -1, dtype=torch.long)  # [B, T]; -1: padding, neither attended nor written
    for i in rows:
        tokens[i, :lens[i]] = torch.tensor(list(prompts[i]), dtype=torch.long)
        pos[i, :lens[i]] = torch.arange(starts[i], starts[i] + lens[i])
    device = cache.device
    tokens, pos = tokens.to(device), pos.to(device)
    last = torch.tensor(lens, device=device) - 1  # [B], index of each row's last token
    logits = None
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        at = (last - s).clamp(0, e - s - 1)  # [B]; rows whose last token is elsewhere: any index
        out = model(tokens[:, s:e], pos[:, s:e], cache, logits_at=at)[:, 0]  # [B, V]
        here = ((last >= s) & (last < e))[:, None]  # [B, 1]
        logits = out if logits is None else torch.where(here, out, logits)
    return logits


# -- per-row bookkeeping ------------------------------------------------------------------------

def _new_stream_decoder(tokenizer):
    """The tokenizer's incremental decoder: ``tokenizer.stream_decoder()`` if it offers one (lets
    callers and tests bring their own), else :class:`opengemma.tokenizer.StreamDecoder`."""
    make = getattr(tokenizer, "stream_decoder", None)
    if callable(make):
        return make()
    from .tokenizer import StreamDecoder  # imported lazily: only text generation needs it

    return StreamDecoder(tokenizer)


class RowState:
    """One sequence being generated: everything about it except its slot in the KV cache.

    ``push(token)`` records a sampled token and returns the text it releases. Text that could be
    the start of a stop string is held back until it can no longer be (or generation ends), so
    streamed pieces never show a stop string, even one split across tokens. Without a tokenizer
    the row tracks ids only (stop strings need one).
    """

    def __init__(self, prompt_ids: Sequence[int], max_new_tokens: int,
                 stop_ids: set[int] | frozenset[int] = frozenset(), tokenizer: Any = None,
                 stop: Sequence[str] = ()):
        if max_new_tokens < 1:
            raise OpenGemmaError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.stop_ids = frozenset(stop_ids)
        self.stop = tuple(stop)
        self.decoder = _new_stream_decoder(tokenizer) if tokenizer is not None else None
        self.token_ids: list[int] = []  # sampled ids, a final stop token excluded
        self.completion_tokens = 0  # sampled ids, a final stop token included
        self.text = ""  # released so far
        self._pending = ""  # decoded but held back: might begin a stop string
        self.finished = False
        self.finish_reason: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def position(self) -> int:
        """Position of the next token fed to the model: the last sampled one."""
        return self.prompt_tokens + self.completion_tokens - 1

    def push(self, token: int) -> str:
        """Record one sampled token; return the newly released text."""
        if self.finished:
            raise RuntimeError("push() on a finished row")
        self.completion_tokens += 1
        if token in self.stop_ids:
            return self._finish("stop", "")
        self.token_ids.append(token)
        new = self.decoder.push(token) if self.decoder is not None else ""
        if self.completion_tokens >= self.max_new_tokens:
            return self._finish("length", new)
        return self._release(new, final=False)

    def finish(self, reason: str = "stop") -> str:
        """End the row from outside (e.g. a cancelled request); returns the held-back text."""
        return self._finish(reason, "") if not self.finished else ""

    def _finish(self, reason: str, new: str) -> str:
        if self.decoder is not None:
            new += self.decoder.flush()  # no more tokens: release any partial UTF-8 as is
        out = self._release(new, final=True)
        if not self.finished:  # a stop string may have finished it first
            self.finished, self.finish_reason = True, reason
        return out

    def _release(self, new: str, final: bool) -> str:
        """Add ``new`` to the pending text; release what cannot start a stop string."""
        text = self._pending + new
        if self.stop:
            # Released text never contains the start of a complete stop string (we hold back
            # every suffix that is a stop-string prefix), so searching the pending text suffices.
            hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
            if hits:
                out = text[:min(hits)]
                self._pending = ""
                self.text += out
                self.finished, self.finish_reason = True, "stop"
                return out
        keep = 0 if final else _holdback(text, self.stop)
        out, self._pending = text[:len(text) - keep], text[len(text) - keep:]
        self.text += out
        return out

    def completion(self) -> Completion:
        return Completion(text=self.text, token_ids=list(self.token_ids),
                          finish_reason=self.finish_reason or "length", prompt_tokens=self.prompt_tokens,
                          completion_tokens=self.completion_tokens)


def _holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


# -- driving a batch ----------------------------------------------------------------------------

def budget(prompt_len: int, max_new_tokens: int, context_length: int) -> int:
    """``max_new_tokens`` clamped so that prompt + generation fit the context; errors if the
    prompt leaves no room for even one token or the request is absurd."""
    if max_new_tokens < 1:
        raise OpenGemmaError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_new_tokens > context_length:
        raise OpenGemmaError(f"max_new_tokens is {max_new_tokens}, the model's context is {context_length}")
    if prompt_len == 0:
        raise OpenGemmaError("a prompt is empty: it needs at least one token (e.g. <bos>)")
    if prompt_len >= context_length:
        raise OpenGemmaError(f"prompt has {prompt_len} tokens, the model's context is {context_length}")
    return min(max_new_tokens, context_length - prompt_len)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """The one RNG of a generation call: seeded from ``seed``, or from ``os.urandom`` if None."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") & (2**63 - 1)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def cache_length(rows: Sequence[RowState], context_length: int, *, pow2: bool = False) -> int:
    """Slots needed by ``rows`` rounded up to :data:`CACHE_ROUND` (``pow2``: to a power of two,
    at least 256, so that a compiled step meets few shapes), at most the context."""
    need = max(r.prompt_tokens + r.max_new_tokens for r in rows)
    if pow2:
        return min(max(256, 1 << (need - 1).bit_length()), max(context_length, need))
    return min(-(-need // CACHE_ROUND) * CACHE_ROUND, max(context_length, need))


def sample_checked(logits: torch.Tensor, generator: torch.Generator, gen: GenerationConfig,
                   live: Sequence[bool], step: int) -> tuple[torch.Tensor, list[int]]:
    """Sample one token per row of logits [B, V] -> (ids [B] on the device, the same as a list),
    raising :class:`NonFiniteLogitsError` for a ``live`` row whose logits are not finite
    (``step``: the generation step, for the message). One host sync."""
    finite = finite_rows(logits)  # [B]
    try:
        next_ids = sample_next_token(logits, generator, gen.temperature, gen.top_k, gen.top_p)  # [B]
    except RuntimeError:  # a sampler may refuse NaN probabilities itself
        if any(on and not ok for ok, on in zip(finite.tolist(), live)):
            raise nonfinite_error(step, logits.dtype) from None
        raise
    # A row with non-finite logits reads -1: the flag rides on the step's one host sync.
    ids = torch.where(finite, next_ids, -1).tolist()  # streaming needs the ids anyway
    if any(t < 0 and on for t, on in zip(ids, live)):
        raise nonfinite_error(step, logits.dtype)
    return next_ids, ids


def run_rows(model, rows: Sequence[RowState], gen: GenerationConfig, *, pad_id: int = 0,
             chunk_size: int = PREFILL_CHUNK, drafter=None, stats: GenerationStats | None = None,
             ) -> Iterator[StepEvent]:
    """Generate for ``rows`` together and yield one :class:`StepEvent` per step until all finish.

    One cache of B rows is allocated up front; all prompts are prefilled together, then every
    step feeds each unfinished row its last token at its own position. Finished rows are fed
    position -1, so they cost a little compute but never touch the cache and keep shapes static.
    Rows may be finished from outside between steps (``row.finish()``); they then stop too.

    With ``gen.speculate`` > 0 and a single row, decoding is speculative
    (:func:`opengemma.speculative.run_speculative`, ``drafter`` None: prompt lookup); the events
    are the same, one token each. ``stats`` is filled in as generation runs.
    """
    if not rows:
        raise OpenGemmaError("no prompts given")
    if gen.speculate and len(rows) == 1:
        from .speculative import run_speculative  # imports this module: loaded on first use

        yield from run_speculative(model, rows[0], gen, drafter=drafter, stats=stats, pad_id=pad_id,
                                   chunk_size=chunk_size)
        return
    t0 = time.perf_counter()
    device = _device(model)
    B = len(rows)
    g = make_generator(gen.seed, device)
    with torch.inference_mode():  # scoped per compute section: a generator must not leak the mode
        compiled = getattr(model, "compiled_decode", None) is not None
        cache = model.make_cache(B, cache_length(rows, model.config.context_length, pow2=compiled))
        logits = prefill(model, cache, [r.prompt_ids for r in rows], pad_id=pad_id, chunk_size=chunk_size)
        # Preallocated per-step inputs, refilled in place: the decode step sees the same buffers.
        step_tokens = torch.full((B, 1), pad_id, dtype=torch.long, device=device)  # [B, 1]
        step_pos = torch.full((B, 1), -1, dtype=torch.long, device=device)  # [B, 1]
    step = 0
    clock = GenerationClock(stats, rows, t0)
    try:
        while True:
            step += 1
            with torch.inference_mode():
                next_ids, ids = sample_checked(logits, g, gen, [not r.finished for r in rows], step)
            clock.sampled(step)
            event = StepEvent(tokens=[None] * B, texts=[None] * B)
            for i, r in enumerate(rows):
                if not r.finished:
                    event.tokens[i], event.texts[i] = ids[i], r.push(ids[i])
            yield event
            if all(r.finished for r in rows):
                return
            with torch.inference_mode():
                live = [not r.finished for r in rows]
                pos = [r.position if ok else -1 for r, ok in zip(rows, live)]
                step_tokens.copy_(next_ids[:, None])
                step_pos.copy_(torch.tensor(pos, dtype=torch.long)[:, None])
                logits = decode_step(model, step_tokens, step_pos, cache)  # [B, V]
            clock.forwards += 1
    finally:
        clock.done()


class GenerationClock:
    """Fills a :class:`GenerationStats` for :func:`run_rows` and the speculative loop (or nothing,
    for ``stats`` None): prefill time up to the first sampled token, decode time after it."""

    def __init__(self, stats: GenerationStats | None, rows: Sequence[RowState], t0: float, speculate: int = 0):
        self.stats, self.rows, self.t0, self.t1 = stats, rows, t0, None
        self.forwards = self.drafted = self.accepted = 0
        self.speculate = speculate

    def sampled(self, step: int) -> None:
        if step == 1 and self.stats is not None:
            self.t1 = time.perf_counter()

    def done(self) -> None:
        s = self.stats
        if s is None:
            return
        end = time.perf_counter()
        t1 = self.t1 if self.t1 is not None else end
        s.prompt_tokens = sum(r.prompt_tokens for r in self.rows)
        s.generated_tokens = sum(r.completion_tokens for r in self.rows)
        s.stopped = sum(r.finish_reason == "stop" for r in self.rows)
        s.rows = len(self.rows)
        s.prefill_s, s.decode_s = t1 - self.t0, end - t1
        s.forwards, s.speculate, s.drafted, s.accepted = self.forwards, self.speculate, self.drafted, self.accepted


def _prepare(model, prompts_ids: Sequence[Sequence[int]], gen: GenerationConfig, stop_ids, tokenizer,
             ) -> list[RowState]:
    if not isinstance(gen, GenerationConfig):
        raise TypeError("gen must be a GenerationConfig")
    if isinstance(prompts_ids, (str, bytes)) or (prompts_ids and isinstance(prompts_ids[0], int)):
        raise TypeError("prompts must be a list of token-id lists (one per prompt)")
    if not prompts_ids:
        raise OpenGemmaError("no prompts given")
    if gen.stop and tokenizer is None:
        raise OpenGemmaError("stop strings need a tokenizer")
    ctx = model.config.context_length
    return [RowState(p, budget(len(p), gen.max_new_tokens, ctx), stop_ids, tokenizer, gen.stop)
            for p in prompts_ids]


def generate_tokens(model, prompts: Sequence[Sequence[int]], gen: GenerationConfig | None = None,
                    stop_ids: set[int] | frozenset[int] = frozenset(), *, pad_id: int = 0, drafter=None,
                    stats: GenerationStats | None = None) -> Iterator[list[int | None]]:
    """Token-level generation: yields per step the id sampled for each row (None once a row has
    finished). A stop id is yielded and ends its row; stop strings are not applied (no text).
    ``drafter`` (with ``gen.speculate``) and ``stats``: see :func:`run_rows`."""
    gen = gen or GenerationConfig()
    rows = _prepare(model, prompts, gen, stop_ids, None)
    for ev in run_rows(model, rows, gen, pad_id=pad_id, drafter=drafter, stats=stats):
        yield ev.tokens


def _tokenizer_stop_ids(tokenizer) -> frozenset[int]:
    ids = getattr(tokenizer, "stop_ids", None)
    if ids is None:
        ids = {tokenizer.eos_id, tokenizer.end_of_turn_id}
    return frozenset(i for i in ids if i is not None and i >= 0)


def _text_rows(model, tokenizer, prompts_ids, gen) -> list[RowState]:
    return _prepare(model, prompts_ids, gen, _tokenizer_stop_ids(tokenizer), tokenizer)


def stream(model, tokenizer, prompts_ids: Sequence[Sequence[int]], gen: GenerationConfig | None = None,
           *, drafter=None, stats: GenerationStats | None = None) -> Iterator[list[str | None]]:
    """Batched streaming: yields per step the text released for each row ('' while nothing new
    or held back; None once the row had finished). Concatenated, a row's pieces are its text.
    ``drafter`` (with ``gen.speculate``) and ``stats``: see :func:`run_rows`."""
    gen = gen or GenerationConfig()
    rows = _text_rows(model, tokenizer, prompts_ids, gen)
    for ev in run_rows(model, rows, gen, pad_id=_pad_id(tokenizer), drafter=drafter, stats=stats):
        yield ev.texts


def stream_text(model, tokenizer, prompt_ids: Sequence[int], gen: GenerationConfig | None = None, *,
                drafter=None, stats: GenerationStats | None = None) -> Iterator[str]:
    """Streaming for one prompt: yields the non-empty text pieces as they become final."""
    for texts in stream(model, tokenizer, [prompt_ids], gen, drafter=drafter, stats=stats):
        if texts[0]:
            yield texts[0]


def generate(model, tokenizer, prompts_ids: Sequence[Sequence[int]], gen: GenerationConfig | None = None, *,
             drafter=None, stats: GenerationStats | None = None) -> list[Completion]:
    """Generate for every prompt (batched together); one :class:`Completion` per prompt, in order."""
    gen = gen or GenerationConfig()
    rows = _text_rows(model, tokenizer, prompts_ids, gen)
    for _ in run_rows(model, rows, gen, pad_id=_pad_id(tokenizer), drafter=drafter, stats=stats):
        pass
    return [r.completion() for r in rows]


def _device(model) -> torch.device:
    norm = getattr(model, "final_norm", None)  # stays a float tensor when weights are quantized
    if norm is not None:
        return norm.weight.device
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


def _pad_id(tokenizer) -> int:
    # Padding positions are -1, so their token is never seen; any in-vocabulary id would do.
    pad = getattr(tokenizer, "pad_id", None)
    return pad if isinstance(pad, int) and pad >= 0 else 0
