"""Next-token sampling: temperature, top-k and top-p (nucleus) over a batch of logits.

Part of the inference engine that runs the models of report section "Model Architecture"; the
report itself samples greedily for most evaluations, and the instruction-tuned models are usually
served with temperature/top-k/top-p sampling, which is what this module provides.

Everything here is pure and batched: one call handles every row of the batch, each row may carry
its own temperature / top_k / top_p, and randomness comes only from the explicit
``torch.Generator`` passed in (never the global RNG), so results are reproducible and two
requests in one batch cannot disturb each other's streams. There are no data-dependent Python
branches on tensor values on the sampling path (validation aside), so the function can be
compiled together with a decode step later.
"""

from __future__ import annotations

import os

import torch

from .errors import OpenGemmaError

Number = float | int
PerRow = Number | torch.Tensor


def _per_row(value: PerRow, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A scalar or a [B] tensor as a [B] tensor of ``dtype`` on ``device``."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.expand(batch)
        if value.shape != (batch,):
            raise OpenGemmaError(f"per-row sampling parameters need shape [{batch}], got {list(value.shape)}")
        return value.to(device=device, dtype=dtype)
    return torch.full((batch,), value, device=device, dtype=dtype)


def _check(temperature: PerRow, top_k: PerRow | None, top_p: PerRow | None) -> None:
    """Reject invalid parameters with a one-line error (a host sync for tensors; cheap)."""
    def bad(x: PerRow, test) -> bool:
        if isinstance(x, torch.Tensor):
            return bool(test(x.double()).any())
        return bool(test(torch.tensor(float(x), dtype=torch.float64)))

    if bad(temperature, lambda t: (t < 0) | t.isnan()):
        raise OpenGemmaError(f"temperature must be >= 0, got {_show(temperature)}")
    if top_k is not None:
        if isinstance(top_k, torch.Tensor) and top_k.is_floating_point():
            raise OpenGemmaError("top_k must be an integer")
        if not isinstance(top_k, torch.Tensor) and (isinstance(top_k, bool) or not isinstance(top_k, int)):
            raise OpenGemmaError(f"top_k must be an integer, got {top_k!r}")
        if bad(top_k, lambda k: k < 0):
            raise OpenGemmaError(f"top_k must be >= 0 (0 disables it), got {_show(top_k)}")
    if top_p is not None and bad(top_p, lambda p: ~((p > 0) & (p <= 1))):
        raise OpenGemmaError(f"top_p must be in (0, 1], got {_show(top_p)}")


def _show(x: PerRow) -> str:
    return str(x.tolist()) if isinstance(x, torch.Tensor) else repr(x)


def sampling_probs(logits: torch.Tensor, temperature: PerRow = 1.0, top_k: PerRow | None = None,
                   top_p: PerRow | None = None) -> torch.Tensor:
    """The distribution [B, V] that :func:`sample_next_token` draws from (rows with T > 0).

    softmax(logits / T), restricted to the ``top_k`` most likely tokens (0 or None: no limit), then
    to the nucleus: the smallest set of most likely tokens whose mass is >= ``top_p`` (never
    empty), renormalised. Rows with temperature 0 get a one-hot on the argmax. Exposed so that
    tests (and log-prob reporting) can see the exact distribution without sampling.
    """
    _check(temperature, top_k, top_p)
    probs, order = _sorted_probs(logits, temperature, top_k, top_p)  # [B, V] each, sorted space
    out = torch.zeros_like(probs).scatter_(1, order, probs)  # back to vocabulary order
    temp = _per_row(temperature, logits.shape[0], logits.device, torch.float32)
    greedy = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(out.dtype)  # [B, V]
    return torch.where((temp == 0)[:, None], greedy, out)


def _sorted_probs(logits: torch.Tensor, temperature: PerRow, top_k: PerRow | None,
                  top_p: PerRow | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Filtered probabilities in descending-logit order [B, V] and that order [B, V]."""
    B, V = logits.shape
    x = logits.float()  # [B, V]; fp32 whatever the model's dtype
    temp = _per_row(temperature, B, x.device, torch.float32)
    # Greedy rows are handled by the caller; dividing them by 1 keeps this path NaN-free.
    x = x / torch.where(temp > 0, temp, 1.0)[:, None]  # [B, V]
    # One sort serves both filters: in sorted order top-k is a rank cut and top-p a prefix cut.
    # (Ties at the k-th logit are thus broken by the sort, so exactly k tokens survive.)
    x, order = x.sort(dim=-1, descending=True)  # [B, V]
    rank = torch.arange(V, device=x.device)[None, :]  # [1, V]
    keep = torch.ones_like(x, dtype=torch.bool)  # [B, V]
    if top_k is not None:
        k = _per_row(top_k, B, x.device, torch.long)
        k = torch.where(k > 0, k, V)  # 0 disables top-k, as in most serving APIs
        keep = keep & (rank < k[:, None])
    x = x.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(x, dim=-1)  # [B, V]; masked tokens get exactly 0
    if top_p is not None:
        p = _per_row(top_p, B, x.device, torch.float32)
        # Keep a token if the mass strictly before it is < p: that is the smallest prefix whose
        # mass reaches p, and always includes the first token (mass before it is 0 < p).
        before = probs.cumsum(dim=-1) - probs  # [B, V]
        nucleus = (before < p[:, None]) | (p[:, None] >= 1.0)  # p = 1: no cut, despite rounding
        probs = probs * nucleus
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs, order


def sample_next_token(logits: torch.Tensor, generator: torch.Generator | None = None,
                      temperature: PerRow = 1.0, top_k: PerRow | None = None,
                      top_p: PerRow | None = None) -> torch.Tensor:
    """Sample one token id per row: logits [B, V] -> ids [B] (long).

    ``temperature`` 0 means greedy (argmax) for that row; a [B] tensor sets it per row, as do
    ``top_k`` ([B] long; 0 = off) and ``top_p`` ([B] float in (0, 1]). Top-k is applied first,
    then top-p on the renormalised survivors, then one draw from ``generator``. ``generator`` None
    uses a fresh one seeded from ``os.urandom`` (non-reproducible; the global RNG is untouched).
    Invalid arguments raise :class:`OpenGemmaError`.
    """
    if logits.dim() != 2:
        raise OpenGemmaError(f"logits must be [batch, vocab], got shape {list(logits.shape)}")
    _check(temperature, top_k, top_p)
    greedy = logits.argmax(dim=-1)  # [B]
    if not isinstance(temperature, torch.Tensor) and temperature == 0:
        return greedy  # all rows greedy: no randomness consumed, nothing to sort
    if generator is None:
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(int.from_bytes(os.urandom(8), "little") & (2**63 - 1))
    probs, order = _sorted_probs(logits, temperature, top_k, top_p)  # [B, V]
    # Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i. Unlike
    # torch.multinomial it needs no host sync and has static shapes (compile/CUDA-graph friendly).
    # The clamp keeps 0 / 0 = NaN out for filtered tokens if an E_i ever rounds to 0.
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)  # [B, V]
    race = race.clamp_min_(torch.finfo(race.dtype).tiny)
    pick = (probs / race).argmax(dim=-1, keepdim=True)  # [B, 1], index in sorted order
    sampled = order.gather(1, pick).squeeze(1)  # [B]
    if isinstance(temperature, torch.Tensor):
        temp = temperature.to(logits.device).expand(logits.shape[0])
        return torch.where(temp == 0, greedy, sampled)
    return sampled
