"""GGUF checkpoints: read llama.cpp's single-file format for Gemma 1, 2 and 3 text models.

Part of the checkpoint layer (the report ships weights; llama.cpp redistributes them as GGUF).
One module per format: a metadata -> :class:`GemmaConfig` map, a tensor name map, one named
tensor fix (:func:`_undo_norm_shift`), and the caller does ``model.load_state_dict(sd, strict=True)``.

The file layout (magic, version, tensor count, key/value metadata, tensor infos, aligned data)
is parsed here with ``struct`` over an ``mmap`` instead of with ``gguf.GGUFReader``: the reader
builds a numpy view per array element, which takes ~10 s for the 262k-entry tokenizer arrays of
a Gemma 3 file -- over three times the whole rest of loading the 270M model (~3 s); this parse
takes 0.1 s. The parse is checked field-by-field against
``GGUFReader`` in the tests. Dequantization is gguf-py's own ``gguf.quants.dequantize`` -- the
function transformers uses too -- so blocks decode bit-identically.

Conventions not stored in the metadata follow llama.cpp's loader (``llama-model.cpp``):
gemma: every layer global, queries scaled by head_dim**-0.5. gemma2: ``set_swa_pattern(2)``
(even layers local), window 4096 and soft-caps 50/30 when absent, query_pre_attn_scalar =
d_model/n_heads for the 46-layer 27B and head_dim otherwise. gemma3: sliding window only if
``attention.sliding_window`` > 0, then ``set_swa_pattern(6)`` and local RoPE base 10000; linear
RoPE scaling on global layers only; the 62-layer 27B uses d_model/n_heads like Gemma 2 27B.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize as _gguf_dequantize

from ..config import GLOBAL, LOCAL, GemmaConfig, layer_pattern
from ..errors import OpenGemmaError
from . import as_dtype, check_finite, check_state_dict, require_path

ARCHITECTURES = ("gemma", "gemma2", "gemma3")
_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}

_GLOBAL_NAMES = {"token_embd.weight": "embed.weight", "output_norm.weight": "final_norm.weight"}
# llama.cpp names inside ``blk.N.``. ``ffn_norm`` is the norm in front of the MLP in all three
# generations (Gemma 1's HF ``post_attention_layernorm``, Gemma 2/3's ``pre_feedforward_layernorm``).
_BLOCK_NAMES = {
    "attn_norm": "pre_attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj", "attn_output": "attn.o_proj", "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm", "post_attention_norm": "post_attn_norm", "ffn_norm": "pre_mlp_norm",
    "post_ffw_norm": "post_mlp_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class _Corrupt(Exception):
    """Internal: the byte stream does not parse; turned into one OpenGemmaError line."""


class _Unsupported(Exception):
    """Internal: well-formed, but uses something we cannot load; turned into an OpenGemmaError."""


@dataclass(frozen=True)
class TensorInfo:
    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # logical (PyTorch) order: GGUF's ne[] reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclass(frozen=True)
class Header:
    version: int
    metadata: dict[str, Any]  # string arrays are read as a length only (see _read_value)
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int


# -- low-level parse ------------------------------------------------------------------------------
class _Cursor:
    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise _Corrupt(f"truncated at byte {self.pos} (needs {n} more bytes)")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        start = self.take(n)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"invalid UTF-8 string at byte {start}") from None


_U64 = struct.Struct("<Q")


def _value_type(raw: int) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise _Corrupt(f"unknown metadata value type {raw}") from None


def _read_value(cur: _Cursor, vtype: GGUFValueType, strings: bool):
    if vtype in _SCALARS:
        return cur.scalar(_SCALARS[vtype])
    if vtype == GGUFValueType.STRING:
        return cur.string()
    if vtype == GGUFValueType.ARRAY:
        item_type, count = _value_type(cur.scalar("<I")), cur.scalar("<Q")
        if item_type in _SCALARS:
            dtype = np.dtype(_SCALARS[item_type].replace("?", "u1"))
            start = cur.take(count * dtype.itemsize)
            return np.frombuffer(cur.buf, dtype, count, start).copy()  # copy: outlives the mmap
        if item_type == GGUFValueType.STRING:
            if count > cur.size:  # every entry takes >= 8 bytes: a huge count is garbage
                raise _Corrupt(f"string array of {count} entries cannot fit in the file")
            if strings:
                return [cur.string() for _ in range(count)]
            # Tokenizer vocabularies are the bulk of the header; skip them, keep the length. The loop
            # is inlined (one unpack per entry, no method calls): the embedded model's header (262k
            # tokens) parses in ~0.035 s instead of ~0.4 s, on every start.
            buf, pos, size, unpack = cur.buf, cur.pos, cur.size, _U64.unpack_from
            for _ in range(count):
                if pos + 8 > size:
                    break
                pos += 8 + unpack(buf, pos)[0]
            else:
                if pos <= size:
                    cur.pos = pos
                    return _SkippedStrings(count)
            raise _Corrupt(f"truncated at byte {min(pos, size)} (a string array runs past the end of the file)")
        if count > cur.size:
            raise _Corrupt(f"nested array of {count} entries cannot fit in the file")
        return [_read_value(cur, item_type, strings) for _ in range(count)]
    raise _Corrupt(f"unknown metadata value type {vtype}")


class _SkippedStrings(int):
    """Length of a string array whose entries were not decoded (``read_header(strings=False)``)."""


def _parse(buf, size: int, strings: bool) -> Header:
    cur = _Cursor(buf, size)
    if size < 24 or bytes(buf[:4]) != _MAGIC:
        raise _Corrupt("not a GGUF file (bad magic)")
    cur.take(4)
    version = cur.scalar("<I")
    if version & 0xFFFF == 0 and version >> 16:
        raise _Corrupt("big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise _Corrupt(f"unsupported GGUF version {version}")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    if n_tensors > size or n_kv > size:
        raise _Corrupt(f"implausible counts ({n_tensors} tensors, {n_kv} keys)")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = _read_value(cur, _value_type(cur.scalar("<I")), strings)
    raw_infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions")
        ne = [cur.scalar("<Q") for _ in range(n_dims)]
        raw_infos.append((name, ne, cur.scalar("<I"), cur.scalar("<Q")))
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"invalid general.alignment {alignment!r}")
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = [_tensor_info(name, ne, raw_type, off, data_offset, size)
               for name, ne, raw_type, off in raw_infos]
    return Header(version, metadata, tensors, data_offset, size)


def _tensor_info(name: str, ne: list[int], raw_type: int, off: int, data_offset: int, size: int):
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise _Unsupported(f"unsupported quant type id {raw_type} (tensor {name})") from None
    block, type_size = GGML_QUANT_SIZES[qtype]
    if ne[0] % block:
        raise _Corrupt(f"tensor {name!r}: row of {ne[0]} values is not a whole number of {qtype.name} blocks")
    if not all(ne):
        raise _Corrupt(f"tensor {name!r} has an empty dimension")
    n_bytes = math.prod(ne) // block * type_size  # Python ints: a garbage shape cannot overflow
    start = data_offset + off
    if start + n_bytes > size:
        raise _Corrupt(f"tensor {name!r} data ends at byte {start + n_bytes}, past the end of the file")
    return TensorInfo(name, tuple(reversed(ne)), qtype, start, n_bytes)


class _Mapped:
    """A GGUF file mapped read-only, with its parsed header; closes both on exit."""

    def __init__(self, path, strings: bool = False):
        self.path = require_path(path)
        if self.path.is_dir():
            raise OpenGemmaError(f"{self.path}: is a directory, expected a .gguf file")
        self._file = open(self.path, "rb")
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size == 0:
                raise OpenGemmaError(f"{self.path}: corrupt or truncated GGUF file (empty file)")
            self.buf = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                self.header = _parse(self.buf, size, strings)
            except (_Corrupt, struct.error, OverflowError, ValueError) as e:
                raise OpenGemmaError(f"{self.path}: corrupt or truncated GGUF file ({e})") from None
            except _Unsupported as e:
                raise OpenGemmaError(f"{self.path}: {e}") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        buf = getattr(self, "buf", None)
        if buf is not None:
            try:
                buf.close()
            except BufferError:  # an in-flight exception's traceback still holds a view; GC closes it
                pass
        self._file.close()

    def __enter__(self) -> _Mapped:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_header(path, strings: bool = False) -> Header:
    """Metadata and tensor table of a GGUF file. ``strings=False`` skips string arrays' contents."""
    with _Mapped(path, strings) as m:
        return m.header


