"""A float model into a quantized one, in place: :func:`quantize_model` replaces every bias-free
linear layer and the tied embedding with the modules of :mod:`.linear`, and :func:`fuse_projections`
stacks each layer's quantized q/k/v and gate/up (:mod:`opengemma.fusion` with a quantized ``stack``).
Applied from outside the model, as every inference-only rewrite is."""

from __future__ import annotations

import torch
from torch import nn

from .linear import DEFAULT_GROUP, MODES, Int4Linear, Int8Linear, QuantizedEmbedding

__all__ = ["check_mode", "fuse_projections", "quantize_model"]


def check_mode(mode: str) -> None:
    if mode not in MODES:
        from ..errors import OpenGemmaError

        raise OpenGemmaError(f"unknown quantization {mode!r}; choose one of none, {', '.join(MODES)}")


def _quantize_weight(w: torch.Tensor, mode: str, group_size: int, act_dtype, compute_dtype, embedding=False):
    if mode == "int8" or w.shape[1] % group_size:
        return Int8Linear.from_float(w, act_dtype=act_dtype, compute_dtype=compute_dtype)
    return Int4Linear.from_float(w, group_size, act_dtype=act_dtype, compute_dtype=compute_dtype,
                                 keep_rows=embedding)


def quantize_model(model: nn.Module, mode: str, *, group_size: int = DEFAULT_GROUP,
                   compute_dtype: torch.dtype | None = None, fuse: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` (bias-free) and the tied embedding in place; returns ``model``.

    One weight is quantized at a time (in row chunks) and its float copy dropped right after, so
    the extra memory is a few chunks, not a second model. Norms are untouched. A linear whose
    input size is not a multiple of ``group_size`` gets int8 in int4 mode. ``mixed``: int8
    weights, and the int8 head gets a 4-bit screen (:func:`opengemma.quant.head.screen_head`).
    ``fuse`` then stacks q/k/v and gate/up (:func:`fuse_projections`).
    """
    check_mode(mode)
    from ..model import TiedEmbedding

    weights = "int8" if mode == "mixed" else mode
    targets = [(name, mod) for name, mod in model.named_modules()
               if (isinstance(mod, nn.Linear) and mod.bias is None) or isinstance(mod, TiedEmbedding)]
    with torch.no_grad():
        for name, mod in targets:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            w = mod.weight.detach()
            emb = isinstance(mod, TiedEmbedding)
            new = _quantize_weight(w, weights, group_size, w.dtype, compute_dtype, embedding=emb)
            setattr(parent, attr, QuantizedEmbedding(new) if emb else new)
            del w
            mod.weight = None  # drop the float weight now, not when the loop ends
    if mode == "mixed":
        from .head import screen_head

        screen_head(model)
    return fuse_projections(model) if fuse else model


# -- fused projections ------------------------------------------------------------------------------
def _concat(mods: list[nn.Module]) -> nn.Module | None:
    """One quantized linear computing ``cat([m(x) for m in mods], -1)``, or None where the parts
    cannot share one matrix (mixed kinds, or an int4 layout whose rows cannot simply be stacked)."""
    first = mods[0]
    same = (type(first),) + tuple(getattr(first, a, None) for a in ("in_features", "act_dtype", "compute_dtype",
                                                                    "group_size", "layout"))
    if any((type(m),) + tuple(getattr(m, a, None) for a in ("in_features", "act_dtype", "compute_dtype", "group_size",
                                                            "layout")) != same for m in mods):
        return None
    N = sum(m.out_features for m in mods)
    if isinstance(first, Int8Linear):
        return Int8Linear(torch.cat([m.qweight for m in mods]), torch.cat([m.scales for m in mods]),
                          act_dtype=first.act_dtype, compute_dtype=first.compute_dtype)
    if first.layout not in ("cpu", "plain") or any(m.n_pad for m in mods):
        return None  # CPU blocks are 64 rows: stacking is exact only without padding rows
    return Int4Linear(torch.cat([m.qweight for m in mods]), torch.cat([m.scales_and_zeros for m in mods], dim=1),
                      N, first.in_features, first.group_size, act_dtype=first.act_dtype,
                      compute_dtype=first.compute_dtype, layout=first.layout)


def fuse_projections(model: nn.Module) -> nn.Module:
    """Stack each layer's q/k/v and gate/up quantized weights into one matrix each (in place;
    :func:`opengemma.fusion.fuse_projections` with :func:`_concat`)."""
    from ..fusion import fuse_projections as fuse

    return fuse(model, _concat)
