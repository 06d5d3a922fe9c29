"""The Gemma transformer: one implementation for Gemma 1, 2 and 3 text models.

Report section "Model Architecture": a decoder-only transformer with multi-query (2B) or
multi-head (7B) attention, RoPE in every layer, GeGLU feed-forward blocks with the tanh
approximation of GELU, RMSNorm before each sub-layer, and input/output embeddings shared.
Gemma 2 and 3 add, behind config flags: tanh soft-capping of attention and output logits,
post-sub-layer ("sandwich") norms, RMSNorm on queries and keys, interleaved local
(sliding-window) and global layers with their own RoPE bases, and linear RoPE scaling.

The model is pure compute: ``forward(tokens, input_pos, cache) -> logits``. The KV cache is
explicit, static and preallocated (see :class:`KVCache`); positions are given per row, so rows of
one batch may sit at different positions (batched prompts of different lengths, continuous
batching). A position of -1 marks padding: it is neither attended to nor written to the cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import GemmaConfig


CAUSAL_BLOCK = 256  # queries per block of CPU causal attention (Attention._causal_attention)


class RMSNorm(nn.Module):
    """RMSNorm with Gemma's ``(1 + w)`` scale; statistics and scale in fp32 as the reference does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused rms_norm computes x * rsqrt(mean(x^2) + eps) * w in fp32 as the reference
        # does (bit-identical outputs, 3-5x fewer kernels: a decode step runs about a hundred).
        # Scale before casting back (not after): keeps bf16 outputs equal to the reference's.
        return F.rms_norm(x.float(), (x.shape[-1],), self._scale(), self.eps).type_as(x)

    def _scale(self) -> torch.Tensor:
        """``1 + w`` in fp32; kept between calls outside autograd (keyed by the weight's storage
        and version, so loading or an optimizer step recomputes it)."""
        w = self.weight
        if (torch.is_grad_enabled() and w.requires_grad) or torch.compiler.is_compiling():
            return 1.0 + w.float()  # (compiled: fused into the norm's kernel, and data_ptr() would break the graph)
        key = (w.data_ptr(), w._version, w.device)
        cached = self.__dict__.get("_scale_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_scale_cache"] = (key, 1.0 + w.detach().float())
        return cached[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """The reference's ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``.

    The sign of rotate_half is folded into ``sin_signed`` (= cat(-sin, sin) halves, see
    ``GemmaModel._rope``), leaving a plain roll: bit-identical (negation is exact), 4 kernels
    instead of 6 per tensor.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, T, S] from query positions [B, T] and key positions [B, S].

    A key is visible when it exists (position >= 0), is not in the future and, for local layers,
    lies fewer than ``window`` positions back (the query itself included, as the reference).
    A finite minimum instead of -inf keeps fully masked padding rows free of NaN.
    """
    qp = q_pos[:, None, :, None]  # [B, 1, T, 1]
    kp = k_pos[:, None, None, :]  # [B, 1, 1, S]
    ok = (kp >= 0) & (kp <= qp)
    if window is not None:
        ok = ok & (qp - kp < window)
    zero = torch.zeros((), dtype=dtype, device=q_pos.device)
    return torch.where(ok, zero, torch.finfo(dtype).min)  # [B, 1, T, S]


class KVCache:
    """Static, preallocated key/value cache for one batch of sequences.

    Global layers keep ``max_len`` slots (slot = position). Local layers keep only their window
    as a ring buffer (slot = position % window). Each kind has one extra "trash" slot that padding
    tokens (position -1) write into; its position stays -1 so it is never attended to. Slot
    positions are tracked per row (``pos_global``, ``pos_local``), which is what makes masks exact
    for ragged batches and for decoding past the window.
    """

    def __init__(self, config: GemmaConfig, batch_size: int, max_len: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        self.config = config
        self.batch_size = batch_size
        self.max_len = max_len
        self.ring = self.ring_size(config, max_len)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for i in range(config.n_layers):
            shape = (batch_size, config.n_kv_heads, self.slots(config, i, max_len), config.head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
        self.pos_global = torch.full((batch_size, max_len + 1), -1, dtype=torch.long, device=device)
        self.pos_local = torch.full((batch_size, self.ring + 1), -1, dtype=torch.long, device=device)

    @staticmethod
    def ring_size(config: GemmaConfig, max_len: int) -> int:
        has_local = any(config.is_local(i) for i in range(config.n_layers))
        return min(config.sliding_window, max_len) if has_local else 0

    @classmethod
    def slots(cls, config: GemmaConfig, layer: int, max_len: int) -> int:
        """Cache slots of one layer: its window (local) or the whole length (global), plus trash."""
        return (cls.ring_size(config, max_len) if config.is_local(layer) else max_len) + 1

    @classmethod
    def planned_bytes(cls, config: GemmaConfig, max_len: int, batch_size: int = 1, dtype=torch.float32) -> dict:
        """Memory a cache would take, without allocating it (``opengemma info --kv-memory``)."""
        per_slot = 2 * batch_size * config.n_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()
        local = sum(cls.slots(config, i, max_len) for i in range(config.n_layers) if config.is_local(i))
        full = sum(cls.slots(config, i, max_len) for i in range(config.n_layers) if not config.is_local(i))
        return {"context": max_len, "batch_size": batch_size, "dtype": str(dtype).removeprefix("torch."),
                "local_layers_bytes": local * per_slot, "global_layers_bytes": full * per_slot,
                "total_bytes": (local + full) * per_slot,
                "without_windows_bytes": config.n_layers * (max_len + 1) * per_slot}

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Forget the cached tokens of every row, or of the given rows only."""
        if rows is None:
            self.pos_global.fill_(-1)
            self.pos_local.fill_(-1)
        else:
            self.pos_global[rows] = -1
            self.pos_local[rows] = -1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class _Step:
    """What one forward pass does with the cache: slots to write and masks, shared by all layers."""

    def __init__(self, cache: KVCache, input_pos: torch.Tensor, dtype: torch.dtype):
        cfg = self.config = cache.config
        self.cache = cache
        self._index: dict = {}
        valid = input_pos >= 0
        self.q_pos = input_pos
        self.fresh = self.starts_at_zero(cfg, input_pos)
        # Attend over the leading slots that can hold a visible key only (exact: see visible_slots).
        self.n_global = self.visible_slots(cache, input_pos, cache.max_len)
        # Global layers: write first, then attend.
        self.global_slots = torch.where(valid, input_pos, cache.max_len)  # [B, T]
        cache.pos_global.scatter_(1, self.global_slots, input_pos)
        cache.pos_global[:, -1] = -1
        self.global_mask = attention_mask(input_pos, cache.pos_global[:, :self.n_global], None, dtype)
        if not cache.ring:
            return
        ring, window = cache.ring, cfg.sliding_window
        self.n_local = self.visible_slots(cache, input_pos, ring)
        # One new token per row: its ring slot holds position p - ring, which is already outside
        # the window, so writing before attending is exact. Several new tokens (prefill) may
        # overwrite keys that earlier queries of the chunk still need: attend over
        # [ring; new keys] first, then keep only the last `ring` positions of each row.
        self.local_concat = input_pos.shape[1] > 1
        if self.local_concat:
            old = cache.pos_local[:, :self.n_local]
            k_pos = torch.cat([old, torch.where(valid, input_pos, -1)], dim=1)  # [B, n_local + T]
            self.local_mask = attention_mask(input_pos, k_pos, window, dtype)
            last = input_pos.max(dim=1, keepdim=True).values  # [B, 1]
            keep = valid & (input_pos > last - ring)
        else:
            keep = valid
        self.local_slots = torch.where(keep, input_pos % ring, ring)  # [B, T]
        cache.pos_local.scatter_(1, self.local_slots, input_pos)
        cache.pos_local[:, -1] = -1
        if not self.local_concat:
            self.local_mask = attention_mask(input_pos, cache.pos_local[:, :self.n_local], window, dtype)

    @staticmethod
    def starts_at_zero(cfg: GemmaConfig, input_pos: torch.Tensor) -> bool:
        """Whether every row's queries are positions 0..T-1 (T > 1): a prompt's first chunk.

        Then each query sees exactly the new keys up to itself (older cache contents hold no
        position below T, or only padding), so attention is plain causal attention over the new
        keys, which skips the masked half of the scores (:meth:`Attention._causal_attention`; the
        270M's 512-token prefill had spent 38% of its time in masked attention over [ring; new] =
        1,025 keys per local layer). Only where fused attention applies (no soft-cap) and, like :meth:`visible_slots`,
        on the CPU outside torch.compile, where the host read is free.
        """
        T = input_pos.shape[1]
        if (T < 2 or cfg.attn_softcap is not None or input_pos.device.type != "cpu"
                or torch.compiler.is_compiling()):
            return False
        return bool((input_pos == torch.arange(T)).all())

    @staticmethod
    def visible_slots(cache: KVCache, input_pos: torch.Tensor, n: int) -> int:
        """How many leading slots of an ``n``-slot layer can hold a key visible to these queries.

        A global slot holds the position equal to its index, a ring slot ``position % n``; keys
        after the latest query position are masked anyway. So while every query sits before
        position ``n - 1``, slots past ``max(input_pos)`` hold nothing any query may see and need
        not be read (a short prompt in a long cache: most of the decode attention's bytes). The
        count is rounded up to 64 so nearby steps share shapes. Only on the CPU, outside
        torch.compile: there the host read of ``max(input_pos)`` is free; on accelerators it
        would be a device sync per step, and compiled graphs want static shapes, so they read
        every slot (masked) instead.
        """
        if input_pos.device.type != "cpu" or torch.compiler.is_compiling():
            return n + 1
        need = int(input_pos.max()) + 1
        return n + 1 if need >= n else min(n, -(-need // 64) * 64)

    def _write(self, cache_t: torch.Tensor, new: torch.Tensor, local: bool) -> None:
        """Store ``new`` [B, KV, T, D] at this step's slots of ``cache_t`` [B, KV, slots, D] (which
        may be a strided view, e.g. the serving engine's rows). index_put_, not scatter_: scatter_
        has no fast bf16 CPU kernel (36 us vs 3 us per one-token write). Duplicate indices only
        ever hit the trash slot."""
        key = (local, new.shape[1])
        if key not in self._index:
            slots = self.local_slots if local else self.global_slots  # [B, T]
            B, dev = slots.shape[0], slots.device
            self._index[key] = (torch.arange(B, device=dev).view(B, 1, 1),
                                torch.arange(new.shape[1], device=dev).view(1, -1, 1), slots[:, None, :])
        cache_t.index_put_(self._index[key], new)  # indices broadcast to [B, KV, T]

    def update(self, layer: int, local: bool, k: torch.Tensor, v: torch.Tensor):
        """Store this layer's new keys/values [B, KV, T, D]; return what to attend over and its mask."""
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        if self.fresh and not (local and k.shape[2] > self.config.sliding_window):
            self._write(ck, k, local)
            self._write(cv, v, local)
            return k, v, None  # None: causal over the new keys (starts_at_zero)
        n = self.n_local if local else self.n_global
        if local and self.local_concat:
            keys = torch.cat([ck[:, :, :n], k], dim=2)  # [B, KV, n + T, D]
            values = torch.cat([cv[:, :, :n], v], dim=2)
            self._write(ck, k, local)
            self._write(cv, v, local)
            return keys, values, self.local_mask
        self._write(ck, k, local)
        self._write(cv, v, local)
        return ck[:, :, :n], cv[:, :, :n], (self.local_mask if local else self.global_mask)  # [B, KV, n, D]


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, local: bool):
        super().__init__()
        self.config = config
        self.local = local
        d, h, kv, hd = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, kv * hd, bias=False)
        self.v_proj = nn.Linear(d, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        self.qkv_proj: nn.Module | None = None  # q/k/v stacked into one matrix (quant.fuse_projections)
        self.qkv_sizes = (h * hd, kv * hd, kv * hd)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.norm_eps)
            self.k_norm = RMSNorm(hd, config.norm_eps)
        self.scale = config.query_pre_attn_scalar ** -0.5

    def forward(self, x, cos, sin, mask, step: _Step | None, layer: int):
        cfg = self.config
        B, T, _ = x.shape
        H, KV, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        if self.qkv_proj is not None and cfg.qk_norm:
            # Stacked q/k/v (quantized models): the q and k heads are adjacent, so they are normed
            # and rotated in one call each instead of two (the same numbers; 18 layers x ~8 fewer
            # kernels per decode step).
            qkv = self.qkv_proj(x).view(B, T, H + 2 * KV, D)  # [B, T, H+2KV, D]
            qk = self._qk_norm(qkv[:, :, :H + KV])
            qk = apply_rope(qk, cos.transpose(1, 2), sin.transpose(1, 2))  # [B, T, H+KV, D]
            q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # [B, H, T, D], [B, KV, T, D]
            v = qkv[:, :, H + KV:].transpose(1, 2)  # [B, KV, T, D]
        else:
            if self.qkv_proj is not None:
                q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = q.view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
            k = k.view(B, T, KV, D).transpose(1, 2)  # [B, KV, T, D]
            v = v.view(B, T, KV, D).transpose(1, 2)  # [B, KV, T, D]
            if cfg.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        if step is not None:
            k, v, mask = step.update(layer, self.local, k, v)  # [B, KV, S, D]
        # On the CPU, outside autograd, matmuls beat the CPU flash kernel: for one new token (it is
        # built for blocks of queries; embedded 270M, bf16, 576 keys: 165 us vs 500 us per layer)
        # and for causal prefill in query blocks (512 tokens: 3.1 ms vs 6.5 ms per layer).
        cpu_infer = q.device.type == "cpu" and not (torch.is_grad_enabled() and q.requires_grad)
        if mask is None and cpu_infer and cfg.attn_softcap is None:
            out = self._causal_attention(q, k, v)
        elif cfg.attn_softcap is None and not (T == 1 and cpu_infer):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                                 enable_gqa=cfg.n_kv_heads != cfg.n_heads)  # [B, H, T, D]
        else:
            out = self._matmul_attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim))

    def _qk_norm(self, qk: torch.Tensor) -> torch.Tensor:
        """q_norm on the first H heads of ``qk`` [B, T, H+KV, D] and k_norm on the rest, as one
        norm and one multiply by the stacked ``1 + w`` [H+KV, D]: what each RMSNorm computes
        (x * rsqrt(mean(x^2) + eps), then the scale, in fp32, rounded once), so the same numbers."""
        H, KV, D = self.config.n_heads, self.config.n_kv_heads, self.config.head_dim
        scale = torch.cat([self.q_norm._scale().expand(H, D), self.k_norm._scale().expand(KV, D)])  # [H+KV, D]
        normed = F.rms_norm(qk.float(), (D,), None, self.q_norm.eps)  # [B, T, H+KV, D]
        return (normed * scale).type_as(qk)

    def _causal_attention(self, q, k, v):
        """Causal attention over the new keys only (mask None: a prompt's first chunk), as matmuls
        in blocks of ``CAUSAL_BLOCK`` queries: block [s, e) reads keys [0, e) only, so the masked
        upper triangle is mostly never computed, and only the diagonal block needs a mask (-inf
        above the diagonal; a query always sees itself, so no row is fully masked). Softmax in
        at least fp32, as in :meth:`_matmul_attention`."""
        B, H, T, D = q.shape
        KV = k.shape[1]
        G = H // KV
        acc = torch.promote_types(q.dtype, torch.float32)
        k3 = k.reshape(B * KV, T, D).transpose(1, 2).contiguous()  # [B*KV, D, T]
        v3 = v.reshape(B * KV, T, D).contiguous()  # [B*KV, T, D]
        bs = min(T, CAUSAL_BLOCK)
        tri = torch.full((bs, bs), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)  # [bs, bs]
        zero = q.new_zeros(())
        out = q.new_empty(B, T, H, D)  # the layout o_proj reads: the caller's transpose is free
        for s in range(0, T, bs):
            e = min(s + bs, T)
            n = e - s
            qb = q[:, :, s:e].reshape(B * KV, G * n, D)  # [B*KV, G*n, D]
            scores = torch.baddbmm(zero, qb, k3[:, :, :e], beta=0, alpha=self.scale)  # [B*KV, G*n, e]
            scores.view(B * KV, G, n, e)[..., s:e] += tri[:n, :n]  # keys after each query
            probs = torch.softmax(scores, dim=-1, dtype=acc).to(q.dtype)
            out[:, s:e] = torch.bmm(probs, v3[:, :e]).view(B, H, n, D).transpose(1, 2)  # [B, n, H, D]
        return out.transpose(1, 2)  # [B, H, T, D]

    def _matmul_attention(self, q, k, v, mask):
        """Attention as two matmuls, with the tanh soft-capping of the logits where configured
        (Gemma 2; fused kernels lack it). Grouped-query heads are folded into the matmul rows
        ([B*KV, G*T, D] against [B*KV, S, D]): no copy of k/v per query head."""
        cap = self.config.attn_softcap
        B, H, T, D = q.shape
        KV, S = k.shape[1], k.shape[2]
        G = H // KV
        # 3-D views for bmm (a cache slice [B, KV, S, D] merges B and KV without a copy): torch.matmul
        # on the 4-D tensors copies k first (one decode layer: 100 us vs 200 us in all).
        q3, k3, v3 = q.reshape(B * KV, G * T, D), k.reshape(B * KV, S, D), v.reshape(B * KV, S, D)
        mask3 = mask[:, :, None].expand(B, KV, G, T, S).reshape(B * KV, G * T, S)
        acc = torch.promote_types(q.dtype, torch.float32)
        if cap is None and torch.finfo(q.dtype).max > 1e38:
            # mask + scale * q k^T in one kernel. The finite minimum of the mask (which keeps fully
            # masked padding rows free of NaN) cannot round to -inf in a dtype with fp32's range.
            scores = torch.baddbmm(mask3, q3, k3.transpose(1, 2), alpha=self.scale)  # [B*KV, G*T, S]
        else:
            scores = torch.bmm(q3, k3.transpose(1, 2)) * self.scale  # [B*KV, G*T, S]
            if cap is not None:
                scores = torch.tanh(scores / cap) * cap
            # fp16: add the mask in fp32, where its finite minimum stays finite
            scores = scores.to(acc) + mask3.to(acc)
        probs = torch.softmax(scores, dim=-1, dtype=acc).to(q.dtype)  # softmax in at least fp32
        return torch.bmm(probs, v3).view(B, H, T, D)  # [B, H, T, D]


