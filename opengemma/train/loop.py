"""The one training loop: pretraining, SFT, LoRA, the reward model and RL all run :func:`fit`,
differing in their batch source, loss function and trainable parameters.

One optimizer step:

1. the :class:`BatchSource` hands this rank its micro-batches (the rank's share of the global
   batch; the source's position is part of every checkpoint);
2. for each micro-batch, ``loss_fn(model, batch)`` returns a :class:`LossOutput` (a SUM of
   per-unit losses and their count) and its sum is back-propagated; FSDP2 reduces gradients
   only on the last micro-batch;
3. the counts are all-reduced over the data-parallel ranks and every gradient is scaled by
   1 / (global count). Gradients are linear in the loss, so this is the loss normalised by the
   global count of supervised units before backward, exactly: neither accumulation nor the
   number of ranks changes the result, and a step (or micro-batch) without a supervised unit
   gives zero, not NaN;
4. the global gradient norm is clipped, AdamW steps at the schedule's learning rate, the tied
   embedding is checked to still be one tensor, and the step's record goes to the monitor.

Mixed precision: with ``dtype="bf16"`` the master weights, optimizer state and gradient
reductions stay fp32; compute runs in bf16 (FSDP2's parameter dtype when the model is sharded,
``torch.autocast`` otherwise). The batch source runs under the same autocast as the loss: RL
samples its rollouts and reference log-probs with the numerics the trainer then recomputes them
with. A non-finite loss or gradient norm stops the run before the
optimizer step, with the last good checkpoint untouched.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ..errors import OpenGemmaError
from . import parallel
from .config import RESUME_FIXED, TrainConfig
from .losses import LossOutput
from .metrics import Monitor
from .schedule import lr_at
from .state import Checkpointer, fault

__all__ = ["BatchSource", "FitResult", "LossFn", "LossOutput", "NonFiniteLoss", "fit", "make_optimizer"]


class BatchSource(Protocol):
    def next(self, model, step: int) -> list[Any]:
        """The micro-batches of THIS rank for optimizer step ``step`` (0-based)."""

    def state_dict(self) -> dict:
        """JSON-serialisable position; goes into checkpoints."""

    def load_state_dict(self, d: dict) -> None: ...


LossFn = Callable[[torch.nn.Module, Any], LossOutput]


class NonFiniteLoss(OpenGemmaError):
    """The loss or the gradient norm is NaN or infinite; the run stopped before the optimizer step."""


@dataclass
class FitResult:
    step: int  # optimizer steps done
    checkpoint: Path | None  # the last complete checkpoint
    record: dict  # the last step's metrics


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (norm scales and other vectors are not decayed); fused on
    accelerators, foreach (multi-tensor) on the CPU."""
    params = list(params)
    # One group per (decay, mesh): foreach kernels need tensors of one kind, and TP leaves plain
    # tensors (replicated norms, the embedding) next to DTensor shards on one or two meshes.
    groups: dict = {}
    for p in params:
        key = (p.ndim >= 2, parallel.mesh_key(p))
        groups.setdefault(key, []).append(p)
    groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0}
              for (decay, _), ps in groups.items()]
    if not groups:
        raise OpenGemmaError("nothing to train: no parameter requires a gradient")
    dev = params[0].device
    fused = dev.type == "cuda" and not parallel.any_dtensor(params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None,
                             foreach=None if fused else True)


def _as_tensor(x, device) -> torch.Tensor:
    return x.detach().to(device=device, dtype=torch.float64) if torch.is_tensor(x) else torch.tensor(
        float(x), dtype=torch.float64, device=device)


def _reduce(outs: list[LossOutput], device, group) -> tuple[float, float, dict[str, float]]:
    """(loss sum, count, metrics) summed over micro-batches and data-parallel ranks, in float64,
    one all-reduce for everything."""
    keys = sorted({k for o in outs for k in o.metrics})
    rows = [torch.stack([_as_tensor(o.loss_sum, device), _as_tensor(o.count, device)]
                        + [_as_tensor(o.metrics.get(k, 0.0), device) for k in keys]) for o in outs]
    total = torch.stack(rows).sum(0) if rows else torch.zeros(2 + len(keys), dtype=torch.float64, device=device)
    n = torch.tensor([float(len(outs))], dtype=torch.float64, device=device)
    total = torch.cat([total, n])
    if group is not None:
        dist.all_reduce(total, group=group)
    values = total.tolist()
    loss_sum, count, n_micro = values[0], values[1], values[-1]
    sums = dict(zip(keys, values[2:-1]))
    metrics = {}
    for k, v in sums.items():
        if k.endswith("_mean"):
            metrics[k.removesuffix("_mean")] = v / max(1.0, n_micro)
        elif k.endswith("_sum"):
            base = k.removesuffix("_sum")
            c = sums.get(base + "_count", 0.0)
            if c > 0:
                metrics[base] = v / c
        elif not k.endswith("_count"):
            metrics[k] = v / count if count > 0 else 0.0
    return loss_sum, count, metrics


