"""The Gemma transformer: one implementation for Gemma 1, 2 and 3 text models.

Report section "Model Architecture": a decoder-only transformer with multi-query (2B) or
multi-head (7B) attention, RoPE in every layer, GeGLU feed-forward blocks with the tanh
approximation of GELU, RMSNorm before each sub-layer, and input/output embeddings shared.
Gemma 2 and 3 add, behind config flags: tanh soft-capping of attention and output logits,
post-sub-layer ("sandwich") norms, RMSNorm on queries and keys, interleaved local
(sliding-window) and global layers with their own RoPE bases, and linear RoPE scaling.

The model is pure compute, in two halves: :meth:`GemmaModel.trunk` (tokens -> final-normed hidden
states [B, T, d_model]) and :meth:`GemmaModel.head` (hidden -> logits over the vocabulary through
the tied embedding, soft-capped); ``forward`` is one after the other. Training's chunked loss and
a reward model's scalar head use the hidden states without ever forming the 256k-wide logits.

Positions are given per row, so rows of one batch may sit at different positions (batched
prompts of different lengths, continuous batching); -1 marks padding, which is neither attended
to nor cached. Packed training rows pass segment ids: documents never see each other, and their
positions restart at 0. The KV cache (:mod:`opengemma.cache`) is explicit and preallocated;
attention itself is :func:`opengemma.attention.attend`. Inference-only rewrites (stacked
projections, quantized linears, compiled steps) are applied from outside (:mod:`opengemma.fusion`,
:mod:`opengemma.quant`, :mod:`opengemma.compiled`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend, attention_mask
from .cache import CacheStep, KVCache
from .config import GemmaConfig


class RMSNorm(nn.Module):
    """RMSNorm with Gemma's ``(1 + w)`` scale; statistics and scale in fp32 as the reference does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def scale(self) -> torch.Tensor:
        w = self.weight
        if not torch.is_inference_mode_enabled() or torch.compiler.is_compiling():
            return 1.0 + w.float()  # [dim], fp32
        # Inference mode (generation, serving): kept between calls (two kernels per norm, ~100 norms
        # per decode step), keyed by the tensor's storage and version so that loading or editing
        # the weight renews it. Only there: an inference-mode tensor must not reach autograd (a frozen
        # norm in LoRA training right after a rollout).
        key = (w.data_ptr(), w._version, w.device, w.dtype)
        cached = self.__dict__.get("_scale")
        if cached is None or cached[0] != key:
            cached = (key, 1.0 + w.detach().float())
            self.__dict__["_scale"] = cached
        return cached[1]  # [dim], fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused rms_norm computes x * rsqrt(mean(x^2) + eps) * w in fp32, as the reference.
        # Scale before casting back (not after): keeps bf16 outputs equal to the reference's.
        return F.rms_norm(x.float(), (x.shape[-1],), self.scale(), self.eps).type_as(x)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """The reference's ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``.

    The sign of rotate_half is folded into ``sin_signed`` (= cat(-sin, sin) halves, see
    :meth:`GemmaModel.rope`), leaving a plain roll: bit-identical (negation is exact), 4 kernels
    instead of 6 per tensor.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        self.config = config
        self.layer = layer
        self.window = config.sliding_window if config.is_local(layer) else None
        d, h, kv, hd = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, kv * hd, bias=False)
        self.v_proj = nn.Linear(d, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.norm_eps)
            self.k_norm = RMSNorm(hd, config.norm_eps)
        self.scale = config.query_pre_attn_scalar ** -0.5

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries [B, H, T, D], keys and values [B, KV, T, D] for x [B, T, d_model]: projected,
        (Gemma 3) normed per head, and rotated."""
        cfg = self.config
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, KV, T, D]
        v = self.v_proj(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, KV, T, D]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                step: CacheStep | None) -> torch.Tensor:
        """``mask``: additive [B, 1, T, T], or None for causal over positions 0..T-1 (no cache);
        with a cache ``step``, the step supplies keys, values and mask."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if step is not None:
            k, v, mask = step.update(self.layer, k, v)  # [B, KV, S, D]
        out = attend(q, k, v, scale=self.scale, causal=mask is None, window=self.window, mask=mask,
                     softcap=self.config.attn_softcap)  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """GeGLU with the tanh approximation of GELU (report: "approximated version of GeGLU")."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.d_model, bias=False)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_proj(x), self.up_proj(x)  # [B, T, ffn] each

    def forward(self, x):
        gate, up = self.gate_up(x)
        act = F.gelu(gate, approximate="tanh")
        if torch.is_grad_enabled() and act.requires_grad:
            return self.down_proj(act * up)
        return self.down_proj(act.mul_(up))  # inference: no second [B, T, ffn] buffer


