"""Quantized models as flat tensors plus a plan of their modules, and back: what lets the
converted-weight cache (:mod:`opengemma.checkpoints.cache`) keep int8/int4 models too, so a quantized
cold start memory-maps the packed weights instead of converting the GGUF again (fast-inference
issue, item 4).

The tensors are the model's ``state_dict()`` (packed weights, scales, norms); the plan names each
quantized module with what its constructor needs beyond its tensors (kind, shape, group, layout,
dtypes; for a screened head, :mod:`.head`, its screen and candidate count too). Packed layouts belong to the torch build that made them, so cache keys include the torch
version.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import GemmaConfig
from ..fusion import adopt_stacked
from ..errors import OpenGemmaError
from .head import ScreenedEmbedding
from .linear import Int4Linear, Int8Linear, QuantizedEmbedding

__all__ = ["from_flat", "to_flat"]

_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def _spec(mod: Int8Linear | Int4Linear) -> dict:
    spec = {"kind": "int8" if isinstance(mod, Int8Linear) else "int4", "act_dtype": str(mod.act_dtype),
            "compute_dtype": str(mod.compute_dtype)}
    if isinstance(mod, Int4Linear):
        if mod.layout == "cuda":
            raise ValueError("CUDA-packed int4 weights are not stored (they are re-packed at load)")
        spec.update(out_features=mod.out_features, in_features=mod.in_features, group_size=mod.group_size,
                    layout=mod.layout)
    return spec


def to_flat(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, plan) of a quantized model (see :func:`from_flat`)."""
    plan, parts = {}, set()  # parts: the modules inside an embedding, stored with it
    for name, mod in model.named_modules():
        if isinstance(mod, QuantizedEmbedding):
            plan[name] = {"embedding": True, **_spec(mod.inner)}
            parts.add(id(mod.inner))
            if isinstance(mod, ScreenedEmbedding):
                plan[name].update(screen=_spec(mod.screen), candidates=mod.candidates, max_rows=mod.max_rows)
                parts.add(id(mod.screen))
        elif isinstance(mod, (Int8Linear, Int4Linear)) and id(mod) not in parts:
            plan[name] = {"embedding": False, **_spec(mod)}
    return dict(model.state_dict()), plan


def _build(prefix: str, spec: dict, tensors: dict[str, torch.Tensor], used: set[str]) -> nn.Module:
    def take(name):
        used.add(prefix + name)
        return tensors[prefix + name]

    act, cd = _DTYPES[spec["act_dtype"]], _DTYPES[spec["compute_dtype"]]
    if spec["kind"] == "int8":
        return Int8Linear(take("qweight"), take("scales"), act_dtype=act, compute_dtype=cd)
    rows = prefix + "rows_plain"
    return Int4Linear(take("qweight"), take("scales_and_zeros"), spec["out_features"], spec["in_features"],
                      spec["group_size"], act_dtype=act, compute_dtype=cd, layout=spec["layout"],
                      rows_plain=take("rows_plain") if rows in tensors else None)


def from_flat(config: GemmaConfig, tensors: dict[str, torch.Tensor], plan: dict) -> nn.Module:
    """The quantized model that :func:`to_flat` flattened; every tensor must be used exactly once."""
    from ..model import build_model

    model = build_model(config, device="meta")
    used: set[str] = set()
    try:
        for name, spec in plan.items():
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if spec["embedding"] and "screen" in spec:
                mod = ScreenedEmbedding(_build(f"{name}.inner.", spec, tensors, used),
                                        _build(f"{name}.screen.", spec["screen"], tensors, used),
                                        candidates=spec["candidates"], max_rows=spec["max_rows"])
            elif spec["embedding"]:
                mod = QuantizedEmbedding(_build(f"{name}.inner.", spec, tensors, used))
            else:
                mod = _build(f"{name}.", spec, tensors, used)
            setattr(parent, attr, mod)
        adopt_stacked(model)  # stacked projections replace their parts
        for name, p in list(model.named_parameters()):
            mod_name, _, attr = name.rpartition(".")
            used.add(name)
            setattr(model.get_submodule(mod_name), attr, nn.Parameter(tensors[name], requires_grad=False))
    except (KeyError, AttributeError, ValueError, TypeError) as e:
        raise OpenGemmaError(f"stored quantized model does not fit its plan: {e}") from None
    if used != set(tensors):
        raise OpenGemmaError(f"stored quantized model has unused tensors, e.g. {sorted(set(tensors) - used)[0]}")
    return model.eval()