class MLP(nn.Module):
    """GeGLU with the tanh approximation of GELU (report: "approximated version of GeGLU")."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.d_model, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate/up stacked into one matrix (quant.fuse_projections)

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        act = F.gelu(gate, approximate="tanh")
        if torch.is_grad_enabled() and act.requires_grad:
            return self.down_proj(act * up)
        return self.down_proj(act.mul_(up))  # inference: no second [B, T, ffn] buffer


class Block(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.local = config.is_local(layer)
        self.sandwich = config.sandwich_norms
        self.pre_attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, self.local)
        if config.sandwich_norms:
            self.post_attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.pre_mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)
        if config.sandwich_norms:
            self.post_mlp_norm = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, h, rope, masks, step):
        cos, sin = rope[self.local]
        r = self.attn(self.pre_attn_norm(h), cos, sin, masks[self.local], step, self.layer)
        if self.sandwich:
            r = self.post_attn_norm(r)
        h = h + r
        r = self.mlp(self.pre_mlp_norm(h))
        if self.sandwich:
            r = self.post_mlp_norm(r)
        return h + r


class TiedEmbedding(nn.Embedding):
    """Input embedding that is also the output projection (report: embeddings shared across
    inputs and outputs). Quantized replacements provide the same two methods."""

    def reset_parameters(self) -> None:
        # nn.Embedding's own init draws the same N(0, 1) through nn.init.normal_, whose first call
        # imports torch._dynamo: 1.4 s of every cold start, even on the meta device where there is
        # nothing to draw. Tensor.normal_ makes the same draws without that import.
        if self.weight.is_meta:
            return
        with torch.no_grad():
            self.weight.normal_()
        self._fill_padding_idx_with_zero()

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)  # [..., d_model] -> [..., vocab]


class GemmaModel(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.embed = TiedEmbedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self._inv_freq: dict = {}
        # sqrt(d_model) as each activation dtype rounds it (precomputed: no .item() in forward,
        # which would break a torch.compile graph).
        self._embed_scale = {dt: torch.tensor(math.sqrt(config.d_model), dtype=dt, device="cpu").item()
                             for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}

    def make_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> KVCache:
        # The norms stay in the activation dtype even when linear weights are quantized.
        w = self.final_norm.weight
        return KVCache(self.config, batch_size, max_len, dtype=dtype or w.dtype, device=device or w.device)

    def inv_freq(self, local: bool, device: torch.device) -> torch.Tensor:
        """RoPE inverse frequencies [D/2] in fp32; linear scaling applies to global layers only."""
        key = (local, str(device))
        if key not in self._inv_freq:
            cfg = self.config
            base = cfg.local_rope_base if local else cfg.rope_base
            exps = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device=device).float() / cfg.head_dim
            inv = 1.0 / (base ** exps)
            if not local:
                inv = inv / cfg.rope_scale
            self._inv_freq[key] = inv
        return self._inv_freq[key]

    def _rope(self, pos: torch.Tensor, local: bool, dtype: torch.dtype):
        freqs = pos[..., None].float() * self.inv_freq(local, pos.device)  # [B, T, D/2], fp32 angles
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, D]
        sin = emb.sin()
        sin[..., :freqs.shape[-1]].neg_()  # rotate_half's sign, for apply_rope
        return emb.cos().to(dtype), sin.to(dtype)  # cos, sin_signed: [B, 1, T, D]

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] (fp32) for ``tokens`` [B, T] at positions ``input_pos`` ([B, T] or [T]).

        Without a cache, positions default to 0..T-1 and attention is causal within ``tokens``.
        With a cache, the new keys/values are written at ``input_pos`` and attention also covers
        what the cache holds. ``logits_at`` ([B] indices into T) computes logits for one position
        per row only ([B, 1, vocab]), which is all prefill needs.
        """
        cfg = self.config
        B, T = tokens.shape
        default_pos = input_pos is None
        if default_pos:
            input_pos = torch.arange(T, device=tokens.device)
        if input_pos.dim() == 1:
            input_pos = input_pos[None].expand(B, T)
        h = self.embed(tokens).to(self.final_norm.weight.dtype)  # [B, T, d_model]
        # The reference multiplies by sqrt(d_model) rounded to the activation dtype (25.25, not
        # 25.298, in bf16 for d_model=640): a Python float holding that rounded value does the same.
        h = h * self._embed_scale[h.dtype]
        rope = {False: self._rope(input_pos, False, h.dtype)}
        has_local = bool(cfg.layer_types) and any(cfg.is_local(i) for i in range(cfg.n_layers))
        if has_local:
            rope[True] = self._rope(input_pos, True, h.dtype)
        if cache is None:
            step = None
            # Default positions without soft-capping: None = SDPA's is_causal (no mask to build or
            # read, masked half skipped), for local layers too while T fits in the window.
            causal = default_pos and T > 1 and cfg.attn_softcap is None
            masks = {False: None if causal else attention_mask(input_pos, input_pos, None, h.dtype)}
            if has_local:
                masks[True] = (None if causal and T <= cfg.sliding_window
                               else attention_mask(input_pos, input_pos, cfg.sliding_window, h.dtype))
        else:
            step = _Step(cache, input_pos, h.dtype)
            masks = {False: None, True: None}  # the step supplies each layer's mask
        for block in self.layers:
            h = block(h, rope, masks, step)
        if logits_at is not None:
            h = h[torch.arange(B, device=h.device), logits_at][:, None]  # [B, 1, d_model]
        h = self.final_norm(h)
        logits = self.embed.attend(h).float()  # tied output projection, [B, T, vocab]
        if cfg.final_softcap is not None:
            logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits


def build_model(config: GemmaConfig, *, device: torch.device | str | None = "meta",
                dtype: torch.dtype | None = None) -> GemmaModel:
    """Construct the model; on the ``meta`` device by default (no memory) for counting or loading."""
    with torch.device(device):
        model = GemmaModel(config)
    if dtype is not None:
        model = model.to(dtype)
    return model


def load_weights(config: GemmaConfig, state_dict: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> GemmaModel:
    """Build on ``meta`` and adopt the checkpoint's tensors: strict, no random init, no copies."""
    model = build_model(config, device="meta")
    from .checkpoints import check_state_dict

    check_state_dict(config, state_dict, "checkpoint")
    sd = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()