def _check_resume(meta: dict, cfg: TrainConfig, model, path: Path) -> None:
    saved_cfg = meta.get("train", {})
    diffs = [f"{k} {saved_cfg.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUME_FIXED
             if k in saved_cfg and _plain(saved_cfg[k]) != _plain(getattr(cfg, k))]
    model_cfg = getattr(model, "config", None)
    saved_model = meta.get("model")
    if model_cfg is not None and isinstance(saved_model, dict):
        mine = model_cfg.to_dict()
        diffs += [f"model {k} {saved_model.get(k)!r} -> {mine[k]!r}" for k in mine
                  if k != "name" and _plain(saved_model.get(k)) != _plain(mine[k])]
    if diffs:
        raise OpenGemmaError(f"{path} does not match this run: " + "; ".join(diffs[:6]))


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def fit(model, source: BatchSource, loss_fn: LossFn, cfg: TrainConfig, run_dir, *, params=None, mesh=None,
        eval_fn=None, on_step=None, extra_state: dict | None = None, resume: bool = False,
        tokens_per_step: int | None = None, flops_per_token: float | None = None, peak_flops: float | None = None,
        meta: dict | None = None, progress: bool = True, banner: str | None = None) -> FitResult:
    """Train ``model`` (already parallelised by :func:`opengemma.train.parallel.parallelize`, or
    plain for one process) for ``cfg.max_steps`` optimizer steps.

    ``params``: the trainable parameters (None: every parameter that requires a gradient).
    ``eval_fn(model, step) -> dict``: every ``cfg.eval_every`` steps and at the end; numbers are
    logged with the step, strings (samples) go to samples.jsonl. ``on_step(model, step, record)``:
    after each optimizer step. ``extra_state``: {name: Stateful} saved with every checkpoint.
    ``resume``: continue from the run's last checkpoint. ``tokens_per_step`` (all ranks; default:
    the supervised count) drives tokens/s; ``flops_per_token`` with ``peak_flops`` (of one
    device) gives MFU. ``meta``: extra JSON for every checkpoint's meta.json. ``banner``: a line
    for the person watching, once the run has started (resumed) without error.
    """
    run_dir = Path(run_dir)
    dp_group, dp, rank = parallel.dp_info(mesh)
    world = dist.get_world_size() if dist.is_initialized() else 1
    cfg = cfg.resolved(dp)
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    device = parallel.device_of(model)
    optimizer = make_optimizer(params, cfg)
    ckpt = Checkpointer(run_dir, cfg.keep_last)
    ckpt.remove_partial()
    sharded = parallel.is_fsdp(model)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16" and not sharded
                else contextlib.nullcontext())
    base_meta = {**(meta or {}), "train": cfg.to_dict(), "world": world, "dp": dp}
    if getattr(model, "config", None) is not None and hasattr(model.config, "to_dict"):
        base_meta["model"] = model.config.to_dict()

    start, last_ckpt = 0, None
    if resume:
        last_ckpt = ckpt.latest()
        if last_ckpt is None:
            raise OpenGemmaError(f"{run_dir}: no complete checkpoint to resume from")
        _check_resume(ckpt.read_meta(last_ckpt), cfg, model, last_ckpt)
        saved = ckpt.load(last_ckpt, model, optimizer, extra_state, seed=cfg.seed)
        start = saved["step"]
        source.load_state_dict(saved["source"])
        tokens_seen = saved.get("tokens_seen", 0)
    else:
        if ckpt.steps():
            raise OpenGemmaError(f"{run_dir} already holds checkpoints: pass --resume to continue it, "
                                 "or choose a new output directory")
        tokens_seen = 0
    if start >= cfg.max_steps:
        raise OpenGemmaError(f"{run_dir} is already at step {start} (max steps {cfg.max_steps}): "
                             "raise --max-steps to train further")
    parallel.assert_tied(model)

    monitor = Monitor(run_dir, enabled=rank == 0, total_steps=cfg.max_steps, start_step=start,
                      log_every=cfg.log_every, progress=progress)
    if banner:
        monitor.write(banner)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    record: dict = {}
    model.train()
    try:
        for step in range(start, cfg.max_steps):
            t0 = time.perf_counter()
            lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                       max_steps=cfg.max_steps, schedule=cfg.schedule, decay_steps=cfg.decay_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            with autocast:  # RL's rollouts: sampled with the trainer's numerics
                batches = source.next(model, step)
            outs = []
            for i, batch in enumerate(batches):
                parallel.set_gradient_sync(model, i == len(batches) - 1)
                with autocast:
                    out = loss_fn(model, batch)
                out.loss_sum.backward()
                outs.append(LossOutput(out.loss_sum.detach(), out.count, out.metrics))
            loss_sum, count, extra = _reduce(outs, device, dp_group)
            loss = loss_sum / count if count > 0 else 0.0
            # FSDP2 averaged the gradients over the dp ranks; each rank's sum over its micro-batches
            # divided by the global count is the normalised loss's gradient.
            scale = (dp if sharded else 1) / max(count, 1.0)
            grad_norm = parallel.scale_and_clip(params, scale, cfg.grad_clip)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                raise NonFiniteLoss(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step "
                                    f"{step + 1} (loss {loss}, grad norm {grad_norm}): stopped before the "
                                    f"optimizer step; {where}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            parallel.assert_tied(model)
            dt = time.perf_counter() - t0
            step_tokens = tokens_per_step if tokens_per_step is not None else int(count)
            tokens_seen += step_tokens
            record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "count": int(count),
                      "tokens_seen": tokens_seen, "tokens_per_s": step_tokens / dt, "step_s": dt, **extra}
            if flops_per_token and peak_flops:
                record["mfu"] = step_tokens * flops_per_token / dt / (peak_flops * world)
            if eval_fn is not None and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0)
                                        or step + 1 == cfg.max_steps):
                model.eval()
                with torch.no_grad(), autocast:
                    record.update(eval_fn(model, step + 1))
                model.train()
            if on_step is not None:
                on_step(model, step + 1, record)
            monitor.log(record)
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.max_steps:
                last_ckpt = ckpt.save(step + 1, model, optimizer,
                                      {**base_meta, "source": source.state_dict(), "tokens_seen": tokens_seen},
                                      extra_state)
            fault("kill_after_step", step + 1)
    finally:
        monitor.close()
        torch.use_deterministic_algorithms(deterministic_before)
    return FitResult(step=cfg.max_steps, checkpoint=last_ckpt, record=record)
