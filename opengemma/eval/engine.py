"""Batched log-likelihood scoring with prefix reuse, and batched generation, for the evaluation
harness (report section "Evaluation": every Table 6 number is either a log-likelihood comparison
of choices or a generated answer).

A multiple-choice item is a list of (context, continuation) token pairs, one per choice, behind a
*prefix* shared by every item of a run (``<bos>`` plus the few-shot examples). Scoring computes
each distinct piece once:

1. the prefix, once per run (a one-row KV cache kept for the whole task);
2. each distinct context of a batch once, on rows copied from the prefix cache (WinoGrande's two
   contexts are two rows; every other task has one context per item);
3. the continuations, on rows copied from their context's row; a one-token continuation (a letter,
   "yes"/"no") needs no third forward at all: its log-probability is read from the context's
   last-position logits.

``score_naive`` scores every (prefix + context + continuation) from scratch; it is the oracle the
tests compare against and the baseline of ``bench/eval_prefix_reuse.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import OpenGemmaError
from ..quant.head import exact_head
from ..generate import Completion, GenerationConfig, NonFiniteLogitsError, generate, prefill
from ..cache import KVCache
from ..logprobs import from_logits, token_logprobs

Pair = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


@dataclass(frozen=True)
class LoglikRequest:
    """One item: a shared prefix (non-empty: at least <bos>) and one (context, continuation) per choice."""

    prefix: tuple[int, ...]
    pairs: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]

    @staticmethod
    def make(prefix: Sequence[int], pairs: Sequence[Pair]) -> LoglikRequest:
        if not prefix:
            raise ValueError("the prefix needs at least one token (<bos>)")
        if any(len(c) == 0 for _, c in pairs):
            raise ValueError("every continuation needs at least one token")
        return LoglikRequest(tuple(prefix), tuple((tuple(a), tuple(b)) for a, b in pairs))


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad(rows: Sequence[Sequence[int]], start: Sequence[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens [B, T] and positions [B, T] (row i at start[i].., padding -1)."""
    T = max(1, max(len(r) for r in rows))
    tokens = torch.zeros((len(rows), T), dtype=torch.long)
    pos = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            tokens[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
            pos[i, :len(r)] = torch.arange(start[i], start[i] + len(r))
    return tokens.to(device), pos.to(device)


def _finite(results: list[list[tuple[float, bool]]]) -> list[list[tuple[float, bool]]]:
    """``results`` unchanged, or NonFiniteLogitsError if a log-probability is NaN/inf: the model's
    logits were not finite (a log-softmax of finite logits is finite), and a NaN score would
    silently lose every comparison. The values are host floats already: the check is free."""
    if not all(math.isfinite(lp) for res in results for lp, _ in res):
        raise NonFiniteLogitsError("the model produced non-finite logits (NaN/inf) while scoring: "
                                   "the weights are probably corrupt")
    return results


class Scorer:
    """Scores :class:`LoglikRequest` lists with a model that has ``forward(tokens, input_pos,
    cache, logits_at)`` and ``make_cache`` (a :class:`~opengemma.model.GemmaModel` or a test mock).

    ``batch_size`` bounds the continuation rows of one forward, ``max_tokens`` the tokens whose
    full-vocabulary logits are materialised at once (memory: max_tokens x vocab x 4 bytes).
    """

    def __init__(self, model, *, batch_size: int = 32, max_tokens: int = 512):
        self.model = model
        self.batch_size = max(1, batch_size)
        self.max_tokens = max(1, max_tokens)
        self._prefix: dict = {}  # (prefix ids, max_len) -> (one-row cache, last logits [V])

    # -- public ---------------------------------------------------------------------------------
    def score(self, requests: Sequence[LoglikRequest],
              progress: Callable[[int], None] | None = None) -> list[list[tuple[float, bool]]]:
        """Per request, per choice: (sum of continuation log-probs, continuation is the greedy one)."""
        out: list = [None] * len(requests)
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        top = max((max(r.prefix + tuple(t for a, b in r.pairs for t in a + b)) for r in requests), default=0)
        if vocab is not None and top >= vocab:
            raise OpenGemmaError(f"token id {top} is outside the model's vocabulary of {vocab}: "
                                 "the tokenizer does not match this model")
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.prefix, []).append(i)
        # A screened quantized head (quantize="mixed") is exact only for its top candidates:
        # log-likelihood scoring reads the full 8-bit head.
        with torch.inference_mode(), exact_head(self.model):
            for prefix, idx in groups.items():
                longest = max(len(a) + len(b) for i in idx for a, b in requests[i].pairs)
                max_len = -(-(len(prefix) + longest) // 64) * 64
                pcache, plogits = self._prefix_cache(prefix, max_len)
                # Longest first (as lm-eval): similar lengths share a batch, padding stays small.
                idx = sorted(idx, key=lambda i: -max(len(a) + len(b) for a, b in requests[i].pairs))
                batch: list[int] = []
                rows = 0
                for i in idx + [None]:
                    n = len(requests[i].pairs) if i is not None else 0
                    if batch and (i is None or rows + n > self.batch_size):
                        for j, res in zip(batch, self._score_batch([requests[j] for j in batch], pcache,
                                                                   plogits, len(prefix))):
                            out[j] = res
                        if progress:
                            progress(len(batch))
                        batch, rows = [], 0
                    if i is not None:
                        batch.append(i)
                        rows += n
        return out

    def score_naive(self, requests: Sequence[LoglikRequest],
                    progress: Callable[[int], None] | None = None) -> list[list[tuple[float, bool]]]:
        """The same numbers, each choice scored alone from position 0 (no reuse): the oracle."""
        dev = _device(self.model)
        out = []
        with torch.inference_mode(), exact_head(self.model):
            for r in requests:
                res = []
                for ctx, cont in r.pairs:
                    seq = list(r.prefix) + list(ctx) + list(cont)
                    tokens = torch.tensor([seq[:-1]], device=dev)
                    hidden = self.model.trunk(tokens)[0, -len(cont):]  # [len(cont), D]
                    lp, greedy = token_logprobs(self.model, hidden, torch.tensor(cont, device=dev), greedy=True)
                    res.append((float(lp.sum()), bool(greedy.all())))
                out.append(_finite([res])[0])
                if progress:
                    progress(1)
        return out

    # -- internals ------------------------------------------------------------------------------
    def _prefix_cache(self, prefix: tuple[int, ...], max_len: int):
        key = (prefix, max_len)
        if key not in self._prefix:
            if len(self._prefix) > 8:  # a run uses one or a few prefixes; do not grow without bound
                self._prefix.clear()
            cache = self.model.make_cache(1, max_len)
            logits = prefill(self.model, cache, [list(prefix)])[0]  # [V]
            self._prefix[key] = (cache, logits)
        return self._prefix[key]

    def _score_batch(self, reqs: Sequence[LoglikRequest], pcache: KVCache, plogits: torch.Tensor,
                     plen: int) -> list[list[tuple[float, bool]]]:
        dev = plogits.device
        # 1. distinct contexts of the batch, one row each
        ctx_ids: list[tuple[int, ...]] = []
        ctx_of: list[list[int]] = []  # per request, per choice: row of its context
        for r in reqs:
            seen: dict[tuple[int, ...], int] = {}
            rows = []
            for ctx, _ in r.pairs:
                if ctx not in seen:
                    seen[ctx] = len(ctx_ids)
                    ctx_ids.append(ctx)
                rows.append(seen[ctx])
            ctx_of.append(rows)
        n_ctx = len(ctx_ids)
        ccache = pcache.take([0] * n_ctx)
        lens = [len(c) for c in ctx_ids]
        first = plogits[None].expand(n_ctx, -1)  # [C, V] logits for the first continuation token
        if max(lens) > 0:
            logits = prefill(self.model, ccache, [c or None for c in ctx_ids], start=plen)  # [C, V]
            has = torch.tensor([n > 0 for n in lens], device=dev)[:, None]
            first = torch.where(has, logits, first)
        # 2. first continuation token of every choice, from its context's last logits
        choices = [(i, j) for i, r in enumerate(reqs) for j in range(len(r.pairs))]
        rows = torch.tensor([ctx_of[i][j] for i, j in choices], device=dev)
        heads = torch.tensor([reqs[i].pairs[j][1][0] for i, j in choices], device=dev)
        lp, greedy, _ = from_logits(first.index_select(0, rows), heads)  # [choices] each
        results: list[list[list]] = [[None] * len(r.pairs) for r in reqs]
        for (i, j), a, b in zip(choices, lp.tolist(), greedy.tolist()):
            results[i][j] = [a, b]
        long_rows = [(i, j) for i, j in choices if len(reqs[i].pairs[j][1]) > 1]  # need a continuation forward
        # 3. the remaining continuation tokens, on copies of the context rows
        start = 0
        while start < len(long_rows):
            width = max(len(reqs[i].pairs[j][1]) - 1 for i, j in long_rows[start:start + self.batch_size])
            take = max(1, min(self.batch_size, self.max_tokens // max(width, 1)))
            chunk = long_rows[start:start + take]
            start += take
            kcache = ccache.take([ctx_of[i][j] for i, j in chunk])
            conts = [reqs[i].pairs[j][1] for i, j in chunk]
            tokens, pos = _pad([c[:-1] for c in conts], [plen + lens[ctx_of[i][j]] for i, j in chunk], dev)
            hidden = self.model.trunk(tokens, pos, kcache)  # [R, T, D]
            targets, _ = _pad([c[1:] for c in conts], [0] * len(conts), dev)
            lp, greedy = token_logprobs(self.model, hidden, targets, greedy=True)  # [R, T]
            for row, ((i, j), c) in enumerate(zip(chunk, conts)):
                m = len(c) - 1
                results[i][j][0] += float(lp[row, :m].sum())
                results[i][j][1] = results[i][j][1] and bool(greedy[row, :m].all())
        return _finite([[(float(a), bool(b)) for a, b in res] for res in results])


def generate_completions(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                         stop: Sequence[str] = (), temperature: float = 0.0, top_p: float | None = None,
                         seed: int | None = 0, batch_size: int = 8,
                         progress: Callable[[int], None] | None = None) -> list[Completion]:
    """Generate for every prompt (token ids) in batches, with stop strings; returns one
    :class:`~opengemma.generate.Completion` per prompt (text, finish reason, token counts).
    ``top_p``: nucleus sampling (the toxicity benchmarks' setting); None keeps every token."""
    # Similar lengths together: less padding; results go back in the original order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    done: dict[int, Completion] = {}
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               seed=None if seed is None else seed + s, stop=tuple(stop))
        for i, c in zip(chunk, generate(model, tokenizer, [list(prompts[i]) for i in chunk], gen)):
            done[i] = c
        if progress:
            progress(len(chunk))
    return [done[i] for i in range(len(prompts))]


def generate_texts(model, tokenizer, prompts: Sequence[Sequence[int]], **kw) -> list[str]:
    """:func:`generate_completions`' texts alone."""
    return [c.text for c in generate_completions(model, tokenizer, prompts, **kw)]
