"""opengemma's native checkpoint format: a directory we write and read without any translation.

Part of the checkpoint layer. Layout::

    model.safetensors   our state dict, our names, reference (1 + w) RMSNorm convention
    config.json         GemmaConfig.to_dict() plus {"format": "opengemma", "format_version": 1}
    tokenizer.model     optional: the SentencePiece model proto, byte for byte

Unlike GGUF (llama.cpp's conventions) and HF (transformers' names and defaults), nothing here
is inferred: the config is exactly the dataclass, and the tensors are exactly what the model's
``state_dict()`` holds (in whatever dtype they were saved; ``load`` casts to the asked dtype).
Every file is written atomically, config.json last, so a directory whose config.json exists
has complete weights next to it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import GemmaConfig
from ..errors import OpenGemmaError
from . import (as_dtype, atomic_write, atomic_write_bytes, check_state_dict, checked_cast, read_json_object,
               require_path)

FORMAT = "opengemma"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"


def _config_json(path: Path) -> dict:
    path = require_path(path)
    if not path.is_dir():
        raise OpenGemmaError(f"{path}: expected an opengemma checkpoint directory")
    file = path / CONFIG
    data = read_json_object(file)
    if data.get("format") != FORMAT:
        raise OpenGemmaError(f"{file}: not an opengemma checkpoint (no \"format\": \"{FORMAT}\")")
    if data.get("format_version") != FORMAT_VERSION:
        raise OpenGemmaError(f"{file}: unsupported opengemma format_version {data.get('format_version')!r} "
                             f"(this version reads {FORMAT_VERSION})")
    return data


def is_native(path) -> bool:
    """Whether ``path`` is a directory whose config.json carries our format marker."""
    try:
        data = json.loads((Path(path) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def read_config(path) -> GemmaConfig:
    """The config stored in an opengemma checkpoint directory."""
    data = _config_json(Path(path))
    fields = {k: v for k, v in data.items() if k not in ("format", "format_version")}
    try:
        return GemmaConfig.from_dict(fields)
    except OpenGemmaError as e:
        raise OpenGemmaError(f"{Path(path) / CONFIG}: {e}") from None


def load(path, dtype: torch.dtype = torch.float32) -> tuple[GemmaConfig, dict[str, torch.Tensor]]:
    """Config and state dict of an opengemma checkpoint directory; every tensor is checked to be
    finite and plausible (:func:`~opengemma.checkpoints.check_finite`)."""
    config = read_config(path)
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise OpenGemmaError(f"{path}: no {WEIGHTS}")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise OpenGemmaError(f"{weights}: corrupt or unreadable safetensors file ({e})") from None
    check_state_dict(config, state, path)
    dtype = as_dtype(dtype)
    return config, {k: checked_cast(k, v, dtype, weights) for k, v in state.items()}


def save(path, config: GemmaConfig, state_dict: dict[str, torch.Tensor],
         tokenizer_model_bytes: bytes | None = None) -> None:
    """Write ``config`` and ``state_dict`` (and the tokenizer proto, if given) to directory ``path``."""
    check_state_dict(config, state_dict, "state dict to save")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    if tokenizer_model_bytes is not None:
        atomic_write_bytes(path / TOKENIZER, bytes(tokenizer_model_bytes))
    data = {**config.to_dict(), "format": FORMAT, "format_version": FORMAT_VERSION}
    atomic_write_bytes(path / CONFIG, (json.dumps(data, indent=2) + "\n").encode())
