"""Checkpoint formats: GGUF (llama.cpp), Hugging Face safetensors, and our own native format.

One module per format (``gguf``, ``hf``, ``native``), each with ``read_config(path)`` and
``load(path, dtype) -> (GemmaConfig, state_dict)`` in our model's names and the reference
(1 + w) RMSNorm convention; the caller does ``model.load_state_dict(sd, strict=True)``.
The config always comes from the file's own metadata, never from its name.

This file holds what the formats share: the expected names/shapes of a state dict, a strict
check of a loaded one (so a bad file is one clear error line, not a PyTorch traceback), the
check that every loaded value is finite and plausible (:func:`check_finite`: corrupt tensor data
is refused at load, not discovered as NaN logits), atomic file writes, :func:`load_weights` (a state dict into a model), and :func:`load` /
:func:`read_config`, which pick the format from the file's contents (:func:`detect_format`,
:func:`reader`: the one dispatch on formats). What a ``--model`` argument names (file, directory,
preset, hub id or the embedded model) and which tokenizer goes with it is :mod:`.resolve`; the
converted-weight cache is :mod:`.cache`. Submodules are imported lazily, so importing this package
is cheap.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from ..atomic import atomic_write, atomic_write_bytes  # noqa: F401 (re-exported)
from ..config import GemmaConfig
from ..errors import OpenGemmaError

FORMATS = ("gguf", "hf", "native")


def require_path(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise OpenGemmaError(f"no such file or directory: {path}")
    return path


def read_json_object(path: Path) -> dict:
    """A JSON object from ``path`` (a checkpoint's config.json), or one clear error line."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OpenGemmaError(f"{Path(path).parent}: no {Path(path).name}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OpenGemmaError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise OpenGemmaError(f"{path}: expected a JSON object")
    return data


def as_dtype(dtype) -> torch.dtype:
    """A torch dtype from a dtype or its name ("float32", "bfloat16", "torch.float16", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise OpenGemmaError(f"unsupported dtype {dtype!r} (use float32, bfloat16 or float16)")
    return value


@functools.lru_cache(maxsize=16)
def expected_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict name of a model with this config, and its shape (from a meta-device model,
    so the model module stays the one place that defines the names)."""
    from ..model import build_model

    return {name: tuple(t.shape) for name, t in build_model(config, device="meta").state_dict().items()}


def check_state_dict(config: GemmaConfig, state: dict[str, torch.Tensor], source) -> None:
    """Raise one OpenGemmaError line unless ``state`` has exactly the expected names and shapes."""
    want = expected_shapes(config)

    def listing(names):
        names = sorted(names)
        return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")

    if missing := set(want) - set(state):
        raise OpenGemmaError(f"{source}: checkpoint lacks tensor(s) {listing(missing)}")
    if extra := set(state) - set(want):
        raise OpenGemmaError(f"{source}: checkpoint has unexpected tensor(s) {listing(extra)}")
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise OpenGemmaError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}, "
                                 f"the config implies {shape}")


# -- corrupt weights ------------------------------------------------------------------------------
# GGUF and safetensors carry no checksum, so flipped bytes in the tensor data load "fine" unless
# the values themselves give them away. Two signs do: a non-finite value (an fp16 block scale whose
# exponent bits became all ones), and a finite but absurd magnitude (a scale whose exponent grew:
# a Q5_0 block with d = 600 instead of 0.006). Measured on the embedded Gemma 3 270M after
# dequantization: matrices (embedding, projections) stay below 1.6 in magnitude, norm weights below
# 1,656 (post_mlp_norm; (1 + w) convention). 2,000 random byte flips in the file's last 50 MB
# gave 0-5 tensors with non-finite values and 10-18 matrices beyond 1e4 (up to 4e7) per seed,
# 12 seeds. The limits sit far above any real weight (6,000x and 600x the measured maxima) so
# that no genuine checkpoint is refused; corruption that stays below them is not detectable from
# the values (it shows as non-finite logits at worst, which generation reports).
MATRIX_LIMIT = 1e4
VECTOR_LIMIT = 1e6


def weight_limit(shape) -> float:
    """The largest |w| accepted in a tensor of this shape (see MATRIX_LIMIT / VECTOR_LIMIT)."""
    return MATRIX_LIMIT if len(shape) >= 2 else VECTOR_LIMIT


