"""Attention in one place: :func:`attend` computes softmax(q k^T * scale [soft-capped] + mask) v and
picks the implementation for the shapes, device and autograd state at hand.

Report section "Model Architecture": multi-query (Gemma 1 2B), multi-head (7B) and grouped-query
(Gemma 2/3) attention, causal; Gemma 2 and 3 interleave local sliding-window layers with global
ones, and Gemma 2 soft-caps the attention logits with ``cap * tanh(logits / cap)``.

What a query may see comes in one of two forms:

* ``causal=True`` (and no ``mask``): the keys are the queries' own tokens at positions 0..T-1,
  each query sees itself and the keys before it (within ``window`` positions, for local layers).
  A prompt's first chunk and a training sequence without packing look like this; nothing needs
  to be built or read to mask it.
* ``mask``: an additive [B, 1, T, S] mask (0 where visible, the dtype's finite minimum where not;
  finite, so that fully masked padding rows give zeros instead of NaN), built from positions
  by :func:`attention_mask` (cached decoding, ragged batches, packed documents).

Implementations, chosen in :func:`attend`:

* ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels): accelerators, and
  anything with autograd, unless the logits are soft-capped (fused kernels lack the cap).
* CPU inference, causal: matmuls in blocks of :data:`CAUSAL_BLOCK` queries, block [s, e) reading
  keys [0, e) only, so the masked upper triangle is mostly never computed (a 512-token 270M
  prefill in bf16: 3.1 vs 6.5 ms per layer for torch's CPU flash kernel).
* CPU inference, one query per row (decoding): two batched matmuls (embedded 270M, bf16, 576
  keys: 165 vs 500 us per layer for the CPU flash kernel, which is built for blocks of queries);
  bf16 with at most :data:`UPCAST_SLOTS` keys runs them in fp32 (faster there, see :func:`_matmul`).
* Soft-capped attention: matmuls over blocks of :data:`SOFTCAP_BLOCK` queries, so at most one
  block of fp32 scores exists at a time however long the sequence; under autograd each block is
  recomputed in the backward pass (activation checkpointing per block) instead of kept.

Grouped-query heads are folded into the matmul rows ([B*KV, G*T, D] against [B*KV, S, D]): no
copy of k/v per query head. Softmax always runs in at least fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CAUSAL_BLOCK = 256  # queries per block of CPU causal attention
SOFTCAP_BLOCK = 512  # queries per block of soft-capped attention (bounds its fp32 scores)
UPCAST_SLOTS, UPCAST_ROWS = 256, 64  # bf16 attention over at most this many keys / query rows: in fp32 (_matmul)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, dtype: torch.dtype, *,
                   q_seg: torch.Tensor | None = None, k_seg: torch.Tensor | None = None) -> torch.Tensor:
    """Additive mask [B, 1, T, S] from query positions [B, T] and key positions [B, S].

    A key is visible when it exists (position >= 0), is not in the future and, for local layers,
    lies fewer than ``window`` positions back (the query itself included, as the reference). With
    segment ids ([B, T] / [B, S], packed documents) a key must also belong to the query's
    document; positions then restart at 0 in each document.
    """
    qp = q_pos[:, None, :, None]  # [B, 1, T, 1]
    kp = k_pos[:, None, None, :]  # [B, 1, 1, S]
    ok = (kp >= 0) & (kp <= qp)
    if window is not None:
        ok = ok & (qp - kp < window)
    if q_seg is not None:
        ok = ok & (q_seg[:, None, :, None] == k_seg[:, None, None, :])
    zero = torch.zeros((), dtype=dtype, device=q_pos.device)
    return torch.where(ok, zero, torch.finfo(dtype).min)  # [B, 1, T, S]


def causal_mask(T: int, S: int, window: int | None, dtype: torch.dtype, device, offset: int = 0) -> torch.Tensor:
    """The additive mask [1, 1, T, S] of ``causal=True`` for queries at positions offset..offset+T-1
    over keys at 0..S-1."""
    q = torch.arange(offset, offset + T, device=device)[None]  # [1, T]
    return attention_mask(q, torch.arange(S, device=device)[None], window, dtype)


BACKENDS = ("sdpa", "causal_blocks", "matmul", "blocks")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
           window: int | None = None, mask: torch.Tensor | None = None, softcap: float | None = None,
           backend: str | None = None) -> torch.Tensor:
    """Attention output [B, H, T, D] for q [B, H, T, D] and k, v [B, KV, S, D] (H a multiple of KV).

    Exactly one of ``causal`` (keys = the queries, positions 0..T-1; ``window`` limits how far
    back a query sees) and ``mask`` (additive [B, 1, T, S]) describes visibility. ``backend``
    (one of :data:`BACKENDS`) overrides the choice, for tests and benchmarks: "sdpa" (no
    soft-cap), "causal_blocks" (causal only, no window cut, no soft-cap), "matmul" (one block),
    "blocks" (query blocks of :data:`SOFTCAP_BLOCK`).
    """
    if causal == (mask is not None):
        raise ValueError("attend needs exactly one of causal=True or mask")
    T, S = q.shape[2], k.shape[2]
    if backend is None:
        backend = _choose(q, T, causal, window, softcap)
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "blocks":
        return _blocks(q, k, v, scale, softcap, mask, window)
    if causal and window is not None and T > window:
        mask, causal = causal_mask(T, S, window, q.dtype, q.device), False  # the window cuts the triangle
    if backend == "causal_blocks":
        if not causal or softcap is not None:
            raise ValueError("the causal_blocks backend needs causal attention without a window cut or soft-cap")
        return _causal_blocked(q, k, v, scale)
    if backend == "matmul":
        if causal:
            mask = causal_mask(T, S, None, q.dtype, q.device)
        return _matmul(q, k, v, mask, scale, softcap)
    if softcap is not None:
        raise ValueError("the sdpa backend has no soft-cap")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])  # [B, H, T, D]


def _choose(q: torch.Tensor, T: int, causal: bool, window: int | None, softcap: float | None) -> str:
    if softcap is not None:
        return "blocks"
    # On the CPU outside autograd, matmuls beat the CPU flash kernel (see the module docstring).
    cpu_infer = q.device.type == "cpu" and not (torch.is_grad_enabled() and q.requires_grad)
    if cpu_infer and causal and (window is None or T <= window):
        return "causal_blocks"
    if cpu_infer and T == 1:
        return "matmul"
    return "sdpa"


def _causal_blocked(q, k, v, scale: float):
    """Causal attention over the new keys only, as matmuls in blocks of ``CAUSAL_BLOCK`` queries:
    block [s, e) reads keys [0, e) only, and only the diagonal block needs a mask (-inf above the
    diagonal; a query always sees itself, so no row is fully masked)."""
    B, H, T, D = q.shape
    KV = k.shape[1]
    G = H // KV
    acc = torch.promote_types(q.dtype, torch.float32)
    k3 = k.reshape(B * KV, T, D).transpose(1, 2).contiguous()  # [B*KV, D, T]
    v3 = v.reshape(B * KV, T, D).contiguous()  # [B*KV, T, D]
    bs = min(T, CAUSAL_BLOCK)
    tri = torch.full((bs, bs), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)  # [bs, bs]
    zero = q.new_zeros(())
    out = q.new_empty(B, T, H, D)  # the layout the output projection reads: the caller's transpose is free
    for s in range(0, T, bs):
        e = min(s + bs, T)
        n = e - s
        qb = q[:, :, s:e].reshape(B * KV, G * n, D)  # [B*KV, G*n, D]
        scores = torch.baddbmm(zero, qb, k3[:, :, :e], beta=0, alpha=scale)  # [B*KV, G*n, e]
        scores.view(B * KV, G, n, e)[..., s:e] += tri[:n, :n]  # keys after each query
        probs = torch.softmax(scores, dim=-1, dtype=acc).to(q.dtype)
        out[:, s:e] = torch.bmm(probs, v3[:, :e]).view(B, H, n, D).transpose(1, 2)  # [B, n, H, D]
    return out.transpose(1, 2)  # [B, H, T, D]


def _matmul(q, k, v, mask, scale: float, cap: float | None):
    """Attention as two batched matmuls with an additive ``mask`` [B|1, 1, T, S], soft-capped
    where ``cap`` is set. A cache slice [B, KV, S, D] merges B and KV without a copy; torch.matmul
    on the 4-D tensors would copy k first (one decode layer: 100 us vs 200 us in all)."""
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    G = H // KV
    if (q.dtype == torch.bfloat16 and q.device.type == "cpu" and S <= UPCAST_SLOTS and G * T <= UPCAST_ROWS
            and not (torch.is_grad_enabled() and q.requires_grad)):
        # A decode step's few query rows: PyTorch's bf16 batched matmuls are slow at this size on
        # CPUs without AMX (one thread, 4 x 256 queries, 64 slots: ~200 us bf16, ~65 us converting
        # q, k, v to fp32 first; even at 256 slots; bf16 ahead from ~400). fp32 scores are also
        # the more exact (bf16 inputs are exact in fp32).
        out = _matmul(q.float(), k.float(), v.float(), None if mask is None else mask.float(), scale, cap)
        return out.to(q.dtype)  # [B, H, T, D]
    q3, k3, v3 = q.reshape(B * KV, G * T, D), k.reshape(B * KV, S, D), v.reshape(B * KV, S, D)
    mask3 = mask[:, :, None].expand(B, KV, G, T, S).reshape(B * KV, G * T, S)
    acc = torch.promote_types(q.dtype, torch.float32)
    if cap is None and torch.finfo(q.dtype).max > 1e38:
        # mask + scale * q k^T in one kernel. The finite minimum of the mask cannot round to -inf
        # in a dtype with fp32's range.
        scores = torch.baddbmm(mask3, q3, k3.transpose(1, 2), alpha=scale)  # [B*KV, G*T, S]
    else:
        scores = torch.bmm(q3, k3.transpose(1, 2)) * scale  # [B*KV, G*T, S]
        if cap is not None:
            scores = torch.tanh(scores / cap) * cap
        scores = scores.to(acc) + mask3.to(acc)  # fp16: add the mask in fp32, where its minimum stays finite
    probs = torch.softmax(scores, dim=-1, dtype=acc).to(q.dtype)
    return torch.bmm(probs, v3).view(B, H, T, D)  # [B, H, T, D]


def _blocks(q, k, v, scale: float, cap: float | None, mask, window):
    """:func:`_matmul` over blocks of ``SOFTCAP_BLOCK`` queries (one block of fp32 scores at a time),
    for soft-capped attention; causal blocks read keys [0, e) only. Under autograd each block is
    checkpointed, so its scores are recomputed in backward rather than kept for every block."""
    B, H, T, D = q.shape
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    outs = []
    for s in range(0, T, SOFTCAP_BLOCK):
        e = min(s + SOFTCAP_BLOCK, T)
        if mask is None:  # causal: keys are the queries' own positions
            kb, vb = k[:, :, :e], v[:, :, :e]
            mb = causal_mask(e - s, e, window, q.dtype, q.device, offset=s)  # [1, 1, n, e]
        else:
            kb, vb, mb = k, v, mask[:, :, s:e]  # [B, 1, n, S]
        mb = mb.expand(B, 1, e - s, kb.shape[2])
        if grad and T > SOFTCAP_BLOCK:
            outs.append(checkpoint(_matmul, q[:, :, s:e], kb, vb, mb, scale, cap, use_reentrant=False))
        else:
            outs.append(_matmul(q[:, :, s:e], kb, vb, mb, scale, cap))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # [B, H, T, D]
