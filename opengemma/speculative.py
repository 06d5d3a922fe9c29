"""Lossless speculative decoding for one sequence: cheap drafts, verified several at a time.

Batch-1 decoding reads every weight of the model for each token; a forward over k + 1 tokens
reads them once. So a drafter guesses the next k tokens, one forward of the model over
[last token, draft 1..k] at positions p..p+k scores them all, and the acceptance rule keeps a
prefix of the drafts plus one token of the model's own: 1 to k + 1 tokens per forward, with the
output the model alone would give.

* :class:`Drafter` -- the interface: ``propose(context_ids, k)`` -> up to k token ids continuing
  the context. :class:`PromptLookupDrafter` (prompt lookup / n-gram copying) needs no model.
  A :class:`FeatureDrafter` (the trained draft head of :mod:`opengemma.draft`) also sees the
  target's final hidden states: the decoder runs the target through a :class:`FeatureTap` (its
  two halves, ``head(trunk(...))``, keeping the hidden states) and hands the drafter those of
  every position it keeps (``observe``), from the prefill on; ``begin`` starts a sequence, and
  ``draft_probs`` gives the distribution q the drafts were drawn from, when they were drawn.
* :func:`verify` -- the acceptance rule over the target's logits [k + 1, V]. Greedy: keep drafts
  while each equals the target's argmax, then emit the argmax where they part. Sampling: the rule
  of Leviathan et al. and Chen et al. (2023): keep draft x with probability min(1, p(x) / q(x)),
  on rejection draw from norm(max(0, p - q)), with the drafter's q when it gives one; a
  deterministic drafter's q is one-hot on x, so x is kept with probability p(x) and a rejection
  draws from p with x removed. Every emitted token
  is thus distributed exactly as p, the distribution plain decoding samples from
  (:func:`opengemma.sampling.sampling_probs`: temperature, top-k, top-p), with the call's one
  explicit ``torch.Generator``.
* :func:`speculative_step` -- one verification forward over the static KV cache, then the
  rollback: rejected drafts' positions are forgotten (:meth:`KVCache.forget`, slots back to -1).
  Gemma 2/3's local layers keep a ring of ``window`` slots, which a k + 1-token forward would
  overwrite with keys later queries still need; the cache is made with ``spare=k`` ring slots
  instead (see :mod:`opengemma.cache`), so that nothing needed is ever overwritten.
* :class:`SpeculativeDecoder` -- drafting, verification and the draft length, one forward per
  :meth:`~SpeculativeDecoder.step`; :func:`run_speculative` -- the decode loop over it that
  :func:`opengemma.generate.run_rows` hands a single row to. Tokens come out one
  :class:`~opengemma.generate.StepEvent` at a time through ``RowState.push``, so stop tokens, stop strings, budgets and streaming behave as without
  speculation; drafts never reach past the budget, nothing is emitted past a stop. The draft
  length adapts as in transformers' assisted generation: up by 2 (to k) after a forward that kept
  every draft, down by 1 (to 1) after one that did not, so a run of bad guesses costs one extra
  row per forward, not k. (On a CPU an extra row is not free: the embedded 270M's tied head over
  9 rows took 3.5-4x one row's time in fp32, int8 and int4, 1.1x in bf16; one thread, busy machine.)

CPU cost profile of drafting with a trained head (:mod:`opengemma.draft`), embedded 270M, one
thread, a machine busy with other work (load ~2.7 on 2 cores; ratios, not absolute times):

  ===============  ============  =================  ================  =======================
  target dtype     1-row step    5 rows / 9 rows    one draft step    k = 4 drafts (4 steps)
  ===============  ============  =================  ================  =======================
  bf16             124 ms        ~1.0x / ~1.0x      10.5 ms (8.5%)    44 ms (35%)
  mixed, bf16 act  53 ms         1.63x / 2.30x      8 ms (15%)        31-34 ms (60%)
  fp32             118 ms        2.1x / 3.1x        15 ms (12%) *     53 ms (44%) *
  ===============  ============  =================  ================  =======================

  (* with fp32 head rows; the int8 rows the drafter uses on the CPU made bf16's k = 4 ~20% cheaper)

A forward with k drafts thus costs about ``rows(k + 1) + k * draft`` plain steps: 1.35 in bf16
and 2.2 in mixed mode at k = 4, which the tokens per forward, (1 - a^(k+1)) / (1 - a) at
per-draft acceptance a, must beat (a = 0.6: 2.3; a = 0.75: 3.0). bf16 is where drafting pays
most relative to its own plain decoding (verification rows are nearly free there); whether
bf16 + draft beats plain mixed-bf16 (2.3x faster per step here) depends on the acceptance.

Exactness: greedy output equals plain greedy decoding's except where the top two logits are
within float rounding of each other, since a forward over several tokens does the same math in a
different order (matmul blocking): ~1e-6 relative in fp32. Sampling draws from the same
distributions but consumes the generator differently, so a seed gives other (equally likely) text.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .cache import KVCache
from .generate import (PREFILL_CHUNK, GenerationClock, GenerationConfig, GenerationStats, RowState, StepEvent,
                       _device, cache_length, decode_step, finite_rows, make_generator, nonfinite_error, prefill,
                       sample_checked)
from .sampling import argmax, draw, sampling_probs


@runtime_checkable
class Drafter(Protocol):
    """Proposes tokens for speculative decoding. ``propose(context_ids, k)`` gets the whole
    sequence so far (prompt and generated tokens) and returns up to ``k`` token ids guessed to
    follow it (fewer, or none, when it has no good guess: a step without drafts costs what plain
    decoding costs). Proposals affect only speed, never the output."""

    def propose(self, context_ids: Sequence[int], k: int) -> list[int]: ...


@runtime_checkable
class FeatureDrafter(Drafter, Protocol):
    """A drafter that also reads the target's final hidden states (EAGLE-style draft heads).

    ``begin(max_len, gen, generator)`` starts a sequence whose target cache holds ``max_len``
    positions, decoded with ``gen`` (the drafter may sample its drafts with ``generator``);
    ``observe(hidden)`` gets the hidden states [n, d] of the next n positions of the sequence, in
    order: the whole prompt after the prefill, then after each forward the fed token's and the
    accepted drafts'. At each ``propose`` the context is one token longer than the states observed
    so far (its last token has not been through the target yet). ``draft_probs()`` is the
    distribution q [n, V] the latest proposal's drafts were drawn from, or None for drafts that
    are a deterministic function of the context (then q is one-hot on each draft)."""

    def begin(self, max_len: int, gen: GenerationConfig, generator: torch.Generator | None) -> None: ...

    def observe(self, hidden: torch.Tensor) -> None: ...

    def draft_probs(self) -> torch.Tensor | None: ...


class FeatureTap:
    """The target as generation calls it (``tap(tokens, pos, cache, logits_at=None)`` -> logits),
    computed as ``head(trunk(...))`` like :meth:`GemmaModel.forward`, keeping each forward's
    hidden states [1, T, d] until :meth:`take` (a single-row cache: speculative decoding's)."""

    def __init__(self, model):
        self.model, self.config, self.final_norm = model, model.config, model.final_norm
        self._hidden: list[torch.Tensor] = []

    def make_cache(self, *args, **kwargs) -> KVCache:
        return self.model.make_cache(*args, **kwargs)

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, cache: KVCache | None = None,
                 logits_at: torch.Tensor | None = None) -> torch.Tensor:
        h = self.model.trunk(tokens, input_pos, cache)  # [1, T, d]
        self._hidden.append(h)
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at][:, None]  # [1, 1, d]
        return self.model.head(h)

    def take(self) -> torch.Tensor:
        """The hidden states [T, d] of the forwards since the last call, in order."""
        rows = torch.cat([h[0] for h in self._hidden], dim=0) if len(self._hidden) > 1 else self._hidden[0][0]
        self._hidden.clear()
        return rows


