"""GGUF weights straight into the quantized modules of :mod:`opengemma.quant.linear`, without a float
copy of the model (fast-inference issue, item 1: "load GGUF weights straight into the matching
quantized form where the GGUF is already quantized").

* Q4_0 (``w = d * (q - 8)``): scale = d, zero = 0. Exact with fp32 scales; with bf16 scales
  (the CPU kernel's), scale is d (fp16) rounded to bf16: relative error <= 2**-8 of d, i.e.
  <= 8 * 2**-8 = 1/32 of a quantization step per weight.
* Q4_K (``w = d*sc * q - dmin*m`` per 32-value sub-block): scale = d*sc, zero = 8*scale - dmin*m.
  Exact up to one fp32 rounding of the zero with fp32 scales; with bf16 scale and zero the error
  is <= 8 * 2**-8 * scale + 2**-8 * |zero| (a few percent of a step; re-quantizing from fp32
  would cost up to half a step).
* Q8_0 (int8 blocks of 32, one fp16 scale per block) has no exact per-channel int8 form (the
  block scales differ along a row), and Q5_0 / Q6_K have more than 4 bits: these tensors are
  dequantized one tensor at a time (in row chunks) and re-quantized to the requested mode
  (int4: least-squares grids per group, :func:`opengemma.quant.linear.quantize_int4`).
  Q8_0 -> per-channel int8 adds at most half a per-row step (|row|max / 254) to each weight.
* In ``int8`` mode, Q4_0 / Q4_K tensors are still loaded as exact int4 (``int4_exact=True``):
  re-quantizing a 4-bit tensor to 8 bits per channel would only add error and bytes.
* In ``int4`` mode every linear weight becomes 4-bit, also those the file keeps wider. Measured
  alternative (embedded 270M, bf16 activations, 1,024 tokens of the report): keeping its Q5_0 /
  Q6_K / Q8_0 linear weights (q, k, gate, up, half of v and down) as per-channel int8 brings
  perplexity from 16.39 to 14.02 (bf16: 13.60) but decode from 20.3 to 24.7 ms per token: at
  batch 1 the weights stream from memory, and int8 reads twice the bytes. Only Q6_K / Q8_0 as
  int8: 15.65. Whoever wants the file's precision has ``int8`` mode (13.65), or ``mixed`` (the
  same weights; the head read through a 4-bit screen when decoding, :mod:`opengemma.quant.head`).
  Q5_0 (q, k, gate, up and half of v here) has no 4-bit form without that loss, so both keep it
  8-bit.

Corrupt tensor data is refused here as in the float loader
(:func:`opengemma.checkpoints.check_finite`), on the values each module is built from: the float
row chunks of re-quantized tensors, and for the exact int4 ones their scales and zeros (a 4-bit
q is always finite, so w is bounded by ``max(|z - 8 s|, |z + 7 s|)`` per group), which is also
far less to read than the weights.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..checkpoints import MATRIX_LIMIT, check_finite
from .linear import (
    _CHUNK_ROWS,
    DEFAULT_GROUP,
    Int4Linear,
    QuantizedEmbedding,
    _default_compute_dtype,
    build_int4,
    build_int8,
    quantize_int4,
    quantize_int8,
)
from .rewrite import check_mode, fuse_projections

__all__ = ["direct_int4", "quantized_from_gguf"]


def _gguf_q4_0(raw: np.ndarray, N: int, K: int):
    """Q4_0 rows [N, K/32*18] -> (q uint8 [N, K], scale, zero float32 [N, K/32]); w = d * (q - 8)."""
    blocks = raw.reshape(N, K // 32, 18)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(N, K)  # first 16 low, last 16 high
    return torch.from_numpy(q), torch.from_numpy(d), torch.zeros(N, K // 32)


def _gguf_q4_k(raw: np.ndarray, N: int, K: int):
    """Q4_K rows -> (q, scale, zero) with w = d*sc*q - dmin*m = (q - 8) * scale + zero."""
    from gguf.quants import Q4_K

    nb = K // 256
    blocks = raw.reshape(N * nb, 144)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [B, 1]
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])  # [B, 8] each, 6-bit
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(N, K)
    with np.errstate(over="ignore", invalid="ignore"):  # corrupt d/dmin: the caller reports them
        scale = d * sc.astype(np.float32)  # exact in fp32 (11-bit x 6-bit)
        zero = 8.0 * scale - dmin * m.astype(np.float32)
    return (torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(scale.reshape(N, K // 32)),
            torch.from_numpy(zero.astype(np.float32).reshape(N, K // 32)))


_DIRECT_INT4 = {"Q4_0": _gguf_q4_0, "Q4_K": _gguf_q4_k}


def _group_extent(mod: Int4Linear) -> torch.Tensor:
    """The largest |w| each group of an int4 module can hold, [K/g, N]: w = (q - 8) * s + z with
    q in 0..15 is extreme at q = 0 or q = 15; NaN/inf where a scale or zero is."""
    sz = mod.scales_and_zeros[:, :mod.out_features].float()  # [K/g, N, 2]; padding rows are 0
    s, z = sz[..., 0], sz[..., 1]
    return torch.maximum((z - 8 * s).abs(), (z + 7 * s).abs())


def _q8_0_chunks(raw: np.ndarray, N: int, K: int, chunk: int):
    """Float32 rows of a Q8_0 tensor (w = d * q per block of 32), in torch: ~10x gguf-py's numpy."""
    for i in range(0, N, chunk):
        blk = torch.from_numpy(np.array(raw[i:i + chunk], copy=True)).view(-1, K // 32, 34)
        d = blk[..., :2].contiguous().view(torch.float16).float()  # [n, K/32, 1]
        q = blk[..., 2:].contiguous().view(torch.int8)
        yield (q.float() * d).reshape(-1, K)


def _gguf_py_chunks(raw: np.ndarray, qtype, N: int, K: int, chunk: int):
    """Float32 rows of any other GGUF tensor, via gguf-py's dequantization."""
    from gguf.quants import dequantize as gguf_dequantize

    for i in range(0, N, chunk):
        with np.errstate(over="ignore", invalid="ignore"):  # corrupt scales: _float_chunks reports them
            vals = gguf_dequantize(raw[i:i + chunk], qtype)
        yield torch.from_numpy(np.array(vals, dtype=np.float32, copy=True).reshape(-1, K))


def _float_chunks(buf, info, source, chunk: int = _CHUNK_ROWS):
    """Float32 rows of one GGUF tensor, chunk by chunk (never the whole tensor at once), each
    checked to be finite and plausible before it is quantized."""
    N, K = info.shape
    raw = np.frombuffer(buf, np.uint8, info.n_bytes, info.offset).reshape(N, -1)
    if info.qtype.name == "Q8_0":
        chunks = _q8_0_chunks(raw, N, K, chunk)
    else:
        chunks = _gguf_py_chunks(raw, info.qtype, N, K, chunk)
    for c in chunks:
        check_finite(info.name, c, source, limit=MATRIX_LIMIT)
        yield c


def direct_int4(buf, info, *, act_dtype=torch.float32, compute_dtype=None, device="cpu",
                keep_rows=False, chunk: int = _CHUNK_ROWS) -> Int4Linear:
    """An :class:`Int4Linear` (group 32) straight from a Q4_0 / Q4_K GGUF tensor's blocks."""
    N, K = info.shape
    raw = np.frombuffer(buf, np.uint8, info.n_bytes, info.offset).reshape(N, -1)
    fn = _DIRECT_INT4[info.qtype.name]
    dev = torch.device(device)
    chunks = ((t.to(dev) for t in fn(raw[i:i + chunk], min(chunk, N - i), K)) for i in range(0, N, chunk))
    return build_int4((tuple(c) for c in chunks), N, K, DEFAULT_GROUP, act_dtype=act_dtype,
                      compute_dtype=compute_dtype, device=dev, keep_rows=keep_rows)


def _from_gguf_tensor(buf, info, mode, group_size, act_dtype, compute_dtype, device, embedding, int4_exact,
                      source):
    """Quantized module for one 2-D GGUF weight: direct where exact, else dequantize + quantize."""
    direct = info.qtype.name in _DIRECT_INT4 and (mode == "int4" or int4_exact) and group_size == 32
    if direct:
        mod = direct_int4(buf, info, act_dtype=act_dtype, compute_dtype=compute_dtype, device=device,
                          keep_rows=embedding)
        check_finite(info.name, _group_extent(mod), source, limit=MATRIX_LIMIT, what="quantized blocks")
        return mod
    dev = torch.device(device)
    cd = compute_dtype or _default_compute_dtype(dev, act_dtype)
    N, K = info.shape
    if mode == "int8" or K % group_size:
        chunks = (quantize_int8(c.to(dev), cd) for c in _float_chunks(buf, info, source))
        return build_int8(chunks, N, K, act_dtype=act_dtype, compute_dtype=cd, device=dev)
    chunks = (quantize_int4(c.to(dev), group_size, cd) for c in _float_chunks(buf, info, source))
    return build_int4(chunks, N, K, group_size, act_dtype=act_dtype, compute_dtype=cd, device=dev,
                      keep_rows=embedding)


def quantized_from_gguf(path, mode: str, *, dtype: torch.dtype = torch.float32, device="cpu",
                        group_size: int = DEFAULT_GROUP, compute_dtype: torch.dtype | None = None,
                        int4_exact: bool = True, fuse: bool = True):
    """(config, model) of a GGUF file with its weights loaded straight into quantized modules.

    Q4_0 / Q4_K tensors become exact int4 (group 32) in every mode (``int4_exact``); the other
    weights are dequantized one at a time, in row chunks, and quantized to ``mode`` (``mixed``:
    to int8, then the 8-bit head gets its 4-bit screen, :mod:`opengemma.quant.head`). Norms are
    loaded in ``dtype`` (the activation dtype). Peak memory: the quantized model plus one chunk.
    ``fuse`` stacks q/k/v and gate/up where they got the same kind (:func:`fuse_projections`).
    """
    check_mode(mode)
    screened, mode = mode == "mixed", ("int8" if mode == "mixed" else mode)
    from ..checkpoints import gguf as g
    from ..errors import OpenGemmaError
    from ..model import build_model

    dev = torch.device(device)
    with g._Mapped(path) as m:
        header, path = m.header, m.path
        config = g._config(header, path)
        g._check_qtypes(header, path)
        model = build_model(config, device="meta")
        seen: set[str] = set()
        output = None
        # The embedding last: re-quantizing it is most of an int4 conversion (~10 s of ~12 s for the
        # 270M's Q8_0 one), so a file corrupt anywhere else is refused before that is spent.
        for info in sorted(header.tensors, key=lambda t: t.name == "token_embd.weight"):
            if info.name == "output.weight":
                output = info
                continue
            name = g.our_name(info.name)
            if name is None:
                raise OpenGemmaError(f"{path}: unexpected tensor {info.name!r} for a Gemma model")
            if name in seen:
                raise OpenGemmaError(f"{path}: duplicate tensor {info.name!r}")
            seen.add(name)
            mod_name = name.rsplit(".", 1)[0]
            try:
                mod = model.get_submodule(mod_name)
            except AttributeError:
                raise OpenGemmaError(f"{path}: tensor {info.name!r} does not fit the model") from None
            expected = tuple(mod.weight.shape)
            if tuple(info.shape) != expected:
                raise OpenGemmaError(f"{path}: {info.name} has shape {tuple(info.shape)}, expected {expected}")
            parent_name, _, attr = mod_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if isinstance(mod, nn.Linear) or mod_name == "embed":
                emb = mod_name == "embed"
                new = _from_gguf_tensor(m.buf, info, mode, group_size, dtype, compute_dtype, dev, emb, int4_exact,
                                        path)
                setattr(parent, attr, QuantizedEmbedding(new) if emb else new)
            else:  # norms: float, in the activation dtype
                vals = torch.from_numpy(g._undo_norm_shift(info.name, g.dequantize(m.buf, info)))
                check_finite(info.name, vals, path)
                mod.weight = nn.Parameter(vals.to(device=dev, dtype=dtype), requires_grad=False)
        if output is not None:  # an untied copy of the embedding: accept only a byte-identical one
            emb = next(t for t in header.tensors if t.name == "token_embd.weight")
            same = (output.qtype == emb.qtype and output.n_bytes == emb.n_bytes
                    and m.buf[output.offset:output.offset + output.n_bytes]
                    == m.buf[emb.offset:emb.offset + emb.n_bytes])
            if not same:
                raise OpenGemmaError(f"{path}: output.weight differs from token_embd.weight; untied output "
                                     "embeddings are not supported")
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
            if p is not None and p.is_meta]
    if left:
        raise OpenGemmaError(f"{path}: GGUF file lacks {len(left)} tensors, e.g. {left[0]}")
    if screened:
        from .head import screen_head

        screen_head(model)
    return config, (fuse_projections(model) if fuse else model).eval()
