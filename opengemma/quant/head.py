"""The screened output head of ``quantize="mixed"``: an 8-bit head read at 4-bit cost when decoding.

At batch 1 a decode step streams every weight from memory once, and the tied 262,144 x 640 head
of Gemma 3 270M is most of them: 168 MB as int8 (the embedded GGUF keeps it Q8_0), against ~91 MB
for the whole trunk. Re-quantizing it to 4 bits (``int4`` mode) reads 105 MB instead but costs
quality. :class:`ScreenedEmbedding` keeps the 8-bit head and adds a 4-bit copy of it (groups of
32, the int4 kernel of :mod:`.linear`) that only *screens*:

1. all V logits are scored with the 4-bit copy (one packed int4 matmul, 105 MB);
2. the top ``candidates`` (C, default 64) of each row are taken (:func:`top_candidates`: chunk
   maxima first, then ``topk`` inside the best C chunks; 5x faster than ``torch.topk`` on a row);
3. those C are re-scored from their 8-bit rows (``Int8Linear.columns``: C x 640 bytes);
4. the returned logits carry the exact 8-bit value at the C candidates and the 4-bit value elsewhere.

What is exact and what is not:

* The C candidates' logits equal the int8 head's bitwise (the same packed int8 kernel, one dot
  product per output; on a device without it, up to the activation dtype's rounding).
* **Greedy** decoding: the argmax of the returned row is always a candidate (a row where a
  non-candidate's 4-bit score could reach the best exact candidate is re-scored with the full
  8-bit head: a *fallback*, counted in :attr:`ScreenedEmbedding.stats`). It equals the full 8-bit
  head's argmax unless the 8-bit winner ranked below C-th in the 4-bit scores. Measured on the
  embedded model (400 positions of the Gemma report): the 8-bit winner's rank among the 4-bit
  scores was at most 4 (0 at the median), the 4-bit error's standard deviation 0.37 logits, so
  C = 64 leaves a wide margin; tests/test_quant_head.py counts top-1 differences from the full
  int8 head over a few hundred positions (expected 0).
* **Sampling and log-probs** see the 4-bit values outside the top C: top-k sampling with k <= C and
  nucleus sampling whose nucleus lies in the top C draw from exact values except for the
  normaliser's tail; a sampled token outside the top C, or the log-prob of one (serving's
  ``logprobs``), carries the 4-bit error (~0.4 logits).
* Only calls of at most ``max_rows`` rows (a decode step, a prompt's last position, a
  speculative verification) are screened; more rows (bulk scoring through ``token_logprobs``,
  perplexity) take the exact 8-bit path, as does everything inside :func:`exact_head`. A row's
  result does not depend on the other rows of the call (bitwise: both packed kernels score each
  row alone, and the selection is per row), so a verification forward of k + 1 rows gives each
  row what a decode step would.

Rows (issue 19, part C; bench/results/quant-rows-xeon.md, 1 thread, busy machine): the screen's
int4 kernel, like the int8 one, costs per block of 4 rows (9 rows: ~3.5x one row); ``torch.topk``
and a bf16 ``scatter_`` (which copied all M x V logits) made 9 rows cost ~15 ms more; with
:func:`top_candidates` and ``index_put_`` ~3 ms. Screening stays ahead of the exact 8-bit head
to 32 rows with fp32 activations and to ~24 with bf16 ones, where the exact head's dense route
(:func:`.linear.tiled_matmul`) takes over; ``max_rows`` stays 32 (it is also stored in cached
models' plans, :mod:`.store`).

The embedding lookup (``forward(ids)``) reads the 8-bit rows, as in ``int8`` mode. Memory: the
screen adds 105 MB to the int8 model (held and cached with it, :mod:`.store`); it is built from
the 8-bit values themselves (it approximates the head it screens) with min/max grids, not the
least-squares search of ``int4`` mode: the search costs ~8x the time and screened no better
(error std 0.366 vs 0.368, the same winner ranks).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .linear import (
    _CHUNK_ROWS,
    DEFAULT_GROUP,
    Int4Linear,
    Int8Linear,
    QuantizedEmbedding,
    build_int4,
    quantize_int4,
)

__all__ = ["DEFAULT_CANDIDATES", "SCREEN_ROWS", "ScreenStats", "ScreenedEmbedding", "build_screen",
           "decode_weight_bytes", "exact_head", "screen_head", "top_candidates"]

DEFAULT_CANDIDATES = 64
SCREEN_ROWS = 32  # calls of more rows take the exact 8-bit head (module docstring, "Rows")
TOPK_CHUNK = 128  # top_candidates' chunk: 64-256 measured equal on the 262144-wide head, 1024 slower


@dataclass
class ScreenStats:
    """Rows scored through the screen, and how many of them fell back to the full 8-bit head."""

    rows: int = 0
    fallbacks: int = 0


class ScreenedEmbedding(QuantizedEmbedding):
    """A :class:`QuantizedEmbedding` over an 8-bit matrix whose ``attend`` screens with a 4-bit copy
    (see the module docstring for what is exact). ``candidates``, ``max_rows`` and ``screening``
    are plain attributes: set them to change how later calls run."""

    def __init__(self, inner: Int8Linear, screen: Int4Linear, *, candidates: int = DEFAULT_CANDIDATES,
                 max_rows: int = SCREEN_ROWS):
        if not isinstance(inner, Int8Linear) or not isinstance(screen, Int4Linear):
            raise TypeError("a screened head needs an Int8Linear head and an Int4Linear screen")
        if (screen.out_features, screen.in_features) != (inner.out_features, inner.in_features):
            raise ValueError(f"screen shape {(screen.out_features, screen.in_features)} differs from the head's "
                             f"{(inner.out_features, inner.in_features)}")
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        super().__init__(inner)
        self.screen = screen
        self.candidates, self.max_rows, self.screening = int(candidates), int(max_rows), True
        self.stats = ScreenStats()

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, self.embedding_dim)  # [M, K]
        V, C = self.num_embeddings, self.candidates
        if not self.screening or x.shape[0] > self.max_rows or C >= V:
            return self.inner(h)
        # fp32 scores (the values of bf16 activations are exact in fp32): the selection's passes over
        # the V scores run several times faster on fp32 than on bf16 on the CPU, and the model
        # returns fp32 logits anyway
        logits = self.screen(x.float())  # [M, V] 4-bit scores, fp32
        top, idx = top_candidates(logits, C)  # [M, C], largest first
        return self._rescore(x, logits, top[:, -1], idx).reshape(*h.shape[:-1], V)

    # Eager even inside a compiled decode step (opengemma.compiled applies torch.compiler.disable
    # to these when it compiles; as a decorator it would import torch._dynamo, ~1 s of every
    # command's start-up): inductor cannot lower the packed int8 kernel on gathered rows, and the
    # fallback's branch depends on the data.
    compile_eager = ("_rescore",)

    def _rescore(self, x: torch.Tensor, logits: torch.Tensor, last: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The candidates' exact values into ``logits`` [M, V], the fallback, the counts (eager
        under ``torch.compile``: ``compile_eager``)."""
        exact = self.inner.columns(x, idx).to(logits.dtype)  # [M, C] the 8-bit head's values
        # index_put_, not scatter_: on bf16 logits scatter_ copied all M x V of them (~0.5 ms a row)
        logits.index_put_((torch.arange(x.shape[0], device=x.device)[:, None].expand_as(idx), idx), exact)
        # Every non-candidate scored at most ``last`` (the C-th 4-bit score); where that reaches the
        # best exact candidate, the argmax could land on an approximate value: score the row fully.
        risky = exact.max(dim=-1).values <= last  # [M]
        n = int(risky.sum())
        if n:
            rows = risky.nonzero()[:, 0]
            logits[rows] = self.inner(x[rows])
        self.stats.rows += x.shape[0]
        self.stats.fallbacks += n
        return logits

    def extra_repr(self) -> str:
        return f"candidates={self.candidates}, max_rows={self.max_rows}, screening={self.screening}"


