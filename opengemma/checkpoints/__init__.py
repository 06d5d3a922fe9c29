"""Checkpoint formats: GGUF (llama.cpp), Hugging Face safetensors, and our own native format.

One module per format (``gguf``, ``hf``, ``native``), each with ``read_config(path)`` and
``load(path, dtype) -> (GemmaConfig, state_dict)`` in our model's names and the reference
(1 + w) RMSNorm convention; the caller does ``model.load_state_dict(sd, strict=True)``.
The config always comes from the file's own metadata, never from its name.

This file holds what the formats share: the expected names/shapes of a state dict, a strict
check of a loaded one (so a bad file is one clear error line, not a PyTorch traceback), atomic
file writes, and :func:`load` / :func:`read_config`, which pick the format from the file's
contents. Submodules are imported lazily, so importing this package is cheap.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

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


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Create ``path`` all-or-nothing: ``write(tmp)`` fills a temp file in the same directory,
    which is fsynced and renamed over ``path``; on any error the temp file is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; checkpoints are ordinary readable files
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


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


def _module(path):
    from . import gguf, hf, native
    return {"gguf": gguf, "hf": hf, "native": native}[detect_format(path)]


def read_config(path) -> GemmaConfig:
    """The config of a checkpoint in any supported format."""
    return _module(path).read_config(path)


def load(path, dtype: torch.dtype = torch.float32) -> tuple[GemmaConfig, dict[str, torch.Tensor]]:
    """Config and state dict of a checkpoint in any supported format."""
    return _module(path).load(path, dtype)


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
