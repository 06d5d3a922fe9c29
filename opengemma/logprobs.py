"""Token log-probabilities over the 256k vocabulary: the one implementation behind evaluation
(Table 6 log-likelihoods), memorization, perplexity, serving's ``logprobs`` and training's
next-token loss.

Report sections "Evaluation" and "Pretraining": every log-likelihood benchmark compares
``log p(continuation | context)``, and pretraining minimises ``-log p(next token)``. Gemma's
vocabulary (256k entries; 262,144 for Gemma 3) makes the logits the largest tensor of either: a
full [N, V] fp32 block is 1 MiB per token, and a naive cross-entropy keeps it (and its gradient)
for the whole backward pass.

* :func:`from_logits` -- logits already in hand (a decode step's, for serving): log p(target),
  whether the target is the argmax, and the log-normaliser, in one max pass over the row.
* :func:`token_logprobs` -- from final hidden states and the model's tied head. Outside
  autograd it runs the model's own :meth:`~opengemma.model.GemmaModel.head` on chunks of rows
  (so the numbers are exactly those of the logits the model would produce, quantized heads
  included). Under autograd it runs a fused, vocabulary-chunked function: forward keeps an online
  log-sum-exp per token across chunks of the vocabulary and never holds more than one [N, chunk]
  block of logits; backward recomputes each chunk and writes its slice of the head's gradient
  straight into one preallocated buffer (chunking without that in-place accumulation can cost
  more memory than no chunking at all). Gemma 2's final-logit soft-cap is applied in both.
* :func:`token_nll_sum` -- training's summed next-token loss: with one upstream gradient for
  every token, the head's gradients are formed in the forward pass over chunks of rows, 3
  matmuls instead of 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOGITS_BUDGET = 256 * 2**20  # bytes of fp32 logits held at once


def from_logits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(target), target is the argmax, log-normaliser) for logits [..., V] and targets [...].

    One max pass gives both the argmax and the log-sum-exp's shift, and the exp runs in place on
    a temporary: over a 262k vocabulary ~20% faster than logsumexp + argmax (these passes were a
    third of a HellaSwag run's time on the CPU; the output projection itself is less).
    """
    logits = logits.float()
    picked = logits.gather(-1, targets[..., None])[..., 0]
    top, arg = logits.max(dim=-1)  # [...]
    lse = top + (logits - top[..., None]).exp_().sum(dim=-1).log_()
    return picked - lse, arg == targets, lse


