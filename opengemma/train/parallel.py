"""Parallelism from outside the model, in torchtitan's order: tensor parallelism, then activation
checkpointing, then per-block ``torch.compile``, then FSDP2, on a 2-D ``DeviceMesh`` (dp x tp).

Report section "Training Infrastructure": model sharding within a pod, data replication across,
optimizer state sharded like ZeRO-3. In PyTorch: ``torchrun`` starts one process per device,
:func:`setup` builds the mesh, :func:`parallelize` applies

* **TP** (``parallelize_module``): q/k/v and gate/up projections column-wise, o/down row-wise, so
  each rank holds ``n_heads / tp`` query heads and ``n_kv_heads / tp`` key/value heads (the
  attention modules get a per-rank copy of the config with those counts; the model code is
  untouched); Gemma 3's per-head q/k norms are replicated with gradients summed over tp. The tied embedding stays replicated over tp: it is one [vocab, d_model] tensor
  that is both the input embedding and the output head, and FSDP2 shards it over dp.
* **activation checkpointing**: each block recomputed in backward;
* **compile**: each block through ``torch.compile``;
* **FSDP2** (``fully_shard``): each block a unit, then the root (embedding and final norm);
  parameters, gradients and optimizer state sharded over dp (ZeRO-3). The model's ``trunk`` is
  registered as an FSDP forward method, so the loss (trunk, then the tied head) sees the
  unsharded embedding. bf16 runs compute in bf16 with fp32 master weights and fp32 reductions.

``parallelize_module`` replaces a module's parameters with new DTensor parameters: a model whose
head *holds* a reference to the embedding's weight would be silently untied (measured: the loss
drifts 6e-2 in 5 steps). Gemma's head is the embedding module itself, so there is no second
reference to lose; :func:`assert_tied` checks after every transform and every optimizer step that
the model holds exactly one [vocab, d_model] parameter and that ``model.head`` projects with it.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from ..errors import OpenGemmaError


# -- process group and mesh --------------------------------------------------------------------
def setup(dp: int | None = None, tp: int = 1, device: str | None = None):
    """Initialise the process group from torchrun's environment and build the (dp, tp) mesh.

    Returns ``(mesh, device)``; ``mesh`` is None for one process without torchrun. ``dp`` None:
    every process not used by tp. gloo on the CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dp is None:
        dp = max(1, world // tp)
    if dp * tp != world:
        raise OpenGemmaError(f"--dp {dp} x --tp {tp} = {dp * tp} processes, but {world} were started "
                             f"(torchrun --nproc-per-node {dp * tp})")
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world == 1:
        return None, dev
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    mesh = init_device_mesh(dev.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    return mesh, dev


def teardown() -> None:
    """Leave the process group (a barrier first: on gloo a rank that leaves early breaks the others)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def dp_info(mesh) -> tuple[object | None, int, int]:
    """(data-parallel process group or None, dp size, global rank)."""
    if mesh is None:
        return None, 1, 0
    dp_mesh = mesh["dp"]
    return (dp_mesh.get_group() if dp_mesh.size() > 1 else None), dp_mesh.size(), dist.get_rank()


def dp_rank(mesh) -> int:
    """This process's coordinate along dp (which share of each global batch it takes)."""
    return mesh["dp"].get_local_rank() if mesh is not None else 0


def check_tp(config, tp: int) -> None:
    """A config fits tp ranks when its query and key/value heads split evenly."""
    if tp > 1 and (config.n_heads % tp or config.n_kv_heads % tp):
        raise OpenGemmaError(f"model {config.name!r} has {config.n_heads} query and {config.n_kv_heads} key/value "
                             f"heads, which do not split over --tp {tp} (both must be multiples of it)")


# -- applying the transforms -----------------------------------------------------------------
CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module."  # what torch's checkpoint_wrapper adds to names


def plain_name(name: str) -> str:
    """A parameter or module name as the unwrapped model spells it (the state dict's own names)."""
    return name.replace(CHECKPOINT_WRAPPED, "")


def parallelize(model: nn.Module, mesh=None, *, dtype: str = "fp32", activation_checkpointing: bool = False,
                compile: bool = False) -> nn.Module:
    """Apply TP, activation checkpointing, compile and FSDP2 (in that order) to a GemmaModel in
    place, as ``mesh`` (from :func:`setup`) and the flags ask; returns the model."""
    tp = mesh["tp"].size() if mesh is not None else 1
    dp = mesh["dp"].size() if mesh is not None else 1
    if tp > 1:
        apply_tp(model, mesh["tp"])
        assert_tied(model)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
        assert_tied(model)
    if compile:
        for block in model.layers:
            block.compile()
    if dp > 1:
        apply_fsdp(model, mesh["dp"], dtype)
        assert_tied(model)
    return model


def apply_tp(model: nn.Module, tp_mesh) -> None:
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                                   parallelize_module)

    tp = tp_mesh.size()
    cfg = model.config
    check_tp(cfg, tp)
    local_cfg = cfg.replace(n_heads=cfg.n_heads // tp, n_kv_heads=cfg.n_kv_heads // tp)
    plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel()}
    if cfg.qk_norm:
        # Gemma 3's per-head norms see only this rank's heads (dim 1 of [B, H, T, D]): their weight
        # is a replicated DTensor whose gradient is summed over the tp ranks, as a sequence-parallel
        # norm's is over the sequence. A plain weight would get each rank's partial gradient.
        heads = SequenceParallel(sequence_dim=1, use_local_output=True)
        plan.update({"attn.q_norm": heads, "attn.k_norm": heads})
    for block in model.layers:
        parallelize_module(block, tp_mesh, plan)
        block.attn.config = local_cfg  # this rank's heads: the views in Attention.qkv use these counts


def apply_fsdp(model: nn.Module, dp_mesh, dtype: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bf16"
          else MixedPrecisionPolicy())
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)
    # The loss calls model.trunk and then the head, not model(): make trunk unshard the root's
    # parameters (embedding, final norm) as forward would. The root keeps them unsharded after
    # forward (FSDP2 does not reshard the root), so the head after trunk reads the full embedding.
    register_fsdp_forward_method(model, "trunk")


