"""Stacked projections: an inference-only rewrite of a model, applied from outside it and undone
before export.

A decode step at batch 1 is dominated by per-call cost for matrices this small (e.g. 35 us for a
1024x640 int4 matmul vs 43 us for the stacked 1536x640): stacking each layer's q/k/v into one
matrix and gate/up into another makes three calls one and two calls one, ~1.5 ms per token on the
270M model. Outputs are split with views, so every output is still the same row's dot product.
With QK-norm (Gemma 3) the q and k heads of the stacked output are adjacent, so they are normed
and rotated in one call each instead of two (the same numbers: each head's norm is its own).

:func:`fuse_projections` turns a block's :class:`~opengemma.model.Attention` into a
:class:`FusedAttention` and its MLP into a :class:`FusedMLP` (the class swap that
``torch.nn.utils.parametrize`` also uses; the model file knows nothing of it);
:func:`unfuse_projections` restores the checkpoint's parameterization (and names). What "stack"
means for a kind of linear layer is the caller's: plain ``nn.Linear`` here, quantized ones in
:mod:`opengemma.quant`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .model import MLP, Attention, apply_rope

Stack = Callable[[list[nn.Module]], nn.Module | None]
Split = Callable[[nn.Module, list[int]], list[nn.Module]]


def stack_linear(mods: list[nn.Module]) -> nn.Module | None:
    """One bias-free ``nn.Linear`` computing ``cat([m(x) for m in mods], -1)``, or None."""
    if not all(type(m) is nn.Linear and m.bias is None for m in mods):
        return None
    w = torch.cat([m.weight.detach() for m in mods])  # [sum N, K]
    out = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    out.weight = nn.Parameter(w, requires_grad=mods[0].weight.requires_grad)
    return out


def split_linear(mod: nn.Module, sizes: list[int]) -> list[nn.Module]:
    """The inverse of :func:`stack_linear`: one ``nn.Linear`` per row range of ``sizes``."""
    parts = []
    for w in mod.weight.detach().split(sizes):
        m = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        m.weight = nn.Parameter(w.clone(), requires_grad=mod.weight.requires_grad)
        parts.append(m)
    return parts


class FusedAttention(Attention):
    """:class:`Attention` with q/k/v computed by one stacked matrix ``qkv_proj``."""

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        cfg = self.config
        B, T, _ = x.shape
        H, KV, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * KV, D)  # [B, T, H+2KV, D]
        v = qkv[:, :, H + KV:].transpose(1, 2)  # [B, KV, T, D]
        if not cfg.qk_norm:
            q, k = qkv[:, :, :H].transpose(1, 2), qkv[:, :, H:H + KV].transpose(1, 2)
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
        # q_norm on the first H heads and k_norm on the next KV: one norm and one multiply by the
        # stacked 1 + w [H+KV, D], which is what each RMSNorm computes (fp32, rounded once).
        scale = torch.cat([self.q_norm.scale().expand(H, D), self.k_norm.scale().expand(KV, D)])  # [H+KV, D]
        qk = (F.rms_norm(qkv[:, :, :H + KV].float(), (D,), None, self.q_norm.eps) * scale).type_as(x)
        qk = apply_rope(qk, cos.transpose(1, 2), sin.transpose(1, 2))  # [B, T, H+KV, D]
        return qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), v


class FusedMLP(MLP):
    """:class:`MLP` with gate and up computed by one stacked matrix ``gate_up_proj``."""

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [B, T, ffn] each
        return gate, up


def fuse_projections(model: nn.Module, stack: Stack = stack_linear) -> nn.Module:
    """Stack each layer's q/k/v and gate/up (in place; returns ``model``). ``stack`` builds the
    stacked module from the parts, or returns None to leave that layer's parts as they are."""
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        if type(attn) is Attention:
            fused = stack([attn.q_proj, attn.k_proj, attn.v_proj])
            if fused is not None:
                del attn.q_proj, attn.k_proj, attn.v_proj
                attn.qkv_proj = fused
                attn.__class__ = FusedAttention
        if type(mlp) is MLP:
            fused = stack([mlp.gate_proj, mlp.up_proj])
            if fused is not None:
                del mlp.gate_proj, mlp.up_proj
                mlp.gate_up_proj = fused
                mlp.__class__ = FusedMLP
    return model


def unfuse_projections(model: nn.Module, split: Split = split_linear) -> nn.Module:
    """Undo :func:`fuse_projections` (in place): separate q/k/v and gate/up again, so that the
    state dict has the checkpoint formats' names."""
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        if isinstance(attn, FusedAttention):
            cfg = attn.config
            sizes = [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
            attn.q_proj, attn.k_proj, attn.v_proj = split(attn.qkv_proj, sizes)
            del attn.qkv_proj
            attn.__class__ = Attention
        if isinstance(mlp, FusedMLP):
            ffn = mlp.down_proj.in_features
            mlp.gate_proj, mlp.up_proj = split(mlp.gate_up_proj, [ffn, ffn])
            del mlp.gate_up_proj
            mlp.__class__ = MLP
    return model


def adopt_stacked(model: nn.Module) -> nn.Module:
    """Make blocks that were given a stacked ``qkv_proj`` / ``gate_up_proj`` (e.g. rebuilt from
    stored tensors) fused ones: their separate parts are dropped (in place)."""
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        if type(attn) is Attention and "qkv_proj" in attn._modules:
            del attn.q_proj, attn.k_proj, attn.v_proj
            attn.__class__ = FusedAttention
        if type(mlp) is MLP and "gate_up_proj" in mlp._modules:
            del mlp.gate_proj, mlp.up_proj
            mlp.__class__ = FusedMLP
    return model