# -- config ---------------------------------------------------------------------------------------
def _f32(x, key: str) -> float:
    # GGUF stores floats as float32: 1e-6 comes back as 9.99999997e-07. The shortest decimal
    # that round-trips the float32 is what the converter was given (HF's config.json value).
    if isinstance(x, (bool, str, list, np.ndarray)) or not isinstance(x, (int, float, np.number)):
        raise OpenGemmaError(f"bad GGUF metadata: {key} must be a number, got {x!r}")
    return float(str(np.float32(x)))


def _uniform(value, key: str) -> int:
    """llama.cpp allows per-layer arrays for some counts; we need one value for all layers."""
    if isinstance(value, np.ndarray):
        if value.size == 0 or (value != value.flat[0]).any():
            raise OpenGemmaError(f"unsupported GGUF: per-layer values for {key} differ")
        value = value.flat[0]
    if isinstance(value, (bool, float, str, list)) or not isinstance(value, (int, np.integer)):
        raise OpenGemmaError(f"bad GGUF metadata: {key} must be an integer, got {value!r}")
    return int(value)


def _config(header: Header, path) -> GemmaConfig:
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch is None:
        raise OpenGemmaError(f"{path}: GGUF metadata has no general.architecture")
    if arch not in ARCHITECTURES:
        raise OpenGemmaError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    if _uniform(meta.get("split.count", 1), "split.count") > 1:
        raise OpenGemmaError(f"{path}: split GGUF files are not supported; merge them with llama-gguf-split")

    def get(key, default=...):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if default is ...:
            raise OpenGemmaError(f"{path}: GGUF metadata lacks required key {full}")
        return default

    d_model = _uniform(get("embedding_length"), "embedding_length")
    n_layers = _uniform(get("block_count"), "block_count")
    n_heads = _uniform(get("attention.head_count"), "attention.head_count")
    n_kv_heads = _uniform(get("attention.head_count_kv", n_heads), "attention.head_count_kv")
    head_dim = _uniform(get("attention.key_length", d_model // max(n_heads, 1)), "attention.key_length")
    embed = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    if embed is None or len(embed.shape) != 2:
        raise OpenGemmaError(f"{path}: GGUF file has no 2-D token_embd.weight tensor")

    rope_scale, scaling = 1.0, get("rope.scaling.type", "none")
    if scaling == "linear":
        rope_scale = _f32(get("rope.scaling.factor", 1.0), "rope.scaling.factor")
    elif scaling != "none":
        raise OpenGemmaError(f"{path}: unsupported RoPE scaling type {scaling!r} (only linear)")

    # Window, layer pattern, soft-caps and the query scale follow llama.cpp's per-arch defaults.
    window, n_pattern, local_base = None, None, None
    attn_cap, final_cap = None, None
    qpas = float(head_dim)
    if arch == "gemma2":
        window, n_pattern = _uniform(get("attention.sliding_window", 4096), "sliding_window"), 2
        attn_cap, final_cap = 50.0, 30.0
        if n_layers == 46:  # 27B: gemma_pytorch scales by d_model / n_heads, not head_dim
            qpas = float(d_model // max(n_heads, 1))
    elif arch == "gemma3":
        window = _uniform(get("attention.sliding_window", 0), "sliding_window") or None
        if window:  # llama.cpp hard-codes the local base; newer converters may also store it
            n_pattern, local_base = 6, _f32(get("rope.freq_base_swa", 10_000.0), "rope.freq_base_swa")
        if n_layers == 62:  # 27B, as above
            qpas = float(d_model // max(n_heads, 1))
    attn_cap = _f32(get("attn_logit_softcapping", attn_cap or 0.0), "attn_logit_softcapping") or None
    final_cap = _f32(get("final_logit_softcapping", final_cap or 0.0), "final_logit_softcapping") or None

    layer_types: tuple[str, ...] = ()
    if n_pattern is not None:
        pattern = get("attention.sliding_window_pattern", n_pattern)
        if isinstance(pattern, np.ndarray):  # per-layer booleans: True = sliding window
            if pattern.size != n_layers:
                raise OpenGemmaError(f"{path}: sliding_window_pattern has {pattern.size} entries for {n_layers} layers")
            layer_types = tuple(LOCAL if p else GLOBAL for p in pattern)
        else:
            n = _uniform(pattern, "attention.sliding_window_pattern")
            # llama.cpp set_swa_pattern(n): layer i is local iff n == 0 or i % n < n - 1.
            layer_types = (LOCAL,) * n_layers if n == 0 else layer_pattern(n_layers, n - 1)
    if LOCAL not in layer_types:
        window = local_base = None
    if rope_scale != 1.0 and arch == "gemma2":  # llama.cpp would scale local layers too; we cannot
        raise OpenGemmaError(f"{path}: RoPE scaling on a gemma2 model is not supported")

    name = meta.get("general.name")
    return GemmaConfig(
        name=name if isinstance(name, str) and name else os.path.basename(str(path)),
        vocab_size=embed.shape[0], d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv_heads, head_dim=head_dim,
        ffn_dim=_uniform(get("feed_forward_length"), "feed_forward_length"),
        query_pre_attn_scalar=qpas,
        context_length=_uniform(get("context_length"), "context_length"),
        norm_eps=_f32(get("attention.layer_norm_rms_epsilon"), "attention.layer_norm_rms_epsilon"),
        rope_base=_f32(get("rope.freq_base", 10_000.0), "rope.freq_base"), rope_local_base=local_base,
        rope_scale=rope_scale, layer_types=layer_types, sliding_window=window,
        attn_softcap=attn_cap, final_softcap=final_cap,
        sandwich_norms=arch != "gemma", qk_norm=arch == "gemma3")


def read_config(path) -> GemmaConfig:
    """The model config, from the GGUF metadata alone (no tensor data is read)."""
    return _config(read_header(path), path)


def tensor_types(path) -> dict[str, str]:
    """GGUF tensor name -> storage type name (``"Q4_K"``, ``"F32"``, ...), in file order."""
    return {t.name: t.qtype.name for t in read_header(path).tensors}


# -- tensors --------------------------------------------------------------------------------------
def our_name(gguf_name: str) -> str | None:
    """Our state-dict name for a GGUF tensor name; None if it has no counterpart."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight"
            and parts[2] in _BLOCK_NAMES):
        return f"layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}.weight"
    return None


def _check_qtypes(header: Header, path) -> None:
    for qtype in sorted({t.qtype for t in header.tensors}):
        type_size = GGML_QUANT_SIZES[qtype][1]
        try:  # decode one zero block: gguf-py raises NotImplementedError for unknown kinds
            _gguf_dequantize(np.zeros((1, type_size), np.uint8), qtype)
        except NotImplementedError:
            used = next(t.name for t in header.tensors if t.qtype == qtype)
            raise OpenGemmaError(f"{path}: unsupported quant type {qtype.name} (tensor {used})") from None


def dequantize(buf, info: TensorInfo) -> np.ndarray:
    """Float32 values of one tensor, shaped ``info.shape`` (a fresh array, not a view of ``buf``)."""
    raw = np.frombuffer(buf, np.uint8, info.n_bytes, info.offset)
    rows = raw.reshape(-1, info.n_bytes // max(1, int(np.prod(info.shape[:-1]))))
    with np.errstate(over="ignore", invalid="ignore"):  # corrupt scales: check_finite reports them
        values = _gguf_dequantize(rows, info.qtype)
    if np.shares_memory(values, raw):  # F32 comes back as a view into the mmap, closed after loading
        values = values.copy()
    return values.astype(np.float32, copy=False).reshape(info.shape)


def _undo_norm_shift(name: str, values: np.ndarray) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf.py adds 1 to every Gemma ``*norm.weight`` so that ggml can
    # multiply by the stored weight; we keep the reference's (1 + w) convention, so subtract it.
    # Done in float32 like transformers' Gemma2TensorProcessor, so results match it bit for bit.
    return values - np.float32(1.0) if name.endswith("norm.weight") else values


def load(path, dtype: torch.dtype = torch.float32) -> tuple[GemmaConfig, dict[str, torch.Tensor]]:
    """Config and dequantized state dict (our names, reference norm convention) of a GGUF file.
    Every tensor is checked to be finite and plausible (:func:`~opengemma.checkpoints.check_finite`)."""
    with _Mapped(path) as m:
        header, path = m.header, m.path
        config = _config(header, path)
        _check_qtypes(header, path)
        state: dict[str, torch.Tensor] = {}
        output = None
        for info in header.tensors:
            if info.name == "output.weight":  # an untied copy of the embedding, if stored at all
                output = info
                continue
            name = our_name(info.name)
            if name is None:
                raise OpenGemmaError(f"{path}: unexpected tensor {info.name!r} for a Gemma model")
            if name in state:
                raise OpenGemmaError(f"{path}: duplicate tensor {info.name!r}")
            values = torch.from_numpy(_undo_norm_shift(info.name, dequantize(m.buf, info)))
            check_finite(info.name, values, path)  # fp32, before a narrowing cast
            state[name] = values.to(as_dtype(dtype))
        if output is not None:
            tied = torch.from_numpy(dequantize(m.buf, output)).to(as_dtype(dtype))
            if "embed.weight" not in state or not torch.equal(tied, state["embed.weight"]):
                raise OpenGemmaError(f"{path}: output.weight differs from token_embd.weight; untied output "
                                     "embeddings are not supported")
    check_state_dict(config, state, path)
    return config, state
