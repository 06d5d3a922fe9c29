"""The continuous-batching engine behind ``opengemma serve``: one model, one KV cache, one thread.

Part of the serving side. The cache holds ``max_batch`` rows ("slots") of ``max_context``
positions, allocated once, so the memory budget is fixed at start-up (``max_batch`` x one
sequence's keys and values). A bounded number of further sequences may wait for a slot; beyond
that :meth:`Engine.submit` raises :class:`QueueFull` (the server answers 429).

The engine thread loops; each iteration

1. drops cancelled sequences (a client that went away frees its slot here, before the next step)
   and admits waiting ones into free slots (lowest free slot first, so busy rows stay packed);
2. prefills at most ``prefill_chunk`` prompt tokens, oldest admission first, one forward per
   sequence (a batch of prompt rows would round differently from a prompt alone, and would pad
   the shorter ones). A long prompt therefore
   takes several iterations, and the streams in flight get one token in each of them instead of
   freezing for the whole prompt. A prompt whose last chunk is in gets its first token from the
   prefill logits;
3. runs one :func:`opengemma.generate.decode_step` over the slots from the lowest to the highest
   decoding one (rows between them idle at position -1) and samples one token per decoding
   sequence; or, when ``speculate`` is on and one greedy sequence decodes alone, one
   speculative step for it (below).

Speculative decoding, where it pays. Prompt-lookup drafts (:mod:`opengemma.speculative`) are
verified k + 1 tokens per forward, with the adaptive draft length and rollback of ``opengemma
generate --speculate``; the cache is made with ``speculate`` spare ring slots for the rollback. A
forward's cost on the CPU grows nearly linearly with its rows (embedded 270M, mixed + bf16, 2
threads, idle: 1 row 14 ms, 5 rows 38 ms; a plain step of 2 rows 23 ms, 2 x 5 rows 61 ms; of 4
rows 41 ms, 4 x 2 rows 91 ms). In a batch every row pays for the longest row's drafts (a row
without drafts rides as padding), and from ~8 rows on an extra row costs more than the ones
before. So a batch's drafts pay only when every row has drafts and keeps most of them, and not
for larger batches; the engine keeps them to a sequence decoding alone, where latency matters
most (``bench/bench_serve.py``: one stream 1.58x faster). Only greedy sequences without logprobs
speculate: their tokens are the plain step's (up to float near-ties), whereas a sampled sequence
would draw from its generator differently with and without speculation, and so its text would
depend on whether it ran alone.

Faults stay with the sequence they belong to. A row whose logits are not finite, or whose
sampling or detokenization raises, ends that sequence alone with an "error" event (the server
answers 500 for that request) and its slot's keys and values are zeroed (a NaN left there would
reach the next tenant through the attention's zero weights); the rest of the batch goes on. A
forward that raises cannot be pinned on a row, so it is retried by halves, older sequences first
(the newest are the likeliest cause): a half that runs gets its tokens, a half that fails is split
again, and only a sequence that still fails alone is ended. A decode step only writes the
position it is given (and the ring slot of a position out of the window), and rewriting it gives
the same values, so a retried step is exact; a prompt chunk overwrites ring slots that its own
queries still read, so a failed one is redone from the prompt's start. Either way every surviving
sequence gets exactly the tokens it gets alone. Only a failure outside the forwards (a bug in
this module) ends every sequence.

Sampling is per sequence with its own ``torch.Generator`` (seeded from the request), so a
sequence's tokens never depend on what else is in the batch. Bookkeeping (stop tokens, stop
strings with holdback, incremental detokenisation, budgets) is :class:`opengemma.generate.RowState`.
Results leave the thread as :class:`Event` batches through ``deliver`` (the server passes them to
its event loop with ``call_soon_threadsafe``); torch releases the GIL inside its kernels, so the
HTTP side stays responsive while the model runs.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..generate import CACHE_ROUND, GenerationConfig, RowState, decode_step, finite_rows, make_generator, prefill
from ..logprobs import from_logits
from ..sampling import argmax, sample_next_token
from ..speculative import PromptLookupDrafter, SpeculativeDecoder, checked_drafts, next_draft_length, speculative_step
from .metrics import Metrics

log = logging.getLogger("opengemma.serve")


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full: try again later (HTTP 429)."""


