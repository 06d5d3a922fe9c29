"""On-disk cache of converted weights, for a fast cold start (fast-inference issue, item 4).

Converting a GGUF (dequantizing, undoing llama.cpp's conventions, optionally re-quantizing for
the packed int8/int4 kernels) costs seconds; reading the result back costs milliseconds. The
cache keeps the model's final state dict as safetensors plus its config and tokenizer (its model
file and, for a fast start, its vocabulary as two arrays), keyed by
the SHA-256 of the source file's content and the conversion options. It is read back
memory-mapped: tensors are views of the page cache, copied only when written to
(copy-on-write), so start-up does not read 1 GB it may not yet need.

Hashing a 250 MB file takes about a second, so the hash of each (path, size, mtime) is itself
remembered in a small index; a changed file gets a new hash and so a new entry. Entries are
written atomically (temp directory + rename), so a killed conversion leaves nothing half-made.
Set ``OPENGEMMA_CACHE`` to move the cache, ``OPENGEMMA_NO_CACHE=1`` to turn it off.

Each entry is a gigabyte or so, so writing one says so on stderr (one line, once per entry), and
:func:`entries` / :func:`remove` / :func:`clear` back ``opengemma cache`` (list, with sizes and
what each entry was converted from, kept in ``entries.json``; clear).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from ..config import GemmaConfig
from ..errors import OpenGemmaError

# Bump when converted tensors would differ for the same source and options (2: least-squares int4
# grids; 3: entries also hold the tokenizer's vocabulary arrays, vocab.safetensors; 4: every tensor
# 64-byte aligned in the file, see _save_aligned).
FORMAT_VERSION = 4

_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.int16, "I8": np.int8, "U8": np.uint8,
              "I16": np.int16, "I32": np.int32, "I64": np.int64, "F64": np.float64, "BOOL": np.bool_}
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
              torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.float64: "F64", torch.bool: "BOOL"}
ALIGN = 64  # bytes: a cache line, and what torch's own allocator gives every tensor
PAD_PREFIX = "__pad"  # filler tensors between aligned tensors (the format allows no gaps)


def enabled() -> bool:
    return os.environ.get("OPENGEMMA_NO_CACHE", "") in ("", "0")


def base_dir() -> Path:
    """opengemma's own cache directory: ``$OPENGEMMA_CACHE``, else ``~/.cache/opengemma``."""
    return Path(os.environ.get("OPENGEMMA_CACHE") or Path.home() / ".cache" / "opengemma")


def cache_root() -> Path:
    return base_dir() / "converted"


def _read_index(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_index(file: Path, data: dict) -> None:
    """Replace a small JSON index atomically (a concurrent writer's version may win: both are valid)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.stem}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, file)


def remember(path: Path, what: str, compute: Callable[[], Any], root: Path | None = None) -> Any:
    """A fact about the file ``path`` (JSON-able), computed once per (path, size, mtime) and kept in
    ``ROOT/{what}.json``; recomputed, and not kept, where the cache cannot be written."""
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index = (root or cache_root()) / f"{what}.json"
    known = _read_index(index)
    if ident in known:
        return known[ident]
    known[ident] = compute()
    try:
        _write_index(index, known)
    except OSError:
        pass  # a read-only cache: computed again next time
    return known[ident]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _file_sha256(path: Path, root: Path) -> str:
    """Content hash of ``path``, remembered per (path, size, mtime) so it is computed once."""
    return remember(path, "hashes", lambda: _sha256(path), root)


def entry_dir(source: Path, **options) -> Path:
    """Where the converted form of ``source`` with these options lives (it may not exist yet)."""
    root = cache_root()
    key = json.dumps({"sha256": _file_sha256(source, root), "version": FORMAT_VERSION, **options}, sort_keys=True)
    entry = root / hashlib.sha256(key.encode()).hexdigest()[:32]
    # What the entry is, for `opengemma cache` (the key is a hash); written only when it changes.
    about = {"source": str(Path(source).resolve()), "options": {k: str(v) for k, v in options.items()}}
    index = root / "entries.json"
    described = _read_index(index)
    if described.get(entry.name) != about:
        try:
            _write_index(index, {**described, entry.name: about})
        except OSError:
            pass  # a read-only cache still serves hits
    return entry


def load_mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file as copy-on-write views of a memory map (no read up front).

    A tensor that is not :data:`ALIGN`-byte aligned in memory (a file not written by
    :func:`_save_aligned`) is copied: torch's packed int8 kernel reads its weight with aligned
    vector loads and faults (SIGSEGV) on a misaligned one, for more than one input row."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + header_len)
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or name.startswith(PAD_PREFIX):
            continue
        start, end = info["data_offsets"]
        array = data[start:end].view(_NP_DTYPES[info["dtype"]]).reshape(info["shape"])
        tensor = torch.from_numpy(array)
        tensor = tensor.view(torch.bfloat16) if info["dtype"] == "BF16" else tensor
        out[name] = tensor.clone() if tensor.data_ptr() % ALIGN else tensor
    return out


def _save_aligned(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file whose every tensor starts :data:`ALIGN` bytes into a page-aligned map
    (so memory-mapped views are aligned as torch's own tensors are): the header is padded with
    spaces (the format allows it) and gaps between tensors are filled by small uint8 tensors named
    ``__pad*`` (the format allows no unindexed bytes), which :func:`load_mmap_safetensors` skips.
    safetensors' own writer aligns to 8 bytes only."""
    header, layout, offset = {}, [], 0
    for i, (name, t) in enumerate(tensors.items()):
        gap = -offset % ALIGN
        if gap:
            header[f"{PAD_PREFIX}{i}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            layout.append(bytes(gap))
            offset += gap
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + raw.size]}
        layout.append(raw)
        offset += raw.size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        f.writelines(layout)  # bytes and contiguous uint8 arrays (buffer protocol)