def token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, *, greedy: bool = False,
                   budget: int = LOGITS_BUDGET):
    """log p(targets) [...] (fp32) under ``model``'s head, for final hidden states [..., d_model]
    (``model.trunk``'s output) and target ids [...]. ``greedy`` also returns whether each target is
    the argmax. ``budget``: bytes of fp32 logits materialised at once."""
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
    t = targets.reshape(-1).to(h.device)  # [N]
    V = model.config.vocab_size
    weight = getattr(getattr(model, "embed", None), "weight", None)
    train = torch.is_grad_enabled() and (h.requires_grad or (weight is not None and weight.requires_grad))
    if train:
        if weight is None or not weight.is_floating_point():
            raise ValueError("training through token_logprobs needs a float output embedding")
        chunk = max(1024, min(V, budget // max(1, 4 * h.shape[0])))
        logp, best = _ChunkedLogprob.apply(h, weight, t, model.config.final_softcap, chunk)
    else:
        from .quant.head import exact_head  # a screened head is exact only for its top candidates

        rows = max(1, budget // (4 * V))
        with exact_head(model):
            parts = [from_logits(model.head(h[i:i + rows]), t[i:i + rows])[:2] for i in range(0, h.shape[0], rows)]
        logp = torch.cat([p[0] for p in parts]) if parts else h.new_zeros(0, dtype=torch.float32)
        best = torch.cat([p[1] for p in parts]) if parts else t.new_zeros(0, dtype=torch.bool)
    return (logp.view(shape), best.view(shape)) if greedy else logp.view(shape)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, cap: float | None) -> torch.Tensor:
    z = F.linear(h, w).float()  # [N, c]: the head's matmul in the activation dtype, as model.head
    return torch.tanh(z / cap) * cap if cap is not None else z


class _ChunkedLogprob(torch.autograd.Function):
    """log p(t) for hidden [N, D], a tied head's weight [V, D] and targets [N], chunked over V."""

    @staticmethod
    def forward(ctx, h, w, t, cap, chunk):
        N, V = h.shape[0], w.shape[0]
        m = h.new_full((N,), float("-inf"), dtype=torch.float32)  # running max
        s = h.new_zeros(N, dtype=torch.float32)  # running sum of exp(z - m)
        picked = h.new_zeros(N, dtype=torch.float32)
        best_val = m.clone()
        best_idx = t.new_zeros(N)
        for c0 in range(0, V, chunk):
            z = _chunk_logits(h, w[c0:c0 + chunk], cap)  # [N, c]
            c = z.shape[1]
            here = (t >= c0) & (t < c0 + c)
            picked = torch.where(here, z.gather(1, (t - c0).clamp(0, c - 1)[:, None])[:, 0], picked)
            cm, ci = z.max(dim=1)
            better = cm > best_val  # strictly: the first maximum wins, as argmax
            best_val, best_idx = torch.where(better, cm, best_val), torch.where(better, ci + c0, best_idx)
            new_m = torch.maximum(m, cm)
            s = s * torch.exp(m - new_m) + z.sub_(new_m[:, None]).exp_().sum(dim=1)
            m = new_m
        lse = m + s.log()
        ctx.save_for_backward(h, w, t, lse)
        ctx.cap, ctx.chunk = cap, chunk
        ctx.mark_non_differentiable(best_idx)
        return picked - lse, best_idx == t

    @staticmethod
    def backward(ctx, g, _g_best):
        h, w, t, lse = ctx.saved_tensors
        cap, chunk = ctx.cap, ctx.chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        dw = torch.empty_like(w) if need_w else None
        g = g.float()
        for c0 in range(0, w.shape[0], chunk):
            wc = w[c0:c0 + chunk]
            wc = wc if wc.dtype == h.dtype else wc.to(h.dtype)  # a frozen head held in bf16 (LoRA), fp32 h
            z = _chunk_logits(h, wc, cap)  # [N, c]
            c = z.shape[1]
            # d log p(t) / dz = onehot(t) - softmax(z), scaled by the incoming gradient g
            dz = torch.exp(z - lse[:, None]).mul_(-g[:, None])  # [N, c]
            here = (t >= c0) & (t < c0 + c)
            dz[here, (t[here] - c0)] += g[here]
            if cap is not None:
                dz.mul_(1 - (z / cap).square_())  # through cap * tanh(raw / cap)
            dz = dz.to(h.dtype)
            if need_h:
                dh += (dz @ wc).float()  # [N, D]
            if need_w:
                dw[c0:c0 + c] = dz.t() @ h  # [c, D]: this chunk's rows of the head's gradient
        return (dh.to(h.dtype) if need_h else None), dw, None, None, None


def token_nll_sum(model, hidden: torch.Tensor, targets: torch.Tensor, *,
                  budget: int = LOGITS_BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p(targets), differentiable scalar; per-token -log p [N], detached) for final
    hidden states [N, d_model] and targets [N] under ``model``'s tied, soft-capped head: the
    training loss of :func:`opengemma.train.losses.next_token_loss`.

    A summed loss has the same upstream gradient for every token, so the head's gradients can be
    formed in the forward pass, the way Liger's fused linear cross-entropy does: rows of tokens in
    chunks of ``budget`` bytes of fp32 logits, each chunk's [n, V] logits made once, turned into
    softmax - onehot in place, multiplied into dh and accumulated into the head's gradient buffer
    (3 matmuls per chunk, against 4 for :func:`token_logprobs`, which must recompute the logits in
    backward because its per-token upstream gradients are only known then). Backward only scales
    the stored gradients by the incoming scalar. Without autograd it is :func:`token_logprobs`."""
    weight = getattr(getattr(model, "embed", None), "weight", None)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or (weight is not None and weight.requires_grad))):
        nll = -token_logprobs(model, hidden, targets, budget=budget)
        return nll.sum(), nll
    if weight is None or not weight.is_floating_point():
        raise ValueError("training through token_nll_sum needs a float output embedding")
    cap = model.config.final_softcap
    rows = max(1, budget // (4 * weight.shape[0] * (2 if cap is not None else 1)))
    total, nll = _FusedNLLSum.apply(hidden, weight, targets.to(hidden.device), cap, rows)
    return total, nll


class _FusedNLLSum(torch.autograd.Function):
    """sum(-log p(t)) for hidden [N, D], a tied head's weight [V, D] and targets [N]; gradients
    formed in forward, row chunk by row chunk (see :func:`token_nll_sum`)."""

    @staticmethod
    def forward(ctx, h, w, t, cap, rows):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, V = h.shape[0], w.shape[0]
        nll = h.new_empty(N, dtype=torch.float32)
        dh = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        # fp32 for the [n, V] x [V, D] product (a no-op in fp32), and for the logits when the hidden
        # states are fp32: an fp32 trunk under autocast keeps an fp32 head here, whether the weight
        # is held in fp32 or (a frozen LoRA base) in bf16.
        w32 = w.float() if need_h or h.dtype == torch.float32 else None
        # One [rows, V] buffer for every chunk: a fresh 256 MiB tensor per chunk costs page faults
        # (the CPU allocator returns big blocks to the system) comparable to the matmul itself.
        buf = torch.empty(min(rows, N), V, dtype=torch.float32, device=h.device)
        slope_buf = torch.empty_like(buf) if cap is not None else None
        for r0 in range(0, N, rows):
            hc, tc = h[r0:r0 + rows], t[r0:r0 + rows]
            n = hc.shape[0]
            idx = torch.arange(n, device=h.device)
            z = buf[:n]
            if h.dtype == torch.float32:
                torch.mm(hc, w32.t(), out=z)  # [n, V]
            else:  # the head's matmul in the activation dtype, as model.head
                z.copy_(F.linear(hc, w))
            slope = None
            if cap is not None:
                z.div_(cap).tanh_().mul_(cap)
                slope = torch.div(z, cap, out=slope_buf[:n]).square_().neg_().add_(1)  # d(cap*tanh(x/cap))/dx
            picked = z[idx, tc]  # [n]
            top = z.max(dim=1).values  # [n]
            p = z.sub_(top[:, None]).exp_()  # [n, V] = exp(z - top), in place: z is not needed again
            s = p.sum(dim=1)  # [n]
            nll[r0:r0 + n] = top + s.log() - picked
            # d(-log p(t)) / dz = (softmax(z) - onehot(t)) [* slope] = p / s - onehot. The 1 / s and
            # the onehot act on the small factors: rows of hc or of the [n, D] product, rows of w.
            at_t = slope[idx, tc] if slope is not None else None  # [n]
            if slope is not None:
                p.mul_(slope)
            hc32 = hc.float()
            if need_h:
                dh_c = torch.mm(p, w32).div_(s[:, None])  # [n, D]
                w_t = w32[tc]  # [n, D]
                dh[r0:r0 + n] = dh_c - (w_t * at_t[:, None] if at_t is not None else w_t)
            if need_w:
                dw.addmm_(p.t(), hc32 / s[:, None])  # [V, D]
                dw.index_add_(0, tc, hc32 * at_t[:, None] if at_t is not None else hc32, alpha=-1.0)
        dh = dh.to(h.dtype) if need_h else None
        ctx.save_for_backward(dh if need_h else None, dw if need_w else None)
        ctx.mark_non_differentiable(nll)
        ctx.w_dtype = w.dtype
        return nll.sum(), nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _g_nll):
        dh, dw = ctx.saved_tensors
        return (dh * g.to(dh.dtype) if dh is not None else None,
                (dw * g).to(ctx.w_dtype) if dw is not None else None, None, None, None)


@torch.no_grad()
def perplexity(model, ids, *, chunk: int = 512) -> float:
    """Perplexity of ``model`` on one token sequence (list or 1-D tensor; the first token is context
    only), run through a KV cache in chunks of ``chunk`` positions (the quantization budgets and
    ``bench/bench_inference.py`` use it)."""
    import math

    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    dev = model.final_norm.weight.device
    ids = ids.to(dev)
    T = ids.shape[1]
    cache = model.make_cache(1, T)
    nll, n = 0.0, 0
    for i in range(0, T - 1, chunk):
        j = min(i + chunk, T - 1)
        hidden = model.trunk(ids[:, i:j], torch.arange(i, j, device=dev), cache)  # [1, t, D]
        nll -= float(token_logprobs(model, hidden, ids[:, i + 1:j + 1]).sum())
        n += j - i
    return math.exp(nll / n)
