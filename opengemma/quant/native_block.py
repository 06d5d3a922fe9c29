"""A decode step's whole transformer block in one native call (``block.c``): :class:`NativeBlock`.

Why by hand (issue 19; measured with ``bench/bench_inference.py``, ``bench/results/cpu-block-epyc.md``):
once the native kernels (:mod:`.native`) read the quantized weights at memory speed, about two
thirds of a decode step of the embedded 270M was PyTorch's per-op cost around them. A block is
~40 small ops (norms, RoPE, the cache write, attention's matmuls and softmax, GELU, residual adds)
on a few hundred numbers each, 3-30 us of dispatch apiece: ~20 ms per token against ~12 ms of
weight reading. ``block.c`` does a block's work in one call: its four linears through the same
kernels, and everything between them in plain loops.

What it computes is :class:`~opengemma.model.Block`'s forward with the stacked projections of
:mod:`opengemma.fusion`, in fp32, rounding to bf16 wherever PyTorch's path stores bf16 (``block.c``
says where). The two differ only in the order of sums (norms, attention dot products) and in the
last bits of exp/tanh; attention runs in fp32 over any number of keys.

When it runs (else the block's PyTorch forward does, with the native linears where they fit): a
forward through a KV cache of at most :data:`~.native.MAX_ROWS` rows (decode steps, speculative
verification, a server's decode batch) on the CPU, eager, without autograd; bf16 or fp32
activations and cache; all four of the block's (stacked) linears on the native kernels; the cache
step writing before it attends (not a chunk that overwrites ring slots its own queries need; a
prompt's first chunk is fine: the step's masks hide whatever an earlier tenant left in the cache,
each stale key being overwritten or at a later position). Stacked or separate q/k/v and gate/up alike. :func:`use_native_blocks` swaps the class of each block that qualifies (the
class swap of :mod:`opengemma.fusion`: same modules, same state dict) and back.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from ..cache import CacheStep
from ..model import Block
from . import native

__all__ = ["NativeBlock", "use_native_blocks"]

_ACT = (torch.bfloat16, torch.float32)


class _Lin(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("K", ctypes.c_int), ("N", ctypes.c_int), ("ldw", ctypes.c_long),
                ("w", ctypes.c_void_p), ("s", ctypes.c_void_p)]


class _Block(ctypes.Structure):  # block.c's og_block
    _fields_ = [("d", ctypes.c_int), ("H", ctypes.c_int), ("KV", ctypes.c_int), ("D", ctypes.c_int),
                ("F", ctypes.c_int), ("qk_norm", ctypes.c_int), ("sandwich", ctypes.c_int),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("softcap", ctypes.c_float),
                *((name, ctypes.c_void_p) for name in ("pre_attn", "post_attn", "pre_mlp", "post_mlp", "q_norm", "k_norm")),
                *((name, _Lin) for name in ("qkv", "k", "v", "o", "gate_up", "up", "down"))]


def _linears(block: Block) -> list | None:
    """The block's linears as og_block takes them (q/k/v and gate/up stacked by :mod:`opengemma.fusion`,
    or apart: None in the k, v and up places when stacked), if all are on the native kernels."""
    attn, mlp = block.attn, block.mlp
    qkv = [attn.qkv_proj, None, None] if hasattr(attn, "qkv_proj") else [attn.q_proj, attn.k_proj, attn.v_proj]
    gate_up = [mlp.gate_up_proj, None] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]
    mods = [*qkv, attn.o_proj, *gate_up, mlp.down_proj]
    return mods if all(m is None or getattr(m, "native", False) is True for m in mods) else None


def _plan(block: Block) -> tuple[_Block, list] | None:
    """og_block for ``block`` as it is now (pointers are read per call: a reloaded or edited weight
    is never stale), and the tensors that must stay alive during the call; None if it does not fit."""
    mods = _linears(block)
    if mods is None:
        return None
    lins = [(0, 0, 0, 0, None, None) if m is None else native.weight_args(m) for m in mods]
    if any(a is None for a in lins):
        return None
    attn, cfg = block.attn, block.attn.config
    keep = []

    def scale(norm) -> int:
        s = norm.scale()  # fp32 (1 + w), cached in inference mode
        keep.append(s)
        return s.data_ptr()

    p = _Block(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, block.mlp.down_proj.in_features,
               int(cfg.qk_norm), int(block.sandwich), block.pre_attn_norm.eps, attn.scale, cfg.attn_softcap or 0.0)
    p.pre_attn, p.pre_mlp = scale(block.pre_attn_norm), scale(block.pre_mlp_norm)
    if block.sandwich:
        p.post_attn, p.post_mlp = scale(block.post_attn_norm), scale(block.post_mlp_norm)
    if cfg.qk_norm:
        p.q_norm, p.k_norm = scale(attn.q_norm), scale(attn.k_norm)
    p.qkv, p.k, p.v, p.o, p.gate_up, p.up, p.down = (_Lin(*a) for a in lins)
    return p, keep


def decode(block: Block, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step) -> torch.Tensor | None:
    """``block(h, ...)`` for h [B, T, d_model] through ``block.c``, or None when the call does not fit it."""
    B, T, _ = h.shape
    if (not isinstance(step, CacheStep) or B * T > native.MAX_ROWS or h.dtype not in _ACT or h.device.type != "cpu"
            or (block.local and step.local_concat) or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and h.requires_grad)):
        return None
    layer = block.attn.layer
    ck, cv = step.cache.k[layer], step.cache.v[layer]  # [B, KV, slots, D]
    mask = step.local_mask if block.local else step.global_mask  # [B, 1, T, n]
    slots = step.local_slots if block.local else step.global_slots  # [B, T]
    cos, sin = rope  # [B, 1, T, D]
    if (ck.dtype != h.dtype or ck.stride(3) != 1 or cv.stride() != ck.stride() or mask.dtype != h.dtype
            or cos.dtype != h.dtype or not (mask.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
                                            and slots.is_contiguous())):
        return None
    lib, plan = native.library(), _plan(block)
    if lib is None or plan is None:
        return None
    h = h.contiguous()
    out = torch.empty_like(h)
    rc = lib.og_block_decode(ctypes.addressof(plan[0]), h.data_ptr(), out.data_ptr(), B, T, int(h.dtype == torch.bfloat16),
                             cos.data_ptr(), sin.data_ptr(), ck.data_ptr(), cv.data_ptr(), ck.stride(0), ck.stride(1),
                             ck.stride(2), slots.data_ptr(), mask.data_ptr(), mask.shape[-1])
    return None if rc else out


class NativeBlock(Block):
    """A :class:`~opengemma.model.Block` whose decode-sized cached forwards run in ``block.c``."""

    def forward(self, h: torch.Tensor, rope: dict, masks: dict, step: CacheStep | None) -> torch.Tensor:
        if step is not None:
            out = decode(self, h, rope[self.local], step)
            if out is not None:
                return out
        return super().forward(h, rope, masks, step)


def use_native_blocks(model: nn.Module, on: bool = True) -> int:
    """Make each block of ``model`` whose four linears are on the native kernels a :class:`NativeBlock`
    (``on``), or every block a plain :class:`~opengemma.model.Block` again; returns how many are native."""
    n = 0
    for block in getattr(model, "layers", ()):
        if type(block) not in (Block, NativeBlock):
            continue
        native_ok = on and native.available() and _linears(block) is not None
        block.__class__ = NativeBlock if native_ok else Block
        n += native_ok
    return n
