"""Next-token sampling: temperature, top-k and top-p (nucleus) over a batch of logits.

Part of the inference engine that runs the models of report section "Model Architecture"; the
report itself samples greedily for most evaluations, and the instruction-tuned models are usually
served with temperature/top-k/top-p sampling, which is what this module provides.

The distribution of a row with temperature T > 0 is softmax(logits / T), restricted to the
``top_k`` most likely tokens (exactly k of them: ties are broken by lower token id), then to the
nucleus: the smallest set of most likely tokens (same order) whose mass reaches ``top_p``,
renormalised. T = 0 is greedy (argmax).

How it avoids sorting the vocabulary (262,144 entries for Gemma 3; one sort costs ~30 draws):

* rows without top-k or top-p draw by inverse CDF over the whole softmax (one uniform variate,
  float64 cumulative sums over blocks of the row, then inside the chosen block): no sort;
* rows with top-p alone (p >= 0.5) draw the same way and keep the draw if it lies in the nucleus,
  i.e. if the mass of the tokens before it is < p (a few passes over the row, no sort), else
  draw again: rejection sampling, exact, each try accepted with probability >= p;
* other filtered rows keep candidates from ``topk`` (searched only in the blocks with the largest
  maxima): the k best for top-k, top-p being a prefix of those; for top-p alone the 256 best,
  and if their mass falls short of p, the tokens above a threshold that a one-pass histogram of
  log-probabilities says holds mass >= p. Exact, not a heuristic: the nucleus is a prefix of the
  sorted order, so candidates holding mass >= p hold the nucleus (a full sort remains the last
  resort). Gemma 3 270M's nucleus at T = 1, p = 0.95 over its own sampled text: 65 tokens at
  the median, over 256 at 22% of the steps, 2,270 at most (246 steps). :func:`sampling_probs`
  always takes this path, so it states the distribution the rejection path draws from.

Ties are broken by lower token id, so the result never depends on the order in which ``topk``
returns equal logits.

Everything is pure and batched: one call handles every row of the batch, each row may carry its
own temperature / top_k / top_p, and randomness comes only from the explicit ``torch.Generator``
passed in (never the global RNG), so results are reproducible and two requests in one batch cannot
disturb each other's streams. The per-row parameters are read on the host (a sync for tensors),
and each candidate round or rejection try costs a sync or two: the price of not sorting.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator

import torch

from .errors import OpenGemmaError

Number = float | int
PerRow = Number | torch.Tensor

# Top-p rows first take this many candidates: they hold the nucleus of most steps of a real model
# (p = 0.95: ~80% of them), and finding them costs a fifth of a plain topk (TOP_BLOCK).
FIRST_CANDIDATES = 256
# The histogram that bounds a larger nucleus: quarter-nat bins of log-probability, 32 nats deep.
BINS_PER_NAT = 4
N_BINS = 128
# topk through block maxima: the n largest entries lie in the n blocks with the largest maxima, so
# one cheap pass (block maxima) leaves n * TOP_BLOCK entries for topk instead of V (~5x faster).
TOP_BLOCK = 64
# Top-p rows without top-k and p >= REJECTION_MIN_P draw from the whole softmax and keep the draw
# if it lies in the nucleus, else draw again (rejection sampling: exact, no candidates at all,
# each try accepted with probability >= p); after REJECTION_TRIES misses they take candidates.
REJECTION_MIN_P = 0.5
REJECTION_TRIES = 8
# Draws over a whole row pick a block of DRAW_BLOCK tokens by its mass, then a token inside it:
# two short float64 cumulative sums instead of one over V.
DRAW_BLOCK = 1024


def _values(value: PerRow, name: str, batch: int) -> list:
    """A scalar or a [B] tensor as a list of B Python numbers (one host sync for a tensor)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return [value.item()] * batch
        if value.shape != (batch,):
            raise OpenGemmaError(f"per-row {name} needs shape [{batch}], got {list(value.shape)}")
        return value.tolist()
    return [value] * batch


def _temperature(t) -> float:
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise OpenGemmaError(f"temperature must be a number, got {t!r}")
    try:
        f = float(t)
    except OverflowError:  # a Python int beyond float range
        f = math.inf
    if not (math.isfinite(f) and f >= 0):
        raise OpenGemmaError(f"temperature must be a finite number >= 0, got {t!r}")
    return f