def top_candidates(scores: torch.Tensor, C: int, chunk: int = TOPK_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores.topk(C, dim=-1)`` for scores [M, V]: the C largest values of each row, largest
    first, and their indices, in two cheaper passes where V has many chunks of ``chunk`` values:

    1. each chunk's maximum ([M, V / chunk]), and the C chunks with the largest maxima;
    2. ``topk`` over those C chunks' values only ([M, C * chunk], 1/16 of a 262144-wide row).

    Exact: fewer than C values exceed the C-th largest v, so fewer than C chunks have a maximum
    above v; the C chunks chosen hold all of those, and one with a maximum of v if needed, hence
    the same C values (which of several tied values is returned may differ). The embedded 270M's
    head, one thread: 1.1 -> 0.2 ms for a row, 7.3 -> 1.7 ms for 9 rows (fp32 scores).
    """
    M, V = scores.shape
    n = V // chunk
    if V % chunk or n < 4 * C or not scores.is_contiguous():
        return scores.topk(C, dim=-1)
    best = scores.view(M, n, chunk).amax(dim=-1)  # [M, n]
    chunks = best.topk(C, dim=-1).indices  # [M, C]
    cand = (chunks[:, :, None] * chunk + torch.arange(chunk, device=scores.device)).view(M, C * chunk)  # [M, C*chunk]
    values, j = scores.gather(1, cand).topk(C, dim=-1)  # [M, C]
    return values, cand.gather(1, j)


def build_screen(inner: Int8Linear, group_size: int = DEFAULT_GROUP) -> Int4Linear:
    """The 4-bit copy of an int8 matrix, quantized from its own 8-bit values (min/max grids per
    group, bf16 scales), in row chunks so that no float copy of the whole matrix is made."""
    N, K = inner.out_features, inner.in_features
    chunks = (quantize_int4(inner.dequantize(torch.arange(i, min(i + _CHUNK_ROWS, N), device=inner.qweight.device)),
                            group_size, inner.compute_dtype, search=False) for i in range(0, N, _CHUNK_ROWS))
    return build_int4(chunks, N, K, group_size, act_dtype=inner.act_dtype, compute_dtype=inner.compute_dtype,
                      device=inner.qweight.device)


def screen_head(model: nn.Module, *, candidates: int = DEFAULT_CANDIDATES) -> nn.Module:
    """Give ``model.embed`` (an int8 :class:`QuantizedEmbedding`) a 4-bit screen, in place. A
    width that is not a multiple of the int4 group (no Gemma's) keeps the plain 8-bit head."""
    emb = model.embed
    if isinstance(emb, ScreenedEmbedding):
        return model
    if not isinstance(emb, QuantizedEmbedding) or not isinstance(emb.inner, Int8Linear):
        raise TypeError("screen_head needs a model whose embedding is int8-quantized")
    if emb.embedding_dim % DEFAULT_GROUP:
        return model
    model.embed = ScreenedEmbedding(emb.inner, build_screen(emb.inner), candidates=candidates)
    return model


@contextlib.contextmanager
def exact_head(model: nn.Module):
    """Within the block, a screened head scores every row with its full 8-bit matrix (for
    log-likelihood scoring that must not see 4-bit values); a no-op for any other head."""
    emb = getattr(model, "embed", None)
    if not isinstance(emb, ScreenedEmbedding):
        yield model
        return
    before, emb.screening = emb.screening, False
    try:
        yield model
    finally:
        emb.screening = before


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one batch-1 decode step reads: every parameter and buffer once (packed
    weights, scales, norms; the tied matrix once, as the head reads all of it), except that a
    screened head reads its 4-bit copy, its C candidate rows and the looked-up row instead of the
    8-bit matrix. A lower bound on memory traffic (activations and the KV cache are not counted)."""
    seen, total = set(), 0
    emb = getattr(model, "embed", None)
    skip = {id(t) for t in (emb.inner.qweight, emb.inner.scales)} if isinstance(emb, ScreenedEmbedding) else set()
    for t in [*model.parameters(), *model.buffers()]:
        if t is None or id(t) in skip or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    if isinstance(emb, ScreenedEmbedding):
        inner = emb.inner
        row = inner.in_features * inner.qweight.element_size() + inner.scales.element_size()
        total += (min(emb.candidates, emb.num_embeddings) + 1) * row  # the candidates and the looked-up row
    return total