class ShuttingDown(Exception):
    """The engine no longer admits requests (HTTP 503)."""


@dataclass
class TokenLogprob:
    """Log-probability of a sampled token under the model (raw logits, before temperature and
    filters) and the ``top`` most likely alternatives as (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """What one iteration produced for one sequence. ``text`` is the newly released text (may be
    empty: held back for a stop string, or an unfinished UTF-8 character). ``finish_reason`` is set
    on the last event: "stop", "length", "abort" (cancelled by the server, e.g. at shutdown, with
    ``error``) or "error" (the engine failed, with ``error``)."""

    text: str = ""
    token: int | None = None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Seq:
    """One sequence to generate (one choice of one request): its prompt, parameters, bookkeeping
    and where its events go. ``sink(event)`` is called wherever ``deliver`` dispatches."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: Sequence[int], params: GenerationConfig, sink: Callable[[Event], None], *,
                 tokenizer, stop_ids: frozenset[int], device: torch.device | str = "cpu"):
        self.id = next(self._ids)
        self.params = params
        self.sink = sink
        self.row = RowState(prompt_ids, params.max_new_tokens, frozenset() if params.ignore_eos else stop_ids,
                            tokenizer, params.stop)
        # A generator per sequence: its draws are its own whatever the batch around it.
        self.generator = make_generator(params.seed, device) if params.temperature > 0 else None
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens already in the cache
        self.last_token = 0  # the token to feed at the next decode step
        self.cancelled = False  # set from any thread; the engine acts on it between steps
        self.arrival = time.monotonic()
        self.last_time: float | None = None
        self.order = 0  # admission order: prefill serves the oldest first
        self.drafter: PromptLookupDrafter | None = None  # made at its first speculative step
        self.k_now = 0  # its adaptive draft length

    @property
    def prompt_tokens(self) -> int:
        return self.row.prompt_tokens

    @property
    def decoding(self) -> bool:
        return self.prefilled == self.row.prompt_tokens and not self.row.finished