def _top_k(k, vocab: int) -> int:
    """top_k as 1..vocab: 0 (off) and anything >= vocab, however large, mean no limit."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise OpenGemmaError(f"top_k must be an integer, got {k!r}")
    if k < 0:
        raise OpenGemmaError(f"top_k must be >= 0 (0 disables it), got {k}")
    return vocab if k == 0 else int(min(k, vocab))  # clamped in Python: no overflow building tensors


def _top_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
        raise OpenGemmaError(f"top_p must be in (0, 1], got {p!r}")
    return float(p)


def _params(logits: torch.Tensor, temperature: PerRow, top_k: PerRow | None,
            top_p: PerRow | None) -> tuple[list[float], list[int], list[float]]:
    """Validated per-row temperature, top_k (1..V; V = off) and top_p (1.0 = off) as lists."""
    if logits.dim() != 2:
        raise OpenGemmaError(f"logits must be [batch, vocab], got shape {list(logits.shape)}")
    B, V = logits.shape
    if isinstance(top_k, torch.Tensor) and (top_k.is_floating_point() or top_k.is_complex()
                                            or top_k.dtype == torch.bool):
        raise OpenGemmaError(f"top_k must be an integer tensor, got {top_k.dtype}")
    temps = [_temperature(t) for t in _values(temperature, "temperature", B)]
    ks = [V] * B if top_k is None else [_top_k(k, V) for k in _values(top_k, "top_k", B)]
    ps = [1.0] * B if top_p is None else [_top_p(p) for p in _values(top_p, "top_p", B)]
    return temps, ks, ps


def _groups(logits: torch.Tensor, temps: list[float], ks: list[int], ps: list[float],
            rejection: bool) -> Iterator[tuple[str, list[int], torch.Tensor]]:
    """The rows with T > 0 in groups by how they are drawn: (kind, rows, x [b, V]), x the rows'
    logits / T shifted to a maximum of 0, a new fp32 tensor. Kinds: "plain" (no filter), "nucleus"
    (top-p alone, p >= REJECTION_MIN_P; only if ``rejection``), "filtered" (the rest)."""
    V = logits.shape[1]

    def kind(r: int) -> str:
        if ks[r] >= V and ps[r] >= 1:
            return "plain"
        return "nucleus" if rejection and ks[r] >= V and ps[r] >= REJECTION_MIN_P else "filtered"

    for name in ("plain", "nucleus", "filtered"):
        rows = [r for r, t in enumerate(temps) if t > 0 and kind(r) == name]
        if not rows:
            continue
        x = logits if len(rows) == logits.shape[0] else logits.index_select(
            0, torch.tensor(rows, device=logits.device))  # [b, V]
        # Shift by the row maximum before dividing: the same softmax, but a tiny T gives a one-hot
        # instead of inf - inf = NaN. The shift keeps the order, hence top-k and top-p.
        x = x.float()
        x = x - x.amax(dim=-1, keepdim=True)  # [b, V], max 0; a new tensor, free to change in place
        if any(temps[r] != 1.0 for r in rows):
            x.div_(torch.tensor([temps[r] for r in rows], device=x.device)[:, None])  # [b, V]
        yield name, rows, x


def _topk(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(n)`` for x [b, V] (values and ids [b, n], descending; ties in no promised order).

    When n is small next to V, only the n blocks of TOP_BLOCK entries with the largest maxima are
    searched: every entry outside them is <= the n-th largest block maximum, and the n maxima
    inside are >= it, so their top n are the row's (values exactly; which of several equal
    entries, as topk itself leaves open).
    """
    b, V = x.shape
    nb = V // TOP_BLOCK
    if V % TOP_BLOCK or n > nb // 2:
        return x.topk(n, dim=-1)
    blocks = x.reshape(b, nb, TOP_BLOCK)  # [b, nb, blk]; a view of contiguous x
    best = blocks.amax(dim=-1).topk(n, dim=-1).indices  # [b, n] blocks
    sub = blocks.gather(1, best[:, :, None].expand(b, n, TOP_BLOCK)).reshape(b, n * TOP_BLOCK)  # [b, n*blk]
    vals, pos = sub.topk(n, dim=-1)  # [b, n]
    return vals, best.gather(1, pos // TOP_BLOCK) * TOP_BLOCK + pos % TOP_BLOCK


def _top(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m largest entries of each row of x [b, V], values and ids [b, m'], in canonical order
    (value descending, then token id ascending), m' >= m grown so that no token left out ties
    with the smallest candidate: then any prefix of the result is a prefix of the stably sorted row.
    """
    V = x.shape[1]
    while m < V // 2:  # beyond half the row, topk is no cheaper than a sort
        vals, ids = _topk(x, m + 1)  # [b, m + 1], descending, ties in no promised order
        low = vals[:, m - 1]  # [b]: the smallest candidate
        # The one extra entry tells whether a token left out ties with the smallest candidate
        # (-inf ties do not matter: probability 0). Then widen to all tokens >= it: rare.
        tied = (vals[:, m] == low) & (low > -math.inf)  # [b]
        if not bool(tied.any()):
            ids, by_id = ids[:, :m].sort(dim=-1)  # [b, m], id ascending ...
            vals, order = vals[:, :m].gather(1, by_id).sort(dim=-1, descending=True, stable=True)  # ... then value
            return vals, ids.gather(1, order)
        m = max(m + 1, int((x >= low[:, None]).sum(dim=-1).max()))
    return x.sort(dim=-1, descending=True, stable=True)  # [b, V] each; stable: ties by id


def _threshold_sets(x: torch.Tensor, e: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    """For each row of x [s, V] (scaled logits, max 0; e = exp(x)), the ids (ascending) of a set
    {x >= t} holding mass >= target [s] (same scale as e): a set that contains the row's nucleus.

    One histogram pass: tokens binned by log-probability below the row's best in quarter-nat bins
    (floor is monotone, so the bins down to any one form a threshold set), taken down to the first
    bin whose cumulative mass reaches the target.
    """
    s = x.shape[0]
    # nan_to_num: a NaN (non-finite logits, reported elsewhere) gets a valid bin, not a bad index.
    bins = (x * -BINS_PER_NAT).nan_to_num_(nan=N_BINS - 1).clamp_(0, N_BINS - 1).long()  # [s, V]
    mass = torch.zeros(s, N_BINS, dtype=torch.float64, device=x.device).scatter_add_(1, bins, e.double())  # [s, N]
    # float64 bin sums; a margin of 1e-6 keeps the set on the safe side of the check that follows
    # (fp32 probabilities and normaliser: ~1e-7 relative), and p = 0.999 still short of the row.
    last = (mass.cumsum(dim=1) < target.double()[:, None] * (1 + 1e-6)).sum(dim=1)  # [s]
    return [torch.nonzero(bins[i] <= j).squeeze(1) for i, j in enumerate(last.tolist())]


def _widen(x: torch.Tensor, e_row: torch.Tensor, vals: torch.Tensor, ids: torch.Tensor, short: torch.Tensor,
           target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the candidates of the ``short`` rows [b] (bool) by a threshold set holding their
    nucleus, in canonical order; rows are padded to one width with -inf (probability 0, never kept)."""
    rows = torch.nonzero(short).squeeze(1).tolist()
    if len(rows) == x.shape[0]:  # all rows (the server's case, one row per call): no copies
        sets = _threshold_sets(x, e_row, target)
    else:
        sets = _threshold_sets(x[short], e_row[short], target[short])
    width = max([vals.shape[1]] + [len(t) for t in sets])
    new_vals = torch.full((x.shape[0], width), -math.inf, device=x.device)  # [b, width]
    new_ids = torch.zeros(x.shape[0], width, dtype=torch.long, device=x.device)  # [b, width]
    new_vals[:, :vals.shape[1]], new_ids[:, :ids.shape[1]] = vals, ids
    for r, t in zip(rows, sets):
        # Ids come ascending from nonzero: a stable descending sort gives the canonical order.
        v, order = x[r, t].sort(descending=True, stable=True)
        new_vals[r], new_ids[r] = -math.inf, 0
        new_vals[r, :len(t)], new_ids[r, :len(t)] = v, t[order]
    return new_vals, new_ids


def _candidates(x: torch.Tensor, ks: list[int], ps: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k then top-p on scaled logits x [b, V] (max 0): probabilities [b, m] (summing to 1) of
    tokens ids [b, m], m much smaller than V unless the filters keep most of the vocabulary.

    The candidates are the k best for top-k rows. Top-p rows (no top-k) first try the
    FIRST_CANDIDATES best; those whose mass falls short of p take a threshold set from a histogram
    instead; a full sort is the last resort (the histogram's rounding).
    """
    b, V = x.shape
    k = torch.tensor(ks, device=x.device)  # [b], 1..V
    p = torch.tensor(ps, dtype=torch.float64, device=x.device)  # [b]
    p_only = k >= V  # [b]: top-p alone; normalised over the whole row, nucleus size unknown
    # Top-p-only rows normalise over the whole row (x's maximum is 0: exp cannot overflow).
    e_row = x.exp() if max(ks) >= V else None  # [b, V]
    z_row = e_row.sum(dim=-1) if e_row is not None else None  # [b]: whole-row mass

    def filtered(vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities [b, m] of candidates vals [b, m] after top-k, and their float64 prefix sums:
        with p near 1 the nucleus ends among thousands of tiny probabilities, where fp32 sums
        would misplace its edge by several tokens."""
        keep = torch.arange(vals.shape[1], device=x.device)[None, :] < k[:, None]  # [b, m]: exactly k survive
        e = vals.exp().masked_fill_(~keep, 0.0)  # [b, m]
        z = e.sum(dim=-1)  # [b]: mass of the top-k survivors
        if z_row is not None:
            z = torch.where(p_only, z_row, z)
        probs = e / z[:, None]  # [b, m]
        return probs, probs.double().cumsum(dim=-1)

    vals, ids = _top(x, min(V, max(FIRST_CANDIDATES if kk >= V else kk for kk in ks)))  # [b, m] each
    probs, mass = filtered(vals)
    # A top-p row whose candidates hold less than p may have nucleus tokens outside them: widen
    # those to a threshold set, then (rounding in the histogram) sort the rows.
    for widen in (True, False):
        short = p_only & (mass[:, -1] < p)  # [b]
        if vals.shape[1] >= V or not bool(short.any()):
            break
        if widen:
            vals, ids = _widen(x, e_row, vals, ids, short, p * z_row)  # [b, m'] each
        else:
            vals, ids = x.sort(dim=-1, descending=True, stable=True)  # [b, V] each
        probs, mass = filtered(vals)
    # Keep a token if the mass strictly before it is < p: that is the smallest prefix whose mass
    # reaches p, and always includes the first token (mass before it is 0 < p). The exclusive
    # prefix sum, not mass - probs, whose rounding could let in a token sitting exactly at p
    # (probabilities 0.5, 0.3, ... and p = 0.5 keep one token, not two).
    before = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=-1)  # [b, m]
    nucleus = (before < p[:, None]) | (p[:, None] >= 1.0)  # p = 1: no cut, despite rounding
    probs = probs * nucleus
    return probs / probs.sum(dim=-1, keepdim=True), ids


def _draw(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row of weights [b, n] (>= 0, any scale), by inverse CDF: [b] long.

    One uniform variate with 53 random bits per row and float64 cumulative sums: a token's chance
    is its fp32 weight's share to ~1e-7 relative (the fp32 block sums), finer than the fp32
    exponential race over every token this replaces. Long rows go in two levels (block, then
    token in the block), short ones in one.
    """
    b, n = weights.shape
    u = torch.rand((b, 1), dtype=torch.float64, generator=generator, device=weights.device)  # [b, 1], [0, 1)
    if n <= 4 * DRAW_BLOCK:
        cdf = weights.double().cumsum(dim=-1)  # [b, n]
        return _search(cdf, u * cdf[:, -1:])
    pad = -n % DRAW_BLOCK
    w = torch.nn.functional.pad(weights, (0, pad)) if pad else weights  # [b, n + pad]; zeros never drawn
    blocks = w.reshape(b, -1, DRAW_BLOCK)  # [b, nb, blk]
    mass = blocks.sum(dim=-1).double()  # [b, nb]; fp32 sums (cascaded: ~1e-7 relative), then float64
    cdf = mass.cumsum(dim=-1)  # [b, nb]
    u = u * cdf[:, -1:]  # [b, 1]
    j = _search(cdf, u)  # [b] block
    # The position of u inside block j, rescaled to the block's own float64 cumulative sum.
    inner = blocks[torch.arange(b, device=w.device), j].double().cumsum(dim=-1)  # [b, blk]
    start = (cdf.gather(1, j[:, None]) - mass.gather(1, j[:, None]))  # [b, 1]
    within = (u - start).clamp_(min=0) / mass.gather(1, j[:, None]) * inner[:, -1:]  # [b, 1]
    return (j * DRAW_BLOCK + _search(inner, within)).clamp_(max=n - 1)


def draw(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row of ``weights`` [b, n] (>= 0, any scale, not all 0), drawn with
    ``generator``: [b] long. The draw every sampler here ends with, for callers holding a
    distribution of their own (speculative decoding's residual distributions)."""
    return _draw(weights, generator)


def _search(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The i with cdf[i-1] <= u < cdf[i] per row (cdf [b, n] non-decreasing, u [b, 1]): [b] long.

    That interval is empty for a zero weight, which is thus never picked; u is kept below the last
    cdf, so rounding cannot step past the last positive weight. The clamp only matters for a
    non-finite row (NaN logits, reported elsewhere), which must still give an id in range.
    """
    last = cdf[:, -1:]  # [b, 1]
    u = torch.minimum(u, torch.nextafter(last, torch.zeros_like(last)))
    return torch.searchsorted(cdf, u, right=True).clamp_(0, cdf.shape[1] - 1).squeeze(1)


def _draw_nucleus(x: torch.Tensor, ps: list[float], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p by rejection for x [b, V] (scaled logits, max 0): draw from the whole softmax, keep
    the draw if the mass before it (in the order value descending, then token id ascending) is
    < p, else draw again. The kept draws follow the renormalised nucleus exactly. Returns ids [b]
    and [b] bool: rows still unaccepted after REJECTION_TRIES (their ids are meaningless)."""
    b, V = x.shape
    e = x.exp()  # [b, V]
    limit = e.sum(dim=-1).double() * torch.tensor(ps, dtype=torch.float64, device=x.device)  # [b]: p of the mass
    pick = torch.zeros(b, dtype=torch.long, device=x.device)
    pending = torch.ones(b, dtype=torch.bool, device=x.device)
    # Comparisons write 0/1 into a float buffer, several times faster on CPU than into a bool
    # tensor (then read again by a where or masked sum); the masked mass is a product and a sum.
    mask = torch.empty_like(x)  # [b, V]
    for _ in range(REJECTION_TRIES):
        rows = torch.nonzero(pending).squeeze(1)  # [r]
        if len(rows) == 0:
            break
        xr, er = (x, e) if len(rows) == b else (x[rows], e[rows])  # [r, V]
        m = mask[:len(rows)]  # [r, V]
        j = _draw(er, generator)  # [r]
        xj = xr.gather(1, j[:, None])  # [r, 1]
        # The mass before the draw: every more likely token (a sum, not a difference of sums,
        # whose rounding could admit a token sitting exactly at p), plus any equal ones with lower
        # ids (rare; exact logit ties).
        torch.gt(xr, xj, out=m)
        before = m.mul_(er).sum(dim=-1)  # [r]
        torch.eq(xr, xj, out=m)
        tied = torch.nonzero(m.sum(dim=-1) > 1).squeeze(1)  # [t]
        if len(tied):
            lower = (m[tied] * (torch.arange(V, device=x.device)[None, :] < j[tied, None])).sum(dim=-1)  # [t]
            before[tied] += er[tied, j[tied]] * lower
        ok = before.double() < limit[rows]  # [r]
        pick[rows[ok]] = j[ok]
        pending[rows[ok]] = False
    return pick, pending


def sampling_probs(logits: torch.Tensor, temperature: PerRow = 1.0, top_k: PerRow | None = None,
                   top_p: PerRow | None = None) -> torch.Tensor:
    """The distribution [B, V] that :func:`sample_next_token` draws from.

    softmax(logits / T), restricted to the ``top_k`` most likely tokens (0 or None: no limit; ties
    broken by lower token id), then to the nucleus: the smallest set of most likely tokens whose
    mass is >= ``top_p`` (never empty), renormalised. Rows with temperature 0 get a one-hot on the
    argmax. Exposed so that tests (and log-prob reporting) can see the exact distribution.
    """
    temps, ks, ps = _params(logits, temperature, top_k, top_p)
    out = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()  # [B, V]
    for kind, rows, x in _groups(logits, temps, ks, ps, rejection=False):
        if kind == "plain":
            probs = torch.softmax(x, dim=-1)  # [b, V]
        else:
            cand, ids = _candidates(x, [ks[r] for r in rows], [ps[r] for r in rows])  # [b, m] each
            # scatter_add: padding candidates (probability 0) may repeat an id.
            probs = torch.zeros_like(x).scatter_add_(1, ids, cand)  # [b, V]
        out.index_copy_(0, torch.tensor(rows, device=out.device), probs)
    return out


ARGMAX_CHUNK = 256


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for [..., V], in two passes on the CPU where V is wide: torch's
    argmax is a slow scalar reduction there (262,144 fp32 logits, one thread: ~0.65 ms), a chunked
    ``amax`` is vectorized (~0.06 ms). Chunk maxima, then the first chunk holding the row's maximum,
    then argmax inside it: the same index as ``argmax`` (its first maximum; a NaN counts as the
    maximum in both)."""
    V = logits.shape[-1]
    if logits.device.type != "cpu" or V % ARGMAX_CHUNK or V < 64 * ARGMAX_CHUNK or not logits.is_contiguous():
        return logits.argmax(dim=-1)
    chunks = logits.view(*logits.shape[:-1], V // ARGMAX_CHUNK, ARGMAX_CHUNK)  # [..., n, chunk]
    c = chunks.amax(dim=-1).argmax(dim=-1, keepdim=True)  # [..., 1] the first chunk with the maximum
    inner = chunks.gather(-2, c[..., None].expand(*c.shape, ARGMAX_CHUNK)).squeeze(-2)  # [..., chunk]
    return c.squeeze(-1) * ARGMAX_CHUNK + inner.argmax(dim=-1)


def sample_next_token(logits: torch.Tensor, generator: torch.Generator | None = None,
                      temperature: PerRow = 1.0, top_k: PerRow | None = None,
                      top_p: PerRow | None = None) -> torch.Tensor:
    """Sample one token id per row: logits [B, V] -> ids [B] (long).

    ``temperature`` 0 means greedy (argmax) for that row; a [B] tensor sets it per row, as do
    ``top_k`` ([B] integers; 0 = off, >= V = off) and ``top_p`` ([B] float in (0, 1]). Top-k is
    applied first, then top-p on the renormalised survivors, then a draw from ``generator``.
    ``generator`` None uses a fresh one seeded from ``os.urandom`` (non-reproducible; the global
    RNG is untouched). Greedy rows consume no randomness. Invalid arguments raise
    :class:`OpenGemmaError`.
    """
    temps, ks, ps = _params(logits, temperature, top_k, top_p)
    if not temps or max(temps) == 0:
        return argmax(logits)  # all rows greedy: no randomness consumed, nothing to sort
    # argmax costs a pass over the logits: only for greedy rows.
    out = argmax(logits) if min(temps) == 0 else torch.zeros(len(temps), dtype=torch.long,
                                                                       device=logits.device)  # [B]
    if generator is None:
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(int.from_bytes(os.urandom(8), "little") & (2**63 - 1))
    for kind, rows, x in _groups(logits, temps, ks, ps, rejection=True):
        if kind == "plain":
            pick = _draw(x.exp_(), generator)  # [b]: softmax up to its normaliser (x's maximum is 0)
        else:
            todo = torch.ones(len(rows), dtype=torch.bool, device=x.device)  # [b]
            pick = torch.zeros(len(rows), dtype=torch.long, device=x.device)  # [b]
            if kind == "nucleus":
                pick, todo = _draw_nucleus(x, [ps[r] for r in rows], generator)
            if bool(todo.any()):
                left = [r for r, t in zip(rows, todo.tolist()) if t]
                probs, ids = _candidates(x if len(left) == len(rows) else x[todo],
                                         [ks[r] for r in left], [ps[r] for r in left])  # [l, m] each
                pick[todo] = ids.gather(1, _draw(probs, generator)[:, None]).squeeze(1)  # candidate -> id
        out.index_copy_(0, torch.tensor(rows, device=out.device), pick)
    return out