def read(entry: Path) -> tuple[GemmaConfig, dict[str, torch.Tensor], bytes | None, dict] | None:
    """A cached conversion, or None when there is none (or it is unreadable: then it is rebuilt)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        config = GemmaConfig.from_dict(meta["config"])
        tensors = load_mmap_safetensors(entry / "model.safetensors")
        tok = entry / "tokenizer.model"
        return config, tensors, (tok.read_bytes() if tok.exists() else None), meta.get("extra", {})
    except Exception:  # a damaged entry is not the user's problem: convert again
        return None


def read_vocab(entry: Path) -> dict[str, np.ndarray] | None:
    """The tokenizer's vocabulary arrays stored with a conversion (``Tokenizer.vocab_arrays``), if any."""
    try:
        return load_numpy(str(entry / "vocab.safetensors"))
    except Exception:  # absent or damaged: the tokenizer asks sentencepiece instead
        return None


def write(entry: Path, config: GemmaConfig, state_dict: dict[str, torch.Tensor], tokenizer_bytes: bytes | None,
          extra: dict | None = None, vocab: dict[str, np.ndarray] | None = None) -> None:
    """Store a conversion atomically; failures (disk full, read-only home) only cost the cache."""
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        _save_aligned(state_dict, tmp / "model.safetensors")
        if tokenizer_bytes is not None:
            (tmp / "tokenizer.model").write_bytes(tokenizer_bytes)
        if vocab is not None:
            save_numpy(vocab, str(tmp / "vocab.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({"config": config.to_dict(), "extra": extra or {}}))
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        if entry.exists():  # a damaged entry (read() gave None): replace it
            shutil.rmtree(entry, ignore_errors=True)
        size = _size(tmp)
        os.replace(tmp, entry)
        tmp = None
        source = _read_index(entry.parent / "entries.json").get(entry.name, {}).get("source")
        print(f"opengemma: note: cached the converted weights{' of ' + Path(source).name if source else ''} "
              f"in {entry} ({human_size(size)}) for fast later starts; `opengemma cache` lists the cache, "
              "`opengemma cache clear --all` empties it", file=sys.stderr)
    except OSError:  # includes losing a race to another process: its entry is as good as ours
        pass
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# -- listing and clearing (`opengemma cache`) ----------------------------------------------------

@dataclass(frozen=True)
class CacheEntry:
    """One converted model in the cache: its directory, size in bytes, creation time (epoch
    seconds), what it was converted from (path or None when unknown), the options (dtype,
    quantization) and the model's config name."""

    path: Path
    size: int
    created: float
    source: str | None
    options: dict
    config_name: str | None

    @property
    def name(self) -> str:
        return self.path.name


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def entries() -> list[CacheEntry]:
    """The cache's complete entries, oldest first (half-written temp directories are not listed)."""
    root = cache_root()
    if not root.is_dir():
        return []
    about = _read_index(root / "entries.json")
    out = []
    for path in root.iterdir():
        if not path.is_dir() or path.name.startswith(".") or not (path / "meta.json").is_file():
            continue
        info = about.get(path.name, {})
        try:
            config_name = json.loads((path / "meta.json").read_text())["config"]["name"]
        except (OSError, ValueError, KeyError, TypeError):
            config_name = None
        try:
            out.append(CacheEntry(path, _size(path), path.stat().st_mtime, info.get("source"),
                                  info.get("options", {}), config_name))
        except OSError:  # removed meanwhile by another process
            continue
    return sorted(out, key=lambda e: e.created)


def find(prefix: str) -> CacheEntry | None:
    """The entry whose name starts with ``prefix`` (as `opengemma cache` shows it); None if none,
    ValueError if several do."""
    hits = [e for e in entries() if prefix and e.name.startswith(prefix)]
    if len(hits) > 1:
        raise ValueError(f"{prefix!r} matches {len(hits)} entries; give more of the name")
    return hits[0] if hits else None


def remove(entry: CacheEntry) -> None:
    """Delete one entry. Processes that have it memory-mapped keep their pages (unlinked files
    live on until unmapped)."""
    shutil.rmtree(entry.path, ignore_errors=True)
    index = entry.path.parent / "entries.json"
    about = _read_index(index)
    if about.pop(entry.name, None) is not None:
        _write_index(index, about)


def clear() -> tuple[int, int]:
    """Empty the cache (entries, leftovers of killed conversions, indexes): (entries, bytes) freed."""
    root = cache_root()
    listed = entries()
    if not root.is_dir():
        return 0, 0
    size = _size(root)
    for path in root.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(listed), size


# -- loading a GGUF through the cache ------------------------------------------------------------

# Marks an entry whose conversion checked every weight (checkpoints.check_finite): such an entry is
# trusted as it is, since its key is the SHA-256 of the source file's content -- the same bytes get
# the same verdict. Checking again at each start would read the whole memory-mapped entry (1.1 GB
# fp32 for the 270M) and undo the cache's fast cold start. An entry without the mark (written
# before the check existed) is converted again, once, which checks it.
CHECKED = "weights_checked"


def load_gguf(path: Path, *, dtype: torch.dtype, device: torch.device | str = "cpu", quantize: str | None = None):
    """(model, tokenizer) of a GGUF file through the cache: converted once (seconds), then
    memory-mapped. ``quantize`` ("int8" / "int4" / "mixed", CPU only) stores the packed weights; their
    layouts are torch's own, so that key includes the torch version."""
    from ..tokenizer import Tokenizer
    from . import load_weights, reader

    if quantize:
        entry = entry_dir(path, dtype=str(dtype), quantize=quantize, torch=torch.__version__)
    else:
        entry = entry_dir(path, dtype=str(dtype))
    hit = read(entry)
    if hit is not None and hit[2] is not None and hit[3].get(CHECKED) and (not quantize or "plan" in hit[3]):
        config, tensors, _, extra = hit
        try:
            tokenizer = Tokenizer.from_file(entry / "tokenizer.model", vocab=read_vocab(entry))
            if quantize:
                from ..quant import store

                return store.from_flat(config, tensors, extra["plan"]), tokenizer
            return load_weights(config, tensors, dtype=dtype, device=device), tokenizer
        except OpenGemmaError:
            pass  # a damaged entry: convert again (and replace it)
    tokenizer = Tokenizer.from_gguf(path)
    if quantize:
        from ..quant import gguf as quant_gguf
        from ..quant import store

        config, net = quant_gguf.quantized_from_gguf(path, quantize, dtype=dtype, device="cpu")
        tensors, plan = store.to_flat(net)
        extra = {"plan": plan}
    else:
        config, tensors = reader("gguf").load(path, dtype=dtype)
        net, extra = None, {}
    write(entry, config, tensors, tokenizer.model_bytes(), extra={**extra, CHECKED: True},
          vocab=tokenizer.vocab_arrays())
    return (net if quantize else load_weights(config, tensors, dtype=dtype, device=device)), tokenizer
