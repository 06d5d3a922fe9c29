"""Weight-only quantized linear layers: int8 (per output channel, symmetric) and int4 (groups of 32, asymmetric).

Every ``nn.Linear`` becomes an :class:`Int8Linear` / :class:`Int4Linear` and the tied embedding a
:class:`QuantizedEmbedding` (``forward(ids)`` gathers and dequantizes only the looked-up rows,
``attend(h)`` is the quantized output projection). Norms stay in the activation dtype, so
``model.final_norm.weight.dtype`` still names the activation/cache dtype.

Kernels (PyTorch's own; measured with torch 2.13 on this 2-core CPU, 2 threads, batch 1):

* int8: ``aten._weight_int8pack_mm(x[M, K], w_int8[N, K], scales[N])`` = ``x @ (w * s[:, None]).T``
  (CPU and CUDA). On the CPU it is fast only with **bf16** activations and scales: the
  262144x640 head takes ~32 ms (bf16) vs 147 ms with fp32 activations and 86 ms for a dense fp32
  ``F.linear``; the 2048x640 MLP matmul 0.04 ms vs 0.43 ms (fp32 activations) vs ~0.1 ms dense bf16.
* int4: ``aten._convert_weight_to_int4pack_for_cpu(q_int32[N, K], innerKTiles)`` +
  ``aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros[K/group, N, 2])`` on the
  CPU; ``aten._convert_weight_to_int4pack(q_uint8[N, K/2], innerKTiles)`` +
  ``aten._weight_int4pack_mm`` on CUDA. Convention (verified numerically):
  ``w = (q - 8) * scale + zero`` with q in 0..15. On the CPU, fp32 activations take 305 ms for
  the head, bf16 ones 27 ms; so again bf16.

Hence on the CPU the packed kernels always run with bf16 activations (``compute_dtype``): an fp32
model casts each linear's input to bf16 and its output back to fp32. That rounds activations
(relative 2**-8) on top of the weight rounding; the measured effect is in the tests and the
report (int8 perplexity 18.66 vs fp32 18.95; see tests/test_quant.py).

Rows (issue 19, part C; bench/bench_quant_rows.py, bench/results/quant-rows-xeon.md). Both packed
kernels work on blocks of 4 input rows, unpacking the weight again for each: 2-4 rows cost
1.1-1.4x one row, 5-8 rows ~2x, 9 (a verification of 8 drafts) ~3x. Each output is its own dot
product, so a row's result does not depend on the call's other rows (bitwise, tests/test_quant.py):
a speculative verification gives plain decoding's numbers. Alternatives measured for 2-32 rows:

* dequantize on the fly + dense GEMM (``dense``): converting int8 to bf16 alone costs more than
  the packed kernel over 4 rows, so it pays only for many rows; the crossover per kind and
  activation dtype is ``DENSE_ROWS`` (int8: 24 rows in bf16, 32 in fp32; int4: 48 / 64), above
  which the weight is dequantized into the activation dtype (exact w.r.t. the stored weights up
  to one rounding to that dtype) in cache-sized tiles (:func:`tiled_matmul`) and multiplied with
  a dense GEMM (AMX on this CPU for bf16): the prefill route, and the fallback wherever no packed
  kernel exists (e.g. MPS, an int4 shape the kernel refuses).
* a bf16 copy of each weight kept next to the packed one: a bf16 GEMM hardly grows with rows and
  wins from 5 rows (9 rows: head 65 vs 145 ms, gate+up 0.7 vs 0.9 ms), but costs 2 bytes per
  weight (+535 MB for the 270M, more than its bf16 weights) and rounds every weight to bf16 (a
  verification would no longer match plain decoding bitwise); speculative decoding gained -2% to
  +10% with it (``mixed``, bf16, k = 8): not adopted.
* inductor's AMX weight-only GEMM (``torch.compile`` with max-autotune and freezing): 0.33 vs
  0.95 ms for gate+up over 8 rows, but it compiles per row count and freezes the weights into
  the graph: not adopted.

torchao is not used: everything it would call for these two schemes on CPU/CUDA is the same
pair of aten ops used here (its ``int4_weight_only`` / ``int8_weight_only`` layouts wrap
``_weight_int4pack_mm[_for_cpu]`` and ``_weight_int8pack_mm`` / a dequant matmul), it is not
installed, and its tensor-subclass API changes between releases; the extra dependency buys no
speed for weight-only decode.

Group size 32 for int4: it is the block size of GGUF's Q4_0 and of Q4_K's sub-blocks, so those
tensors load *directly* (no re-quantization); it is the most accurate choice; and the kernel is
no slower with it (head: 27 ms for 32 vs 35 ms for 64/128, within noise). Cost: bf16 scale+zero
per 32 weights = 1 extra bit per weight (5 bits/weight in all, Q4_0 has 4.5).

GGUF tensors load straight into these modules (:mod:`opengemma.quant.gguf`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from . import native

__all__ = [
    "MODES",
    "Int4Linear",
    "Int8Linear",
    "QuantizedEmbedding",
    "dense_rows",
    "tiled_matmul",
]

MODES = ("int8", "int4", "mixed")  # mixed: int8's weights, the head screened (:mod:`.head`)
DEFAULT_GROUP = 32
_CPU_BLOCK_N = 64  # the CPU int4pack layout: [N/64, K, 32] bytes, low nibble row j, high row 32+j
_CHUNK_ROWS = 8192  # rows quantized at once: bounds the temporaries for the 262144-row embedding
_WHOLE_BYTES = 8 << 20  # the dense route dequantizes a matrix whole up to this size...
_TILE_BYTES = 4 << 20  # ...and a larger one in tiles of about this size (tiled_matmul)


def dense_rows(module: nn.Module, act_dtype: torch.dtype) -> int:
    """The most input rows for which ``module`` (an :class:`Int8Linear` / :class:`Int4Linear`) uses
    its packed kernel; more rows take the dense route (dequantize + GEMM, :func:`tiled_matmul`).
    The crossover is the class's ``DENSE_ROWS`` for the activation dtype (measured, see there); a
    dtype not measured gets fp32's."""
    table = module.DENSE_ROWS
    return table.get(act_dtype, table[torch.float32])