class Block(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        self.local = config.is_local(layer)
        self.sandwich = config.sandwich_norms
        self.pre_attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, layer)
        if config.sandwich_norms:
            self.post_attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.pre_mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)
        if config.sandwich_norms:
            self.post_mlp_norm = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, h: torch.Tensor, rope: dict, masks: dict, step: CacheStep | None) -> torch.Tensor:
        cos, sin = rope[self.local]
        r = self.attn(self.pre_attn_norm(h), cos, sin, masks[self.local], step)
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
        # nn.Embedding's own init draws N(0, 1) through nn.init.normal_, whose first call imports
        # torch._dynamo (1.4 s of every cold start, even on the meta device where there is nothing
        # to draw). The model's weights are set by a checkpoint or init_weights anyway.
        if not self.weight.is_meta:
            with torch.no_grad():
                self.weight.normal_()

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)  # [..., d_model] -> [..., vocab]


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] restarting at 0 where ``segment_ids`` [B, T] changes (packed documents)."""
    T = segment_ids.shape[1]
    idx = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)  # [B, T]
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, idx, 0).cummax(dim=1).values  # [B, T], index where each document starts
    return idx - first


class GemmaModel(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.embed = TiedEmbedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self._has_local = any(config.is_local(i) for i in range(config.n_layers))
        self._inv_freq: dict = {}
        # sqrt(d_model) as each activation dtype rounds it (precomputed: no .item() in forward,
        # which would break a torch.compile graph).
        self._embed_scale = {dt: torch.tensor(math.sqrt(config.d_model), dtype=dt, device="cpu").item()
                             for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> GemmaModel:
        """Fresh weights for training from scratch: every linear and the tied embedding from
        N(0, ``std``^2), every RMSNorm weight 0 (scale 1 + 0). The scheme of HF transformers'
        ``GemmaPreTrainedModel._init_weights`` (``initializer_range`` 0.02) and of the report
        family's reference code, which initialises the embedding with the same normal."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        return self

    def make_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None, *, spare: int = 0) -> KVCache:
        """A KV cache for this model (``spare``: extra ring slots for speculative decoding)."""
        # The norms stay in the activation dtype even when linear weights are quantized.
        w = self.final_norm.weight
        return KVCache(self.config, batch_size, max_len, dtype=dtype or w.dtype, device=device or w.device,
                       spare=spare)

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

    def rope(self, pos: torch.Tensor, local: bool, dtype: torch.dtype):
        """cos, sin_signed [B, 1, T, D] for positions [B, T] (angles in fp32, as the reference)."""
        freqs = pos[..., None].float() * self.inv_freq(local, pos.device)  # [B, T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, D]
        sin = emb.sin()
        sin[..., :freqs.shape[-1]].neg_()  # rotate_half's sign, for apply_rope
        return emb.cos().to(dtype), sin.to(dtype)

    def trunk(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, cache: KVCache | None = None,
              *, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, d_model] for ``tokens`` [B, T].

        Without a cache: positions default to 0..T-1 and attention is causal within ``tokens``;
        ``segment_ids`` [B, T] (packed documents) keeps documents apart, and their positions
        default to restarting at 0 per document. With a cache: the new keys/values are written at
        ``input_pos`` ([B, T] or [T]) and attention also covers what the cache holds.
        """
        cfg = self.config
        B, T = tokens.shape
        causal = input_pos is None and segment_ids is None and cache is None
        if input_pos is None:
            input_pos = segment_positions(segment_ids) if segment_ids is not None else torch.arange(T, device=tokens.device)
        if input_pos.dim() == 1:
            input_pos = input_pos[None].expand(B, T)
        h = self.embed(tokens).to(self.final_norm.weight.dtype)  # [B, T, d_model]
        # The reference multiplies by sqrt(d_model) rounded to the activation dtype (25.25, not
        # 25.298, in bf16 for d_model=640): a Python float holding that rounded value does the same.
        h = h * self._embed_scale[h.dtype]
        kinds = (False, True) if self._has_local else (False,)
        rope = {local: self.rope(input_pos, local, h.dtype) for local in kinds}
        step = None
        if cache is not None:
            step = cache.step(input_pos, h.dtype)
            masks = {local: None for local in kinds}  # the step supplies each layer's mask
        elif causal:
            masks = {local: None for local in kinds}  # causal over 0..T-1: attend needs no mask
        else:
            masks = {local: attention_mask(input_pos, input_pos, cfg.sliding_window if local else None, h.dtype,
                                           q_seg=segment_ids, k_seg=segment_ids) for local in kinds}
        for block in self.layers:
            h = block(h, rope, masks, step)
        return self.final_norm(h)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., vocab] (fp32) for hidden states [..., d_model]: the tied output
        projection, then Gemma 2's final soft-cap where configured."""
        logits = self.embed.attend(hidden).float()
        cap = self.config.final_softcap
        return torch.tanh(logits / cap) * cap if cap is not None else logits

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_at: torch.Tensor | None = None, *, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] (fp32): ``head(trunk(...))``. ``logits_at`` ([B] indices into T)
        computes logits for one position per row only ([B, 1, vocab]), which is all prefill needs."""
        h = self.trunk(tokens, input_pos, cache, segment_ids=segment_ids)
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at][:, None]  # [B, 1, d_model]
        return self.head(h)


def build_model(config: GemmaConfig, *, device: torch.device | str | None = "meta",
                dtype: torch.dtype | None = None) -> GemmaModel:
    """Construct the model; on the ``meta`` device by default (no memory) for counting or loading."""
    with torch.device(device):
        model = GemmaModel(config)
    if dtype is not None:
        model = model.to(dtype)
    return model