def check_finite(name: str, values: torch.Tensor, source, *, limit: float | None = None,
                 what: str = "values") -> None:
    """Raise one OpenGemmaError line if ``values`` holds a NaN/inf or an entry beyond ``limit``.

    One pass in the common case: the 2-norm bounds every |w| from above and is NaN/inf when any
    entry is, so a tensor whose norm is within the limit is accepted without a second look (one
    vectorized reduction with fp32 accumulation: ~85 ms for the 270M's 268M values, fp32 or bf16,
    on 2 cores; asking for an fp32 result is 10x slower on bf16). Only a tensor that fails it
    (large legitimate ones too, e.g. norm weights in the hundreds) is looked at entry by entry.
    """
    if not values.is_floating_point() or values.numel() == 0:
        return
    limit = weight_limit(values.shape) if limit is None else limit
    # An fp16 result would overflow at 65,504 (and send big tensors down the slow path): fp32.
    norm = torch.linalg.vector_norm(values, dtype=torch.float32 if values.dtype == torch.float16 else None)
    if norm <= 0.99 * limit:  # NaN compares False; 1% margin: a bf16 result is rounded (2**-8)
        return
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        noun = what if bad > 1 else what.removesuffix("s")
        raise OpenGemmaError(f"{source}: tensor {name} has {bad:,} non-finite {noun}: the file is corrupt")
    peak = float(values.abs().amax())
    if peak > limit:
        raise OpenGemmaError(f"{source}: tensor {name} has {what} up to {peak:.3g} in magnitude (Gemma weights "
                             f"stay far below {limit:.0e}): the file is corrupt")


def checked_cast(name: str, values: torch.Tensor, dtype: torch.dtype, source) -> torch.Tensor:
    """``values`` in ``dtype``, after :func:`check_finite` on the wider of the two: a widening cast is
    exact (so checking its fp32 result is the same check, and fp32 is the fast case), while a
    narrowing one could turn a corrupt value into something else."""
    out = values.to(dtype)
    check_finite(name, out if out.element_size() >= values.element_size() else values, source)
    return out


def detect_format(path) -> str:
    """"gguf", "hf" or "native", from the file's magic bytes or the directory's config.json."""
    path = require_path(path)
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return "gguf"
        raise OpenGemmaError(f"{path}: not a GGUF file and not a checkpoint directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise OpenGemmaError(f"{path}: checkpoint directory has no config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OpenGemmaError(f"{config_file}: unreadable JSON ({e})") from None
    if not isinstance(config, dict):
        raise OpenGemmaError(f"{config_file}: expected a JSON object")
    return "native" if config.get("format") == "opengemma" else "hf"  # see native.is_native


def reader(kind: str):
    """The module that reads one format: the one dispatch on format names. The GGUF reader is
    imported on first use: it imports the ``gguf`` package (~45 ms of every start-up), which a load
    served by the converted-weight cache never needs."""
    if kind not in FORMATS:
        raise ValueError(f"unknown checkpoint format {kind!r}")
    import importlib

    return importlib.import_module(f".{kind}", __name__)


def read_config(path) -> GemmaConfig:
    """The config of a checkpoint in any supported format."""
    return reader(detect_format(path)).read_config(path)


def load(path, dtype: torch.dtype = torch.float32) -> tuple[GemmaConfig, dict[str, torch.Tensor]]:
    """Config and state dict of a checkpoint in any supported format."""
    return reader(detect_format(path)).load(path, dtype)


def tokenizer_file(path) -> Path | None:
    """The ``tokenizer.model`` saved next to a directory checkpoint, if there is one."""
    path = Path(path)
    candidate = path / "tokenizer.model" if path.is_dir() else None
    return candidate if candidate is not None and candidate.is_file() else None


def load_weights(config: GemmaConfig, state_dict: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
    """A :class:`~opengemma.model.GemmaModel` built on ``meta`` that adopts the checkpoint's tensors:
    strict (names and shapes checked first, one clear line on a mismatch), no random init, no
    copies beyond the dtype/device conversion. In eval mode."""
    from ..model import build_model

    check_state_dict(config, state_dict, "checkpoint")
    model = build_model(config, device="meta")
    sd = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()