def tiled_matmul(x2: torch.Tensor, N: int, weight_t) -> torch.Tensor:
    """``x2 [M, K] @ W.T`` -> [M, N] in x2's dtype, where ``weight_t(i, j)`` dequantizes ``W[i:j].T``
    ([K, j - i], x2's dtype; i a multiple of 64).

    A matrix of up to ``_WHOLE_BYTES`` (dequantized) is made whole: per-tile dispatch costs more
    than it saves there (4096x640 in bf16, 1 thread: 1.7 ms whole for 9 rows, 1.8-1.9 in 1-4 MB
    tiles; 4.3 vs 5.4 ms for 512 rows). A larger one goes in tiles of ~``_TILE_BYTES``, so that
    the temporary is one tile, not the matrix, and stays in the cache between its dequantizing
    and its GEMM: the 262144 x 640 int8 head, 16 rows, bf16: ~130-200 ms in tiles of 1-8 MB, 420
    ms dequantized whole (a 335 MB temporary); the int4 4096x640 in fp32 (10.5 MB), 512 rows:
    22 ms in 2-4 MB tiles, 40 ms whole. Inside a compiled graph: whole (no host loop to unroll).
    Busy machine, one thread: bench/results/quant-rows-xeon.md."""
    M, K = x2.shape
    rows = max(_CPU_BLOCK_N, _TILE_BYTES // (K * x2.element_size()) // _CPU_BLOCK_N * _CPU_BLOCK_N)
    if N * K * x2.element_size() <= _WHOLE_BYTES or torch.compiler.is_compiling():
        return x2 @ weight_t(0, N)  # [M, N]
    out = x2.new_empty(M, N)  # [M, N]
    for i in range(0, N, rows):
        j = min(i + rows, N)
        torch.matmul(x2, weight_t(i, j), out=out[:, i:j])
    return out


def _default_compute_dtype(device: torch.device, act_dtype: torch.dtype) -> torch.dtype:
    # Both the CPU and the CUDA packed kernels are fast (CUDA: only defined) for bf16 activations.
    if device.type in ("cpu", "cuda"):
        return torch.bfloat16
    return act_dtype


# -- int8 -----------------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16):
    """Per-output-channel symmetric int8: w ~ q * s[:, None], q in -127..127.

    The scale is rounded to ``scale_dtype`` *before* q is computed, so q is optimal for the
    scale actually stored. Returns (q int8 [N, K], s [N] in scale_dtype).
    """
    wf = w.float()
    lo, hi = torch.aminmax(wf, dim=1)
    s = (torch.maximum(-lo, hi) / 127.0).clamp_min(1e-12).to(scale_dtype)
    q = (wf * (1.0 / s.float())[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, s


class Int8Linear(nn.Module):
    """``y = x @ (q * s[:, None]).T`` with q int8 [out, in] and per-output-channel scales s."""

    # Packed kernel up to this many rows, dense route above (:func:`dense_rows`; quant-rows-xeon.md):
    # bf16, packed ahead at 16 rows, dense at 32 on every shape; fp32 (an fp32 GEMM) packed to 32.
    DENSE_ROWS: ClassVar[dict[torch.dtype, int]] = {torch.bfloat16: 24, torch.float32: 32}

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, *, act_dtype: torch.dtype,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.act_dtype = act_dtype
        self.compute_dtype = compute_dtype or _default_compute_dtype(qweight.device, act_dtype)
        self.packed_ok = qweight.device.type in ("cpu", "cuda")  # aten kernel exists; cleared on error
        self.native = False  # opengemma's int8 x int8 kernels for few rows (:func:`.native.use_native`)

    @classmethod
    def from_float(cls, weight: torch.Tensor, *, act_dtype=None, compute_dtype=None) -> Int8Linear:
        act_dtype = act_dtype or weight.dtype
        cd = compute_dtype or _default_compute_dtype(weight.device, act_dtype)
        N, K = weight.shape
        chunks = (quantize_int8(weight[i:i + _CHUNK_ROWS], cd) for i in range(0, N, _CHUNK_ROWS))
        return build_int8(chunks, N, K, act_dtype=act_dtype, compute_dtype=cd, device=weight.device)

    def dequantize(self, rows: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
        q, s = (self.qweight, self.scales) if rows is None else (self.qweight[rows], self.scales[rows])
        return q.to(dtype) * s.to(dtype)[..., None]

    def _matmul(self, x2: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``x2 [M, K] @ (q * s[:, None]).T`` -> [M, n] in x2's dtype, for all rows of this
        weight or a gathered subset of them (:meth:`columns`): one code path, so both give the
        same numbers. The route by row count: :func:`dense_rows`."""
        if self.packed_ok and x2.shape[0] <= dense_rows(self, x2.dtype):
            try:
                return self.packed(x2, q, s)
            except (RuntimeError, NotImplementedError):  # no kernel for this device/dtype
                self.packed_ok = False
        return self.dense(x2, q, s)

    def packed(self, x2: torch.Tensor, q: torch.Tensor | None = None, s: torch.Tensor | None = None) -> torch.Tensor:
        """The packed kernel (bf16 activations on the CPU; each output its own dot product)."""
        q, s = (self.qweight, self.scales) if q is None else (q, s)
        return torch.ops.aten._weight_int8pack_mm(x2.to(self.compute_dtype), q, s).to(x2.dtype)  # [M, n]

    def dense(self, x2: torch.Tensor, q: torch.Tensor | None = None, s: torch.Tensor | None = None) -> torch.Tensor:
        """Dequantize on the fly into x2's dtype, tile by tile (:func:`tiled_matmul`), and a dense
        GEMM. ``q * s`` is exact in fp32 (8-bit q, 8-bit bf16 scale); in bf16 it is rounded once."""
        q, s = (self.qweight, self.scales) if q is None else (q, s)
        dt = x2.dtype
        return tiled_matmul(x2, q.shape[0], lambda i, j: (q[i:j].to(dt) * s[i:j, None].to(dt)).t())  # [M, n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        y = native.forward(self, x2) if self.native else None
        if y is None:
            y = self._matmul(x2, self.qweight, self.scales)
        return y.reshape(*shape[:-1], self.out_features)

    def columns(self, x2: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``forward(x2)[m, idx[m, c]]`` for x2 [M, K] and output indices idx [M, C], reading only
        the rows named in ``idx`` (their union, once). On the packed kernel each output is its own
        dot product, so the values equal the full product's bitwise (tests/test_quant_head.py);
        on the dense fallback, up to the activation dtype's rounding."""
        if idx.shape[0] == 1:
            return self._matmul(x2, self.qweight[idx[0]], self.scales[idx[0]])  # [1, C]
        rows, inv = torch.unique(idx, return_inverse=True)  # [U], [M, C]
        return self._matmul(x2, self.qweight[rows], self.scales[rows]).gather(1, inv)  # [M, C]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"compute_dtype={self.compute_dtype}")


# -- int4 -----------------------------------------------------------------------------------------
def quantize_int4(w: torch.Tensor, group_size: int = DEFAULT_GROUP, scale_dtype: torch.dtype = torch.bfloat16,
                  *, search: bool = True):
    """Grouped asymmetric int4 in the kernels' convention ``w ~ (q - 8) * scale + zero``.

    Returns q (uint8 [N, K], 0..15), scale and zero ([N, K/group] in scale_dtype). Per group of
    ``group_size`` input columns, the min/max grid (scale = (max - min) / 15, zero = min + 8 * scale)
    is the starting point; with ``search`` (default) :func:`_int4_search` also tries narrower and
    wider grids, refits each by least squares, and every group keeps whichever of the two has the
    smaller squared error *after* scale and zero are rounded to ``scale_dtype``, so search is never
    worse than min/max for any group.
    """
    N, K = w.shape
    x = w.float().reshape(N, K // group_size, group_size)  # [N, G, group]
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)  # [N, G, 1]
    s0 = ((hi - lo) / 15.0).clamp_min(1e-12).to(scale_dtype)
    z0 = (lo + 8.0 * s0.float()).to(scale_dtype)
    q, err = _int4_round(x, s0, z0)
    s, z = s0, z0
    if search:
        s1, m1 = _int4_search(x, lo, hi)
        s1 = s1.clamp_min(1e-12).to(scale_dtype)
        z1 = (m1 + 8.0 * s1.float()).to(scale_dtype)
        q1, err1 = _int4_round(x, s1, z1)
        better = err1 < err  # [N, G, 1]
        q, s, z = torch.where(better, q1, q), torch.where(better, s1, s0), torch.where(better, z1, z0)
    return q.to(torch.uint8).reshape(N, K), s.squeeze(-1), z.squeeze(-1)


def _int4_round(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor):
    """(q as float [N, G, group], squared error per group [N, G, 1]) of x on the grid (s, z)."""
    sf, zf = s.float(), z.float()
    q = ((x - zf) / sf + 8.0).round_().clamp_(0, 15)
    return q, ((q - 8.0) * sf + zf - x).pow_(2).sum(-1, keepdim=True)


def _int4_search(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, steps: int = 10,
                 first: float = -1.0, delta: float = 0.2):
    """Least-squares (scale, min) per group, ``x ~ l * scale + min`` with l in 0..15.

    The idea of llama.cpp's ``make_qkx2_quants`` (k-quants): for grids of 15 + first + i*delta steps
    across [min, max], round x to levels l, fit scale and min to those levels in closed form, and keep
    the fit with the least squared error (also in closed form, from the same sums: no extra pass).
    Min/max rounding wastes levels on a group's outliers; on the embedded Gemma 3 270M, whose
    GGUF tensors are mostly 5- and 8-bit, this cuts int4's KL divergence from fp32 by a quarter
    (0.277 -> 0.204 nats/token over 3,069 tokens of the report; greedy top-1 agreement 72% -> 75%).
    Cost: ~11 sweeps over the weights, ~6 s for the 270M model on 2 cores (once: the converted
    model is cached).
    """
    n = x.shape[-1]
    rng = (hi - lo).clamp_min(1e-12)
    t = x - lo
    sx, sxx = x.sum(-1, keepdim=True), torch.linalg.vecdot(x, x).unsqueeze(-1)
    best_e, best_s, best_m = torch.full_like(sx, math.inf), rng / 15.0, lo.clone()
    lvl = torch.empty_like(x)
    for i in range(steps + 1):
        torch.mul(t, (15.0 + first + delta * i) / rng, out=lvl).round_().clamp_(0, 15)
        sl = lvl.sum(-1, keepdim=True)
        sll = torch.linalg.vecdot(lvl, lvl).unsqueeze(-1)
        sxl = torch.linalg.vecdot(lvl, x).unsqueeze(-1)
        det = n * sll - sl * sl  # 0 when every x got the same level: no fit
        s = (n * sxl - sx * sl) / det
        m = (sx - s * sl) / n
        # sum((s*l + m - x)^2) expanded; fp32 suffices: the error is ~1e-2 of sum(x^2), not 1e-7
        e = s * s * sll + 2 * s * m * sl - 2 * s * sxl + n * m * m - 2 * m * sx + sxx
        ok = (det > 0) & (s > 0) & (e < best_e)
        best_e, best_s, best_m = torch.where(ok, e, best_e), torch.where(ok, s, best_s), torch.where(ok, m, best_m)
    return best_s, best_m


def _pack_cpu(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] (0..15, N % 64 == 0) -> the CPU int4pack layout via torch's own converter."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)


def _unpack_cpu_rows(packed: torch.Tensor, rows: torch.Tensor, K: int) -> torch.Tensor:
    """q values (uint8 [len(rows), K]) of the given rows of a CPU-packed int4 weight.

    Layout (checked against the converter in the tests): ``packed.view(N/64, K, 32)[b, k, j]``
    holds row 64b + j in its low nibble and row 64b + 32 + j in its high nibble.
    """
    blocks = packed.view(-1, K, 32)
    j = rows % _CPU_BLOCK_N
    byte = blocks[rows // _CPU_BLOCK_N, :, j % 32]  # [R, K]
    shift = ((j >= 32).to(torch.uint8) * 4)[:, None]
    return (byte >> shift) & 15


def _pack_plain(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] -> [N, K/2]: even column in the high nibble (the CUDA converter's input)."""
    return (q[:, ::2] << 4 | q[:, 1::2]).contiguous()


def _unpack_plain(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)


class Int4Linear(nn.Module):
    """``y = x @ W.T`` with ``W = (q - 8) * scale + zero`` per group of ``group_size`` inputs.

    Storage by ``layout``: "cpu" (torch's CPU int4pack, [N, K/2] uint8, rows padded to 64),
    "cuda" (torch's CUDA tiled int4pack, int32) or "plain" ([N, K/2] uint8 nibble pairs: the
    dequantize-on-the-fly fallback). ``scales_and_zeros`` is [K/group, N, 2] in compute_dtype.
    ``keep_rows`` keeps a plain copy for row gathers where the packed layout cannot be indexed
    (CUDA); the CPU layout is gathered from directly. Build with :meth:`from_float`,
    :meth:`from_qsz` or :func:`build_int4` (row chunks: no full-size temporaries).
    """

    # As Int8Linear's, later: 4-bit weights cost ~2x as much to dequantize (bf16: packed ahead at
    # 32 rows, about even at 64; fp32: packed ahead at 64).
    DENSE_ROWS: ClassVar[dict[torch.dtype, int]] = {torch.bfloat16: 48, torch.float32: 64}

    def __init__(self, qweight, scales_and_zeros, out_features: int, in_features: int, group_size: int, *,
                 act_dtype: torch.dtype, compute_dtype: torch.dtype, layout: str, rows_plain=None):
        super().__init__()
        self.out_features, self.in_features, self.group_size = out_features, in_features, group_size
        self.act_dtype, self.compute_dtype, self.layout = act_dtype, compute_dtype, layout
        self.n_pad = -out_features % _CPU_BLOCK_N if layout == "cpu" else 0
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("rows_plain", rows_plain)
        self.packed_ok = layout != "plain"
        self.native = False  # opengemma's int8 x int8 kernels for few rows (:func:`.native.use_native`)

    @classmethod
    def from_qsz(cls, q, scale, zero, group_size: int, *, act_dtype, compute_dtype=None, keep_rows=False):
        return build_int4([(q, scale, zero)], q.shape[0], q.shape[1], group_size, act_dtype=act_dtype,
                          compute_dtype=compute_dtype, device=q.device, keep_rows=keep_rows)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = DEFAULT_GROUP, *, act_dtype=None,
                   compute_dtype=None, keep_rows: bool = False) -> Int4Linear:
        act_dtype = act_dtype or weight.dtype
        cd = compute_dtype or _default_compute_dtype(weight.device, act_dtype)
        N, K = weight.shape
        chunks = (quantize_int4(weight[i:i + _CHUNK_ROWS], group_size, cd) for i in range(0, N, _CHUNK_ROWS))
        return build_int4(chunks, N, K, group_size, act_dtype=act_dtype, compute_dtype=cd,
                          device=weight.device, keep_rows=keep_rows)

    def q_rows(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Unpacked q (uint8 0..15) of the given rows, or of all rows."""
        N, K = self.out_features, self.in_features
        if rows is None:
            rows = torch.arange(N, device=self.qweight.device)
        if self.layout == "cpu":
            return _unpack_cpu_rows(self.qweight, rows, K)
        if self.layout == "plain":
            return _unpack_plain(self.qweight[rows])
        if self.rows_plain is not None:
            return _unpack_plain(self.rows_plain[rows])
        raise RuntimeError("rows of a CUDA-packed int4 weight cannot be read back (keep_rows=False)")

    def dequantize(self, rows: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
        q = self.q_rows(rows)  # [R, K]
        sz = self.scales_and_zeros if rows is None else self.scales_and_zeros[:, rows]
        sz = sz.to(dtype)  # [K/g, R, 2]
        s = sz[..., 0].t().repeat_interleave(self.group_size, dim=1)  # [R, K]
        z = sz[..., 1].t().repeat_interleave(self.group_size, dim=1)
        if rows is None:
            s, z = s[:self.out_features], z[:self.out_features]
        return (q.to(dtype) - 8) * s + z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        y = native.forward(self, x2) if self.native else None
        if y is not None:
            return y.reshape(*shape[:-1], self.out_features)
        if self.packed_ok and (x2.shape[0] <= dense_rows(self, x.dtype) or self.layout == "cuda"):
            try:
                return self.packed(x2).reshape(*shape[:-1], self.out_features)
            except (RuntimeError, NotImplementedError):
                if self.layout == "cuda":
                    raise  # the CUDA layout has no fallback that can read it
                self.packed_ok = False
        return self.dense(x2).reshape(*shape[:-1], self.out_features)

    def packed(self, x2: torch.Tensor) -> torch.Tensor:
        """The packed kernel on x2 [M, K] (bf16 activations on the CPU) -> [M, N] in x2's dtype."""
        xc = x2.to(self.compute_dtype)
        if self.layout == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.qweight, self.group_size, self.scales_and_zeros)
        else:  # CUDA, UNTESTED here (no GPU)
            y = torch.ops.aten._weight_int4pack_mm(xc, self.qweight, self.group_size, self.scales_and_zeros)
        return (y[:, :self.out_features] if self.n_pad else y).to(x2.dtype)

    def dense(self, x2: torch.Tensor) -> torch.Tensor:
        """Dequantize on the fly into x2's dtype, tile by tile (:func:`tiled_matmul`), and a dense GEMM."""
        dt = x2.dtype
        if self.layout == "cpu":
            return tiled_matmul(x2, self.out_features, lambda i, j: self._dense_tile_t(i, j, dt))
        dev = self.qweight.device
        return tiled_matmul(x2, self.out_features, lambda i, j: self.dequantize(torch.arange(i, j, device=dev), dt).t())

    def dequantize_t(self, dtype=torch.float32) -> torch.Tensor:
        """The whole weight, transposed ([K, N], a view of a contiguous [K, N_pad] buffer)."""
        return self._dense_tile_t(0, self.out_features, dtype)

    def _dense_tile_t(self, i: int, j: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows i..j-1 (i a multiple of 64), transposed ([K, j - i]), from the CPU layout in three
        vectorized passes: ``[N/64, K, 32]`` bytes hold rows 64b+j / 64b+32+j in their low / high
        nibbles, so writing the two nibble planes into ``[K, N/64, 2, 32]`` is the transpose with
        32-byte runs (a 512-token 270M prefill: 250 ms of dequantizing via :meth:`dequantize` ->
        ~50 ms). The planes are written straight in ``dtype`` (q <= 15 is exact there), so the
        multiply-add runs on one dtype: 25% faster than on uint8 q (4096x640, bf16: 1.3 vs 1.7 ms)."""
        K, g, B = self.in_features, self.group_size, _CPU_BLOCK_N
        b0, b1 = i // B, -(-j // B)
        blocks = self.qweight.view(-1, K, 32)[b0:b1].permute(1, 0, 2)  # [K, nb, 32]
        q = torch.empty(K, b1 - b0, 2, 32, dtype=dtype, device=blocks.device)
        q[:, :, 0] = blocks & 15
        q[:, :, 1] = blocks >> 4
        s, zz = self._dense_scales(dtype)  # [K/g, N_pad] each
        if b1 - b0 < s.shape[1] // B:  # a tile: its columns, contiguous (see _dense_scales)
            s, zz = s[:, b0 * B:b1 * B].contiguous(), zz[:, b0 * B:b1 * B].contiguous()
        w = torch.addcmul(zz[:, None, :], q.view(K // g, g, -1), s[:, None, :])  # [K/g, g, nb * 64]
        return w.view(K, -1)[:, :j - i]  # [K, j - i]

    def _dense_scales(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, z - 8 s)``, each [K/g, N_pad] contiguous in ``dtype``, for :meth:`_dense_tile_t`.

        w = (q - 8) * s + z = q * s + (z - 8 s): one fused multiply-add per weight. z - 8s is
        formed in fp32 and rounded once. Kept after the first prefill (in bf16: a quarter of the
        packed weight's bytes, 12.5 MB for the 270M's layers), keyed by the scale tensor so that
        moving the module invalidates them; contiguous because a strided operand takes addcmul
        off its vectorized path (5x slower)."""
        # No host-side cache inside a compiled graph (data_ptr() would break it).
        key = None if torch.compiler.is_compiling() else (dtype, self.scales_and_zeros.data_ptr())
        cached = self.__dict__.get("_dense_sz")
        if key is not None and cached is not None and cached[0] == key:
            return cached[1], cached[2]
        sz = self.scales_and_zeros.float()  # [K/g, N_pad, 2]
        s = sz[..., 0].to(dtype).contiguous()  # [K/g, N_pad]
        zz = (sz[..., 1] - 8 * sz[..., 0]).to(dtype)  # [K/g, N_pad]
        if key is not None:
            self.__dict__["_dense_sz"] = (key, s, zz)
        return s, zz

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"layout={self.layout}, compute_dtype={self.compute_dtype}")


def build_int4(chunks, N: int, K: int, group_size: int, *, act_dtype, compute_dtype=None, device="cpu",
               layout: str | None = None, keep_rows: bool = False) -> Int4Linear:
    """An :class:`Int4Linear` from consecutive row chunks ``(q uint8 [n, K], scale, zero [n, K/g])``.

    Each chunk is packed as it arrives (the CPU layout packs 64-row blocks independently), so the
    only full-size buffers are the packed result and its scales (chunks must be multiples of 64
    rows, except the last).
    """
    dev = torch.device(device)
    cd = compute_dtype or _default_compute_dtype(dev, act_dtype)
    if layout is None:
        layout = {"cpu": "cpu", "cuda": "cuda"}.get(dev.type, "plain")
        if layout == "cuda" and (K % 128 or N % 8 or group_size not in (32, 64, 128, 256)):
            layout = "plain"
    n_pad = -N % _CPU_BLOCK_N if layout == "cpu" else 0
    sz = torch.empty(K // group_size, N + n_pad, 2, dtype=cd, device=dev)
    sz[:, N:] = 0
    store = torch.empty(N + n_pad, K // 2, dtype=torch.uint8, device=dev)
    i = 0
    for q, scale, zero in chunks:
        n = q.shape[0]
        sz[:, i:i + n, 0] = scale.t()
        sz[:, i:i + n, 1] = zero.t()
        if layout == "cpu":
            if i + n == N and n_pad:
                q = torch.cat([q, q.new_full((n_pad, K), 8)])
            store[i:i + q.shape[0]] = _pack_cpu(q)
        else:
            store[i:i + n] = _pack_plain(q)
        i += n
    if i != N:
        raise ValueError(f"int4 chunks cover {i} rows, expected {N}")
    rows_plain = None
    if layout == "cuda":  # UNTESTED here (no GPU): torch >= 2.5 converts uint8 [N, K/2] nibble pairs
        packed = torch.ops.aten._convert_weight_to_int4pack(store, 8)
        rows_plain = store if keep_rows else None
        store = packed
    return Int4Linear(store, sz, N, K, group_size, act_dtype=act_dtype, compute_dtype=cd, layout=layout,
                      rows_plain=rows_plain)


def build_int8(chunks, N: int, K: int, *, act_dtype, compute_dtype, device="cpu") -> Int8Linear:
    """An :class:`Int8Linear` from consecutive row chunks ``(q int8 [n, K], s [n])``."""
    qw = torch.empty(N, K, dtype=torch.int8, device=device)
    sc = torch.empty(N, dtype=compute_dtype, device=device)
    i = 0
    for q, s in chunks:
        qw[i:i + len(q)], sc[i:i + len(q)] = q, s
        i += len(q)
    if i != N:
        raise ValueError(f"int8 chunks cover {i} rows, expected {N}")
    return Int8Linear(qw, sc, act_dtype=act_dtype, compute_dtype=compute_dtype)


# -- embedding ------------------------------------------------------------------------------------
class QuantizedEmbedding(nn.Module):
    """The tied embedding over a quantized matrix: ``forward(ids)`` dequantizes only the rows
    looked up (in the activation dtype); ``attend(h)`` is the quantized output projection."""

    def __init__(self, inner: Int8Linear | Int4Linear):
        super().__init__()
        self.inner = inner
        self.num_embeddings, self.embedding_dim = inner.out_features, inner.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.inner.dequantize(ids.reshape(-1), dtype=self.inner.act_dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        return self.inner(h)

    @property
    def weight(self) -> torch.Tensor:
        """The *stored* (packed integer) matrix: for ``.device`` queries only, not float values."""
        return self.inner.qweight