# -- what the loop asks of a (possibly) parallel model -----------------------------------------
def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP2: reduce-scatter gradients only on the last micro-batch of a step."""
    if is_fsdp(model):
        model.set_requires_gradient_sync(enabled)


def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters())
    return p.to_local().device if _is_dtensor(p) else p.device


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def mesh_key(t):
    """(mesh, placements) of a DTensor, None for a plain tensor: tensors with one key can share
    foreach kernels and one reduction."""
    return (t.device_mesh, tuple(t.placements)) if _is_dtensor(t) else None


def any_dtensor(params) -> bool:
    return any(_is_dtensor(p) for p in params)


def assert_tied(model: nn.Module) -> None:
    """The input embedding and the output head are one tensor: the model's registered
    ``embed.weight`` is the embedding module's weight, the head projects with that module
    (``embed.attend``), and no transform (``parallelize_module``, a wrapper, LoRA) has left a
    separate output-head weight (``lm_head`` / ``output`` / ``head``) or a second copy of it."""
    embed = getattr(model, "embed", None)
    if getattr(model, "config", None) is None or embed is None or not hasattr(embed, "weight"):
        return
    weight = embed.weight
    named = dict(model.named_parameters(remove_duplicate=False))
    if named.get("embed.weight") is not weight:
        raise AssertionError("the model's registered embed.weight is not the embedding module's weight")
    heads = [n for n, p in named.items() if n.split(".")[-2:-1] and n.split(".")[-2] in ("lm_head", "output", "head")
             and p is not weight]
    head = getattr(model, "lm_head", None)
    if head is not None and getattr(head, "weight", weight) is not weight:
        heads.append("lm_head.weight")
    if heads:
        raise AssertionError(f"the output head is no longer the embedding: separate parameter(s) {sorted(set(heads))}")
    if getattr(type(embed), "attend", None) is None:
        raise AssertionError("the embedding module has no attend(): the head would not be tied")


def scale_and_clip(params, scale: float, max_norm: float) -> float:
    """Multiply every gradient by ``scale``, then clip the global L2 norm to ``max_norm`` (0: no
    clipping); returns the norm before clipping. DTensor gradients (FSDP2/TP shards on different
    meshes) are reduced per mesh, so mixed 1-D and 2-D sharding works."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    for g in grads:
        g.mul_(scale)
    groups: dict = {}
    for g in grads:
        groups.setdefault(mesh_key(g), []).append(g)
    total = torch.zeros((), dtype=torch.float64)
    for key, gs in groups.items():
        local = [g.to_local() if key is not None else g for g in gs]
        sq = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in local]).square().sum()
        if key is not None:  # shards add up over the mesh dimensions they are split on; replicas do not
            mesh, placements = key
            for dim, placement in enumerate(placements):
                if not placement.is_replicate():  # Shard or FSDP x TP's _StridedShard
                    dist.all_reduce(sq, group=mesh.get_group(dim))
        total += sq.double().cpu()
    norm = float(total.sqrt())
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(coef)
    return norm
