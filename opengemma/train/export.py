"""``opengemma train export RUN DST``: a run's checkpoint as a model directory that
``opengemma generate/serve/eval --model DST`` load directly.

The checkpoint's DCP shards (written by any number of ranks) are read into a plain one-process
model rebuilt from ``RUN/run.json``, and written in opengemma's native format
(:mod:`opengemma.checkpoints.native`) or, with ``hf=True``, in Hugging Face layout
(:mod:`opengemma.checkpoints.hf`), each with the run's tokenizer. Runs whose weights are not a
plain Gemma model (``run.json`` kind ``lora`` or ``rm``) are exported by their own module's
``export_run(run_dir, run, checkpoint, dst, hf=..., dtype=...)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import OpenGemmaError
from .state import Checkpointer, load_model_weights

# Kinds exported by instruction tuning's modules (issue 17), by a plain lookup.
KIND_MODULES = {"lora": "lora", "rm": "reward", "draft": "draft_cli"}


def checkpoint_of(run_dir: Path, step: int | None) -> Path:
    ckpt = Checkpointer(run_dir)
    steps = ckpt.steps()
    if not steps:
        raise OpenGemmaError(f"{run_dir}: no complete checkpoint to export")
    if step is None:
        return ckpt.path(steps[-1])
    if step not in steps:
        raise OpenGemmaError(f"{run_dir}: no checkpoint at step {step} (have {', '.join(map(str, steps))})")
    return ckpt.path(step)


def export(run_dir, dst, *, hf: bool = False, step: int | None = None, dtype: str = "float32",
           force: bool = False) -> Path:
    from ..api import parse_dtype
    from ..checkpoints import hf as hf_ckpt
    from ..checkpoints import native
    from ..config import GemmaConfig
    from ..model import GemmaModel
    from .cli import read_run_json

    run_dir, dst = Path(run_dir), Path(dst)
    run = read_run_json(run_dir)
    path = checkpoint_of(run_dir, step)
    if dst.exists() and any(dst.iterdir() if dst.is_dir() else [True]) and not force:
        raise OpenGemmaError(f"{dst} already exists (use --force to write into it)")
    dt = parse_dtype(dtype, torch.device("cpu"))
    kind = run.get("kind", "pretrain")
    if kind in KIND_MODULES:
        import importlib

        module = importlib.import_module(f".{KIND_MODULES[kind]}", __package__)
        return module.export_run(run_dir, run, path, dst, hf=hf, dtype=dt)
    config = GemmaConfig.from_dict(run["model_config"])
    model = GemmaModel(config)
    load_model_weights(path, model)
    state = {k: v.detach().to(dt) for k, v in model.state_dict().items()}
    tok_file = run_dir / run.get("tokenizer", "tokenizer.model")
    tok_bytes = tok_file.read_bytes() if tok_file.is_file() else None
    (hf_ckpt.save if hf else native.save)(dst, config, state, tokenizer_model_bytes=tok_bytes)
    return dst