class PromptLookupDrafter:
    """Prompt-lookup drafts: find the latest earlier occurrence of the context's last n tokens
    (n from ``max_ngram`` down to ``min_ngram``) in the prompt and the generated text, and propose
    the tokens that followed it (Saxena 2023, "prompt lookup decoding"; transformers'
    ``prompt_lookup_num_tokens``, vLLM's n-gram speculator). No model and no training: it pays
    where output repeats its input or itself (summaries, extraction, code edits, quoting, and the
    loops small models fall into).

    The continuation is copied like an LZ77 match: when it reaches the end of the context it goes
    on from its own start, so a pattern repeating with a period shorter than k still yields k
    tokens. An index from every n-gram to its latest continuation is kept and extended as the
    context grows (a context that does not extend the previous one is indexed afresh), so a
    proposal costs a few dictionary lookups, not a scan of the context.

    Defaults: n-grams of 3 down to 2 tokens. One-token matches are mostly chance: on the embedded
    270M (greedy, 64 tokens, four prompts, adaptive draft length) they drafted 265 tokens for 131
    forwards, against 149 for 123 with pairs at least.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._ids: list[int] = []
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_ngram, max_ngram + 1)}

    def propose(self, context_ids: Sequence[int], k: int) -> list[int]:
        if k <= 0:
            return []
        self._extend(context_ids)
        ids, L = self._ids, len(self._ids)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            start = self._index[n].get(tuple(ids[L - n:]))
            if start is not None:
                out: list[int] = []
                for j in range(start, start + k):
                    out.append(ids[j] if j < L else out[j - L])
                return out
        return []

    def _extend(self, context_ids: Sequence[int]) -> None:
        ctx = context_ids if isinstance(context_ids, list) else list(context_ids)
        ids = self._ids
        if len(ctx) < len(ids) or ctx[:len(ids)] != ids:
            ids.clear()
            for table in self._index.values():
                table.clear()
        for i in range(len(ids), len(ctx)):
            ids.append(int(ctx[i]))
            for n, table in self._index.items():  # the n-grams ending at i - 1 are continued at i
                if i >= n:
                    table[tuple(ids[i - n:i])] = i


@dataclass
class Verified:
    """What one verification gives: ``tokens`` to emit (the kept drafts, then the target's own
    token), ``accepted`` drafts kept, and ``complete`` False when the logits for the next token
    were not finite (``tokens`` then holds only what came before them)."""

    tokens: list[int]
    accepted: int
    complete: bool = True


def verify(logits: torch.Tensor, drafts: Sequence[int], gen: GenerationConfig,
           generator: torch.Generator | None, draft_probs: torch.Tensor | None = None) -> Verified:
    """The acceptance rule (module docstring) for logits [len(drafts) + 1, V], row i being the
    target's next-token logits after the fed token and ``drafts[:i]``. ``draft_probs`` [>= len(drafts), V]:
    the distribution q each draft was drawn from (None: drafts chosen deterministically, q one-hot);
    greedy decoding ignores it."""
    drafts = list(drafts)
    if gen.temperature == 0:  # greedy, as sample_next_token: argmax, no randomness
        # A non-finite row reads -1: the flags ride on the one host sync with the argmaxes.
        best = torch.where(finite_rows(logits), argmax(logits), -1).tolist()  # [T]
        n = 0
        while n < len(drafts) and best[n] == drafts[n]:
            n += 1
        if best[n] < 0:
            return Verified(drafts[:n], n, complete=False)
        return Verified(drafts[:n] + [best[n]], n)
    ok = finite_rows(logits).tolist()  # [T]
    usable = ok.index(False) if not all(ok) else len(ok)  # rows before the first non-finite one
    if usable == 0:
        return Verified([], 0, complete=False)
    probs = sampling_probs(logits[:usable], gen.temperature, gen.top_k, gen.top_p)  # [usable, V]
    nd, n = min(len(drafts), usable), 0
    if nd:
        dev = logits.device
        rows, xs = torch.arange(nd, device=dev), torch.tensor(drafts[:nd], device=dev)  # [nd], [nd]
        p_draft = probs[rows, xs].double()  # [nd]
        u = torch.rand(nd, dtype=torch.float64, generator=generator, device=dev)  # [nd], in [0, 1)
        if draft_probs is None:
            keep = (u < p_draft).tolist()  # kept with probability p(x) exactly
        else:  # u < p / q without the division: kept with probability min(1, p(x) / q(x))
            keep = (u * draft_probs[rows, xs].double() < p_draft).tolist()
        n = keep.index(False) if not all(keep) else nd
    if n == usable:  # every usable row kept its draft; the next row is not finite
        return Verified(drafts[:n], n, complete=False)
    row = probs[n:n + 1]  # [1, V]
    if n < len(drafts) and draft_probs is not None:  # rejected: draw from norm(max(0, p - q))
        residual = (row.double() - draft_probs[n:n + 1].double()).clamp_min_(0.0)  # [1, V]
        # All zero: p <= q everywhere, so p == q up to rounding and the rejection itself was
        # rounding; p is then the residual's limit.
        row = residual if bool(residual.any()) else row
    elif n < len(drafts):  # rejected: draw from norm(max(0, p - onehot(x))), p without x
        x = drafts[n]
        row = row.clone()
        row[0, x] = 0.0
        if not bool(row.any()):  # p(x) was 1 up to rounding: nothing else can come
            return Verified(drafts[:n] + [x], n)
    return Verified(drafts[:n] + [int(draw(row, generator)[0])], n)


def speculative_step(model, cache: KVCache, last: int, position: int, drafts: Sequence[int],
                     gen: GenerationConfig, generator: torch.Generator | None,
                     draft_probs: torch.Tensor | None = None) -> Verified:
    """Feed ``last`` at ``position`` and ``drafts`` after it (row 0 of ``cache``) in one forward,
    apply :func:`verify` (``draft_probs``: the drafter's q, if any), and roll the rejected drafts'
    positions back out of the cache."""
    drafts = list(drafts)
    device = cache.device
    tokens = torch.tensor([[last, *drafts]], dtype=torch.long, device=device)  # [1, T]
    pos = torch.arange(position, position + len(drafts) + 1, device=device)[None]  # [1, T]
    logits = model(tokens, pos, cache)[0]  # [T, V]
    out = verify(logits, drafts, gen, generator, draft_probs)
    cache.forget(0, position + 1 + out.accepted, position + 1 + len(drafts))
    return out


def next_draft_length(k_now: int, k: int, drafted: int, accepted: int) -> int:
    """The adaptive draft length after a forward that verified ``drafted`` drafts and kept
    ``accepted``: up by 2 (to ``k``) when it kept them all, down by 1 (to 1) when not."""
    return min(k, k_now + 2) if accepted == drafted else max(1, k_now - 1)


def checked_drafts(drafts: Sequence[int], k: int, vocab_size: int) -> list[int]:
    """A drafter's proposal as at most ``k`` plain ints, each a token of the model's vocabulary."""
    out = [operator.index(t) for t in list(drafts)[:k]]
    for t in out:
        if not 0 <= t < vocab_size:
            raise ValueError(f"the drafter proposed token {t}, outside the vocabulary of {vocab_size}")
    return out


class SpeculativeDecoder:
    """Speculative decoding of one sequence over a one-row cache, forward by forward: what
    :func:`run_speculative` loops over and a benchmark times.

    ``context``: the sequence so far, whose last token is not yet in the cache (the cache holds
    positions 0..len(context) - 2, as after a prefill and the first sampled token); or the prompt
    alone, none of it in the cache, for :meth:`prefill` (which a :class:`FeatureDrafter` needs:
    it observes the prompt's hidden states there). Each :meth:`step` runs one forward and returns
    the tokens it yields, which are appended to ``context``. ``forwards``, ``drafted`` and
    ``accepted`` count what the steps did. The draft length adapts (module docstring) unless
    ``adaptive`` is False.
    """

    def __init__(self, model, cache: KVCache, gen: GenerationConfig, context: Sequence[int], *,
                 drafter: Drafter | None = None, generator: torch.Generator | None = None, adaptive: bool = True):
        if gen.speculate < 1:
            raise ValueError("speculative decoding needs gen.speculate >= 1")
        if cache.batch_size != 1 or not cache.can_roll_back(gen.speculate + 1):
            raise ValueError(f"speculative decoding needs a one-row cache with {gen.speculate} spare ring slots")
        self.model, self.cache, self.gen, self.generator = model, cache, gen, generator
        self.drafter = PromptLookupDrafter() if drafter is None else drafter
        self.features = isinstance(self.drafter, FeatureDrafter)
        if self.features:  # the target through its two halves, keeping hidden states for the drafter
            self.model = FeatureTap(model)
            self.drafter.begin(cache.max_len, gen, generator)
        self.context = list(context)
        self.k = self.k_now = gen.speculate
        self.adaptive = adaptive
        self.forwards = self.drafted = self.accepted = 0
        self.logits_dtype = torch.float32
        self._tokens = torch.zeros((1, 1), dtype=torch.long, device=cache.device)  # [1, 1], a plain step's input
        self._pos = torch.zeros((1, 1), dtype=torch.long, device=cache.device)  # [1, 1]

    @staticmethod
    def make_cache(model, max_len: int, k: int, batch_size: int = 1) -> KVCache:
        """A cache of ``batch_size`` rows (one for this decoder; the server's slots) for ``max_len``
        positions that takes back forwards of k + 1 tokens. Spare ring slots only where there is a
        ring to spare (a model without local layers keeps the plain ``make_cache`` signature)."""
        ring = KVCache.ring_size(model.config, max_len)
        if ring and ring < max_len and k > 0:
            return model.make_cache(batch_size, max_len, spare=k)
        return model.make_cache(batch_size, max_len)

    def prefill(self, *, pad_id: int = 0, chunk_size: int = PREFILL_CHUNK) -> torch.Tensor:
        """Write the context (a prompt, none of it cached yet) into the cache: the logits [1, V]
        at its last token, from which the caller samples the first token and appends it."""
        with torch.inference_mode():
            logits = prefill(self.model, self.cache, [self.context], pad_id=pad_id, chunk_size=chunk_size)  # [1, V]
            if self.features:
                self.drafter.observe(self.model.take())  # [P, d]
        return logits

    def step(self, budget: int, step: int) -> Verified:
        """One forward yielding at most ``budget`` (>= 1) tokens; ``step`` is the generation step
        of the first of them (for the message of a non-finite-logits error, raised here when a
        plain step meets one; a verification returns ``complete`` False after the tokens before)."""
        want = min(self.k_now, budget - 1)  # a forward yields at most len(drafts) + 1 tokens
        drafts = checked_drafts(self.drafter.propose(self.context, want), want,
                                self.model.config.vocab_size) if want > 0 else []
        q = self.drafter.draft_probs() if drafts and self.features else None
        position = len(self.context) - 1
        with torch.inference_mode():
            if drafts:
                out = speculative_step(self.model, self.cache, self.context[-1], position, drafts, self.gen,
                                       self.generator, None if q is None else q[:len(drafts)])
                self.drafted += len(drafts)
                self.accepted += out.accepted
                if self.adaptive:
                    self.k_now = next_draft_length(self.k_now, self.k, len(drafts), out.accepted)
            else:  # nothing to verify: exactly a plain decode step
                self._tokens.fill_(self.context[-1])
                self._pos.fill_(position)
                logits = decode_step(self.model, self._tokens, self._pos, self.cache)  # [1, V]
                self.logits_dtype = logits.dtype
                out = Verified(sample_checked(logits, self.generator, self.gen, [True], step)[1], 0)
            if self.features:  # the fed token's and the kept drafts' states (nothing after a non-finite row)
                hidden = self.model.take()  # [T, d]
                if out.complete:
                    self.drafter.observe(hidden[:out.accepted + 1])
        self.forwards += 1
        self.context.extend(out.tokens)
        return out


def run_speculative(model, row: RowState, gen: GenerationConfig, *, drafter: Drafter | None = None,
                    stats: GenerationStats | None = None, pad_id: int = 0, chunk_size: int = PREFILL_CHUNK,
                    cache: KVCache | None = None, adaptive: bool = True) -> Iterator[StepEvent]:
    """Generate for one row with speculative decoding, ``gen.speculate`` drafts per forward at
    most: the same :class:`StepEvent` stream as :func:`opengemma.generate.run_rows`.

    ``drafter`` None: a fresh :class:`PromptLookupDrafter`. ``cache``: a one-row cache with at
    least ``gen.speculate`` spare ring slots to use (tests inspect it afterwards), else one is
    made. The first token comes from the prefill as in plain decoding; a step whose drafter has
    nothing to propose is a plain decode step. ``adaptive`` False keeps the draft length at k.
    """
    t0 = time.perf_counter()
    g = make_generator(gen.seed, _device(model))
    with torch.inference_mode():
        if cache is None:
            compiled = getattr(model, "compiled_decode", None) is not None
            length = cache_length([row], model.config.context_length, pow2=compiled)
            cache = SpeculativeDecoder.make_cache(model, length, max(1, gen.speculate))
        decoder = SpeculativeDecoder(model, cache, gen, row.prompt_ids, drafter=drafter, generator=g,
                                     adaptive=adaptive)
        logits = decoder.prefill(pad_id=pad_id, chunk_size=chunk_size)  # [1, V]
        _, pending = sample_checked(logits, g, gen, [True], 1)
    decoder.context.extend(pending)
    clock = GenerationClock(stats, [row], t0, speculate=gen.speculate)
    clock.sampled(1)
    complete = True
    try:
        while True:
            for t in pending:
                event = StepEvent(tokens=[t], texts=[row.push(t)])
                yield event
                if row.finished:  # a stop, the budget, or finished from outside
                    return
            if not complete:
                raise nonfinite_error(row.completion_tokens + 1, decoder.logits_dtype)
            out = decoder.step(row.max_new_tokens - row.completion_tokens, row.completion_tokens + 1)
            pending, complete = out.tokens, out.complete
            clock.forwards, clock.drafted, clock.accepted = decoder.forwards, decoder.drafted, decoder.accepted
    finally:
        clock.done()
