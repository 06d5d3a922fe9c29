"""Checkpoints of a training run with ``torch.distributed.checkpoint`` (DCP): atomic, resumable
exactly, reloadable on a different number of ranks.

A checkpoint is the directory ``RUN/checkpoints/step_N/`` holding

* DCP shards of the model and optimizer state (``get_state_dict``: sharded DTensors under FSDP2
  and TP, plain tensors in one process; DCP stores global shapes, so a 2-rank checkpoint loads
  on 1 rank and the other way round), plus any ``extra_state`` objects (``Stateful``: an EMA
  anchor, a value head, ...);
* ``rng/rank_R.pt``: each rank's torch RNG states (a rank that did not exist when saving is
  seeded from the run's seed and its rank);
* ``meta.json`` (written last): the step, the batch source's position (identical on every rank:
  each rank reads the one global stream), the training config, the model config and the mesh.

Only trainable weights are saved (``ignore_frozen_params``): a full run saves every weight, a LoRA
run only its adapters (and a reward head), a few MB instead of the frozen base, which ``--resume``
and export take from the base model again (``meta.json`` says ``"weights": "trainable"``; the run
records a fingerprint of the base so that export notices a different one).

Atomicity: every rank writes into ``.step_N.partial/``; after a barrier, rank 0 writes meta.json
and renames the directory to ``step_N`` (one ``rename``: a kill at any moment leaves either the
complete checkpoint or a ``.partial`` directory, which is ignored and removed by the next run).
Older checkpoints beyond ``keep_last`` are removed only after the new one is complete.

``OPENGEMMA_TRAIN_FAULT=kill_in_save:N`` SIGKILLs the process after the shards of step N are
written and before the rename (the kill-and-resume tests use it to hit the window exactly).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from ..atomic import atomic_write_bytes, fsync_dir
from ..errors import OpenGemmaError

# DCP reports a rank's failure as CheckpointException (a BaseException, not an Exception); the
# failures themselves are RuntimeError (a torn shard), KeyError and ValueError (another model), ...
_LOAD_ERRORS = (Exception, CheckpointException)
CHECKPOINTS = "checkpoints"
# Frozen parameters (a LoRA run's base) are not part of a checkpoint; loading fills exactly the
# trainable ones, which get_state_dict lists with the same option, so strict=False hides nothing.
_SAVE = StateDictOptions(ignore_frozen_params=True)
_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)
META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def fault(point: str, step: int) -> None:
    """Fault injection for the kill-and-resume tests: SIGKILL this process at ``point`` of ``step``
    when ``OPENGEMMA_TRAIN_FAULT`` says ``point:step``. Unset (always, outside tests): nothing."""
    if os.environ.get("OPENGEMMA_TRAIN_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns that it "assumes" one process even when told so (no_dist): silence that one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _one_line(e: BaseException) -> str:
    """DCP wraps every rank's traceback into its message: keep the first meaningful line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(("Traceback",
                                                                                                     "File "))]
    text = lines[-1] if lines else type(e).__name__
    return text[:300]


class Checkpointer:
    """Saves and loads a run's checkpoints under ``run_dir/checkpoints``; every rank calls
    :meth:`save` and :meth:`load` together (they hold collectives)."""

    def __init__(self, run_dir, keep_last: int = 2):
        self.root = Path(run_dir) / CHECKPOINTS
        self.keep_last = keep_last

    # -- listing ---------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Steps of the complete checkpoints (those with a meta.json), ascending."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / META).is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def path(self, step: int) -> Path:
        return self.root / f"step_{step}"

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def remove_partial(self) -> None:
        """Rank 0 removes what a killed save left behind."""
        if _rank() == 0 and self.root.is_dir():
            for p in self.root.glob(".step_*.partial"):
                shutil.rmtree(p, ignore_errors=True)
        _barrier()

    # -- save ------------------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, meta: dict, extra_state: dict | None = None) -> Path:
        final = self.path(step)
        tmp = self.root / f".step_{step}.partial"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_SAVE)
        state = {"model": model_sd, "optim": optim_sd}
        state.update({f"extra/{k}": v for k, v in (extra_state or {}).items()})
        weights = "trainable" if any(not p.requires_grad for p in model.parameters()) else "all"
        with _single_process_ok():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng, tmp / "rng" / f"rank_{_rank()}.pt")
        _barrier()
        fault("kill_in_save", step)
        if _rank() == 0:
            atomic_write_bytes(tmp / META, (json.dumps({**meta, "step": step, "weights": weights}, indent=1) + "\n").encode())
            if final.exists():  # a re-save of the same step (e.g. the end of a resumed run)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            for old in self.steps()[:-self.keep_last]:
                shutil.rmtree(self.path(old), ignore_errors=True)
        _barrier()
        return final

    # -- load ------------------------------------------------------------------------------------
    def read_meta(self, path: Path) -> dict:
        try:
            meta = json.loads((path / META).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise OpenGemmaError(f"{path}: unreadable checkpoint metadata ({_one_line(e)})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
            raise OpenGemmaError(f"{path / META}: not a training checkpoint's metadata")
        return meta

    def load(self, path: Path, model, optimizer, extra_state: dict | None = None, *, seed: int = 0) -> dict:
        """Restore model, optimizer, extra state and this rank's RNG from ``path``; returns its meta."""
        meta = self.read_meta(path)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_SAVE)
        state = {"model": model_sd, "optim": optim_sd}
        state.update({f"extra/{k}": v for k, v in (extra_state or {}).items()})
        try:
            with _single_process_ok():
                dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=_LOAD)
        except _LOAD_ERRORS as e:
            raise OpenGemmaError(f"{path}: corrupt checkpoint or one that does not match this model "
                                 f"({_one_line(e)})") from None
        rng_file = path / "rng" / f"rank_{_rank()}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:  # a rank count that differs from the saving run's
            torch.manual_seed(seed * 1000 + _rank() + meta["step"])
        return meta


def holds_all_weights(path: Path) -> bool:
    """Whether checkpoint ``path`` holds every weight (False: only the trainable ones, see above)."""
    return Checkpointer(Path(path).parent).read_meta(Path(path)).get("weights", "all") == "all"


def load_model_weights(path: Path, model) -> None:
    """The model weights of checkpoint ``path`` into a plain (unsharded, one-process) model: for
    export and sampling outside the run. A checkpoint of trainable weights only fills the
    parameters that require a gradient; the caller has loaded the frozen base before."""
    full = holds_all_weights(path)
    sd = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=not full))
    try:
        with _single_process_ok():
            dcp.load({"model": sd}, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except _LOAD_ERRORS as e:
        raise OpenGemmaError(f"{path}: corrupt checkpoint or one that does not match this model "
                             f"({_one_line(e)})") from None
    model.load_state_dict(sd, strict=full)


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The full, unsharded model state on the CPU (every rank calls it; gathering is collective),
    for periodic samples and export from a sharded model."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