class Engine:
    """Continuous batching over one model. Thread-safe entry points: :meth:`submit`,
    :meth:`cancel`, :meth:`drain`, :meth:`abort_all`, :meth:`stop` and the read-only counters."""

    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_context: int = 4096, max_queue: int = 64,
                 prefill_chunk: int = 256, speculate: int = 0, metrics: Metrics | None = None,
                 deliver: Callable[[list[tuple[Seq, Event]]], None] | None = None):
        if max_batch < 1 or max_context < 2 or max_queue < 0 or prefill_chunk < 1 or speculate < 0:
            raise ValueError("max_batch >= 1, max_context >= 2, max_queue >= 0, prefill_chunk >= 1 and "
                             "speculate >= 0 are needed")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_context = max_context
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.speculate = speculate  # drafts per forward at most (0: off); see the module docstring
        self.metrics = metrics or Metrics()
        self.deliver = deliver or self._deliver_here
        self.device = model.final_norm.weight.device
        ids = getattr(tokenizer, "stop_ids", None) or (tokenizer.eos_id, tokenizer.end_of_turn_id)
        self.stop_ids = frozenset(i for i in ids if i is not None and i >= 0)
        pad = getattr(tokenizer, "pad_id", -1)
        self.pad_id = pad if isinstance(pad, int) and pad >= 0 else 0  # never seen: padding is position -1
        with torch.inference_mode():  # the cache is only ever touched by the engine thread, in this mode
            self.cache = SpeculativeDecoder.make_cache(model, max_context, speculate, batch_size=max_batch)
        self._cond = threading.Condition()
        self._incoming: deque[Seq] = deque()  # submitted, not yet seen by the engine thread
        self._live = 0  # submitted and not yet retired (under _cond): the capacity check
        self._draining = False
        self._stopping = False
        self._abort: str | None = None
        self._waiting: deque[Seq] = deque()  # engine thread only
        self._slots: list[Seq | None] = [None] * max_batch  # engine thread only
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run, speculative ones included (for tests and metrics)
        self.drafted = self.accepted = 0  # drafts verified and kept
        self.prefill_forwards = 0

    # -- thread-safe API ---------------------------------------------------------------------------
    def new_seq(self, prompt_ids: Sequence[int], params: GenerationConfig, sink: Callable[[Event], None]) -> Seq:
        return Seq(prompt_ids, params, sink, tokenizer=self.tokenizer, stop_ids=self.stop_ids, device=self.device)

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="opengemma-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, seqs: Sequence[Seq]) -> None:
        """Queue ``seqs`` (all or none). Raises :class:`QueueFull` or :class:`ShuttingDown`."""
        for s in seqs:
            if s.prompt_tokens + s.row.max_new_tokens > self.max_context:
                raise ValueError(f"sequence needs {s.prompt_tokens + s.row.max_new_tokens} positions, "
                                 f"the engine holds {self.max_context}")
        with self._cond:
            if self._draining or self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self._live + len(seqs) > self.max_batch + self.max_queue:
                raise QueueFull(f"{self.max_batch} sequences are running and {self.max_queue} waiting")
            now = time.monotonic()
            for s in seqs:
                s.arrival = now
            self._incoming.extend(seqs)
            self._live += len(seqs)
            self._cond.notify()

    def cancel(self, seq: Seq) -> None:
        """Forget ``seq`` (its client went away): its slot is freed before the next step; no more events."""
        seq.cancelled = True
        with self._cond:
            self._cond.notify()

    def drain(self) -> None:
        """Stop admitting new requests; those already submitted run to completion."""
        with self._cond:
            self._draining = True

    def abort_all(self, message: str) -> None:
        """End every submitted sequence now with finish_reason "abort" and ``message``."""
        with self._cond:
            self._abort = message
            self._cond.notify()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Abort what is left and end the engine thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def live(self) -> int:
        """Sequences submitted and not finished (running + waiting)."""
        return self._live

    @property
    def running(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._incoming) + len(self._waiting)

    def kv_cache_bytes(self) -> int:
        return self.cache.nbytes()

    # -- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._incoming or self._abort or self._waiting
                           or any(s is not None for s in self._slots)):
                    self._cond.wait()
                if self._stopping:
                    break
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                abort, self._abort = self._abort, None
            if abort is not None:
                self._abort_everything("abort", abort)
                continue
            try:
                with torch.inference_mode():
                    self._iteration()
            except Exception as e:  # a failure outside the forwards (a bug here): fail everything, keep serving
                log.exception("engine step failed")
                self._abort_everything("error", f"internal error in the model step: {type(e).__name__}: {e}")
                with torch.inference_mode():
                    self.cache.reset()
        with self._cond:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
        self._abort_everything("abort", "the server is shutting down")

    def _iteration(self) -> None:
        self._reap_and_admit()
        out: list[tuple[Seq, Event]] = []
        self._prefill(out)
        self._flush(out)  # first tokens leave before the decode step: earlier time to first token
        self._decode(out)
        self._flush(out)

    def _flush(self, out: list[tuple[Seq, Event]]) -> None:
        if out:
            self.deliver(list(out))
            out.clear()

    @staticmethod
    def _deliver_here(batch: list[tuple[Seq, Event]]) -> None:
        for seq, event in batch:
            seq.sink(event)

    def _retire(self, seq: Seq, reason: str) -> None:
        if seq.slot is not None:
            self._slots[seq.slot] = None
            seq.slot = None
        with self._cond:
            self._live -= 1
        self.metrics.sequence_done(reason, seq.prompt_tokens, time.monotonic() - seq.arrival)

    def _fail(self, seq: Seq, message: str, out: list[tuple[Seq, Event]]) -> None:
        """End ``seq`` alone with an "error" event; zero its slot (see the module docstring)."""
        slot = seq.slot
        event = Event(finish_reason="error", error=message, prompt_tokens=seq.prompt_tokens,
                      completion_tokens=seq.row.completion_tokens)
        self._retire(seq, "error")
        if slot is not None:
            self.cache.reset([slot], zero=True)
        if not seq.cancelled:
            out.append((seq, event))

    def _isolated(self, items: list, forward: Callable[[list, list], None], out: list[tuple[Seq, Event]], *,
                  seq_of: Callable = lambda item: item, redo: Callable = lambda item: item,
                  retried: bool = False) -> None:
        """``forward(items, out)``; if it raises, retry by halves, oldest first (``items`` are in
        admission order) and end only the sequences that still fail alone. ``redo(item)`` is what
        to run again for an item whose forward failed."""
        try:
            forward(items, out)
            return
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            if not retried:
                log.exception("model step over %d sequence(s) failed; retrying by halves", len(items))
        if len(items) == 1 and retried:
            log.error("sequence %d fails alone in the model step (%s): ending it", seq_of(items[0]).id, error)
            self._fail(seq_of(items[0]), f"internal error in the model step: {error}", out)
            return
        items = [redo(item) for item in items]
        half = (len(items) + 1) // 2
        for part in (items[:half], items[half:]) if len(items) > 1 else (items,):
            self._isolated(part, forward, out, seq_of=seq_of, redo=redo, retried=True)

    def _abort_everything(self, reason: str, message: str) -> None:
        out = []
        for seq in list(self._waiting) + [s for s in self._slots if s is not None]:
            if not seq.cancelled:
                out.append((seq, Event(finish_reason=reason, error=message, prompt_tokens=seq.prompt_tokens,
                                       completion_tokens=seq.row.completion_tokens)))
            self._retire(seq, reason)
        self._waiting.clear()
        self._flush(out)

    def _reap_and_admit(self) -> None:
        for seq in self._slots:
            if seq is not None and seq.cancelled:
                self._retire(seq, "cancelled")
        if any(s.cancelled for s in self._waiting):
            for seq in [s for s in self._waiting if s.cancelled]:
                self._retire(seq, "cancelled")
            self._waiting = deque(s for s in self._waiting if not s.cancelled)
        free = [i for i, s in enumerate(self._slots) if s is None]  # ascending: keep busy rows packed low
        for slot in free:
            if not self._waiting:
                break
            seq = self._waiting.popleft()
            seq.slot, seq.prefilled, seq.order = slot, 0, next(self._order)
            self._slots[slot] = seq

    def _prefill(self, out: list[tuple[Seq, Event]]) -> None:
        todo = sorted((s for s in self._slots if s is not None and s.prefilled < s.prompt_tokens),
                      key=lambda s: s.order)
        budget, work = self.prefill_chunk, []
        for seq in todo:
            if budget <= 0:
                break
            n = min(seq.prompt_tokens - seq.prefilled, budget)
            work.append((seq, seq.prefilled, seq.prefilled + n))
            budget -= n
        for w in work:
            # One forward per sequence: its chunk computes exactly what it computes alone (prompt
            # rows batched together round differently in bf16, and the padding of shorter rows is
            # wasted work on a CPU). A failed chunk is redone from the prompt's start: the layers
            # that ran before the failure have already rewritten their sliding-window rings with
            # the chunk's keys, so the earlier positions the chunk attends to are gone.
            self._isolated([w], self._prefill_forward, out, seq_of=lambda w: w[0], redo=lambda w: (w[0], 0, w[2]))

    def _prefill_forward(self, run: list[tuple[Seq, int, int]], out: list[tuple[Seq, Event]]) -> None:
        """One forward over the chunks ``run`` (sequences in a range of slots; the range's other
        rows are padding) and the first token of each prompt that is now complete."""
        run = sorted(run, key=lambda w: w[0].slot)
        lo, hi = run[0][0].slot, run[-1][0].slot + 1
        view = self.cache.rows(lo, hi, self._length(max(end for _, _, end in run)))
        chunks: list = [None] * (hi - lo)
        starts = [0] * (hi - lo)
        for seq, start, end in run:
            chunks[seq.slot - lo], starts[seq.slot - lo] = seq.row.prompt_ids[start:end], start
        # rows starting at 0 are reset first: a slot's previous tenant left its ring behind
        logits = prefill(self.model, view, chunks, start=starts, pad_id=self.pad_id, chunk_size=self.prefill_chunk)
        self.prefill_forwards += 1
        self.metrics.prefilled(sum(end - start for _, start, end in run))
        ready = []
        for seq, start, end in run:
            seq.prefilled = end
            if end == seq.prompt_tokens:
                ready.append((seq, seq.slot - lo))
        if ready:
            self._emit(logits, ready, out)
            self.metrics.first_tokens(len(ready))

    def _decode(self, out: list[tuple[Seq, Event]]) -> None:
        live = sorted((s for s in self._slots if s is not None and s.decoding), key=lambda s: s.order)
        if not live:
            return
        p = live[0].params
        alone = len(live) == 1 and self.speculate and p.temperature == 0 and p.logprobs is None
        self._isolated(live, self._speculative_forward if alone else self._decode_forward, out)

    def _decode_forward(self, live: list[Seq], out: list[tuple[Seq, Event]]) -> None:
        """One decode step for ``live``; the other rows between the lowest and highest of their
        slots idle."""
        lo, hi = min(s.slot for s in live), max(s.slot for s in live) + 1
        tokens = torch.full((hi - lo, 1), self.pad_id, dtype=torch.long)  # [b, 1]
        pos = torch.full((hi - lo, 1), -1, dtype=torch.long)  # [b, 1]; idle and prefilling rows: -1
        for s in live:
            tokens[s.slot - lo, 0] = s.last_token
            pos[s.slot - lo, 0] = s.row.position
        dev = self.device
        # Every row in lo..hi holds positions below its own `prefilled` / next position: the view's length.
        need = max(s.prefilled if s.prefilled < s.prompt_tokens else s.row.position + 1
                   for s in self._slots[lo:hi] if s is not None)
        view = self.cache.rows(lo, hi, self._length(need))
        logits = decode_step(self.model, tokens.to(dev), pos.to(dev), view)  # [b, V]
        self.steps += 1
        self._emit(logits, [(s, s.slot - lo) for s in live], out)
        self.metrics.step(len(live), len(live))

    def _speculative_forward(self, live: list[Seq], out: list[tuple[Seq, Event]]) -> None:
        """One speculative step for the one greedy sequence in ``live`` (module docstring): its
        prompt-lookup drafts and the token after them verified in one forward over its own row,
        the rejected drafts' positions rolled back; a plain step when it has no drafts."""
        seq = live[0]
        row = seq.row
        if seq.drafter is None:
            seq.drafter, seq.k_now = PromptLookupDrafter(), self.speculate
        want = min(seq.k_now, row.max_new_tokens - row.completion_tokens - 1)  # never past the budget
        drafts = checked_drafts(seq.drafter.propose(row.prompt_ids + row.token_ids, want), want,
                                self.model.config.vocab_size) if want > 0 else []
        if not drafts:
            self._decode_forward(live, out)
            return
        position = row.position
        view = self.cache.rows(seq.slot, seq.slot + 1, self._length(position + 1 + len(drafts)))
        verified = speculative_step(self.model, view, seq.last_token, position, drafts, seq.params, None)
        self.steps += 1
        seq.k_now = next_draft_length(seq.k_now, self.speculate, len(drafts), verified.accepted)
        self.drafted += len(drafts)
        self.accepted += verified.accepted
        self.metrics.speculated(len(drafts), verified.accepted)
        self.metrics.step(1, len(verified.tokens))
        now = time.monotonic()
        ttft: list[float] = []
        itl: list[float] = []
        for token in verified.tokens:  # a stop among them ends the sequence; the rest are dropped
            if not self._push(seq, token, None, now, out, ttft, itl):
                break
        else:
            if not verified.complete:  # the tokens before the non-finite row have been sent
                self._non_finite(seq, out)
        self.metrics.latencies(ttft, itl)

    def _length(self, need: int) -> int:
        """Positions a forward must see: ``need`` rounded up to CACHE_ROUND (fewer distinct shapes)."""
        return min(self.max_context, -(-need // CACHE_ROUND) * CACHE_ROUND)

    def _emit(self, logits: torch.Tensor, rows: list[tuple[Seq, int]], out: list[tuple[Seq, Event]]) -> None:
        """Sample one token for each (sequence, row of ``logits`` [b, V]) and record the events; a
        row that fails (non-finite logits, sampling or detokenization raising) ends its sequence."""
        finite = finite_rows(logits)  # [b]
        greedy, finite = torch.stack((argmax(logits), finite.long())).tolist()  # [2, b]: one host sync
        now = time.monotonic()
        ttft, itl = [], []
        for seq, r in rows:
            if not finite[r]:
                self._non_finite(seq, out)
                continue
            p = seq.params
            try:
                if p.temperature > 0:
                    token = int(sample_next_token(logits[r:r + 1], seq.generator, p.temperature, p.top_k,
                                                  p.top_p)[0])
                else:
                    token = greedy[r]
                lp = None
                if p.logprobs is not None and token not in seq.row.stop_ids:
                    lp = _logprob(logits[r], token, p.logprobs)
            except Exception as e:  # this sequence's fault (e.g. its parameters): it ends alone
                self._sampling_failed(seq, e, out)
                continue
            self._push(seq, token, lp, now, out, ttft, itl)
        self.metrics.latencies(ttft, itl)

    def _push(self, seq: Seq, token: int, lp: TokenLogprob | None, now: float, out: list[tuple[Seq, Event]],
              ttft: list[float], itl: list[float]) -> bool:
        """Record ``token`` for ``seq``: its event into ``out``, its latency into ``ttft`` or
        ``itl``. False when the sequence has ended (finished, or failed in detokenization)."""
        try:
            text = seq.row.push(token)
        except Exception as e:
            self._sampling_failed(seq, e, out)
            return False
        (ttft if seq.last_time is None else itl).append(now - (seq.last_time or seq.arrival))
        seq.last_time = now
        seq.last_token = token
        ev = Event(text=text, token=token, logprob=lp)
        if seq.row.finished:
            ev.finish_reason = seq.row.finish_reason
            ev.prompt_tokens, ev.completion_tokens = seq.prompt_tokens, seq.row.completion_tokens
            self._retire(seq, ev.finish_reason)
        if not seq.cancelled:
            out.append((seq, ev))
        return not seq.row.finished

    def _non_finite(self, seq: Seq, out: list[tuple[Seq, Event]]) -> None:
        """``seq``'s logits were not finite: it ends alone."""
        log.error("sequence %d: the model produced non-finite logits", seq.id)
        self._fail(seq, "the model produced non-finite logits", out)

    def _sampling_failed(self, seq: Seq, e: Exception, out: list[tuple[Seq, Event]]) -> None:
        """This sequence's fault (e.g. its parameters): it ends alone."""
        log.exception("sequence %d failed while sampling", seq.id)
        self._fail(seq, f"internal error while sampling: {type(e).__name__}: {e}", out)


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The sampled token's log-probability under one row of raw logits [V], and the ``top`` best."""
    lp, _, lse = from_logits(logits[None], torch.tensor([token], device=logits.device))
    best = []
    if top > 0:
        values, ids = logits.float().topk(top)  # [top] each
        best = list(zip(ids.tolist(), (values - lse).tolist()))
    return TokenLogprob(token, float(lp[0]), best)
