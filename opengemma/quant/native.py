"""opengemma's own int8 x int8 CPU kernels for decoding (``kernels.c``): built at first use, called via ctypes.

Why by hand (issue 19; measured: ``bench/bench_native.py`` -> ``bench/results/native-kernels-epyc.md``,
one layer at a time; ``bench/results/cpu-native-epyc.md``, whole decode steps against llama.cpp):
at batch 1 a decode step streams every weight once, so the linear layers should run at memory
speed. PyTorch's weight-only kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``)
widen each weight to fp32 and multiply in fp32: they are compute-bound at 6-8 GB/s per thread on
this class of CPU, and nothing else PyTorch ships is faster at one row (``torch._int_mm``, oneDNN's
``qlinear_pointwise``, fbgemm's dynamic linear: see ``int8-decode-profile.md``). llama.cpp instead
quantizes the activations to 8 bits per block of 32 and multiplies int8 by int8 (VNNI). These
kernels do the same on the modules' own buffers (no copy of any weight):

* int8 weights (:class:`~.linear.Int8Linear`, per-row scale), row-major;
* int4 weights (:class:`~.linear.Int4Linear`, groups of 32) in PyTorch's CPU int4pack layout,
  gathered into VNNI's 4-byte lanes with a byte permute.

On an AMD EPYC (Zen 4), one bf16 row: 1.5-3.6x PyTorch's kernels per layer, the 262,144 x 640
head 2.6-2.9x (int4 4.4 ms, 24 GB/s at two threads, the memory's speed); the embedded 270M's
plain decode in ``mixed`` + bf16 15.4 -> 24.0 tok/s (0.42x -> 0.65x llama.cpp in the same run).
The same library also runs a decode step's whole transformer block (``block.c``,
:mod:`.native_block`), which removes the PyTorch glue between these linears.

What changes numerically: each linear's input is rounded to int8 per block of 32 (relative error
up to 1/254 of the block's largest value) instead of to bf16 (2**-9 of each value). Outputs are
exact dot products of those values (int32 within a block). A row's result does not depend on the
call's other rows (bitwise). (A whole verification forward still differs from one-token steps at
rounding level: the attention's matmuls round differently for more rows; README, "Native kernels".)
Rows: the int8 kernel redoes its per-row work, so at 4-16 rows it is about even with PyTorch's
(gate+up, 16 rows: 1.3 vs 1.5 ms); the int4 one stays ahead (the head, 16 rows: 35 vs 111 ms).
The exact parts of ``mixed`` mode stay on PyTorch's kernel: the screened head's re-scoring of its
candidates (:mod:`.head`), bulk scoring (more than :data:`MAX_ROWS` rows), and everything under
``torch.compile`` or autograd.

Requirements: x86-64 with AVX-512 F/BW/VL/DQ, VNNI and VBMI (Intel Ice Lake and later server
parts, AMD Zen 4 and later), Linux, and a C compiler (``$CC`` or ``cc``/``gcc``) with OpenMP.
The library is compiled once (~1.5 s) into ``<opengemma cache>/kernels/`` under a name derived
from the source and the flags, written atomically; later processes just load it. Without any of
these, :func:`library` returns None with the reason in :func:`unavailable_reason`, and the
modules keep PyTorch's kernels. The threads are OpenMP's, sharing PyTorch's runtime (the same
``libgomp.so.1``), so ``torch.set_num_threads`` governs both.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import nn

__all__ = ["MAX_ROWS", "available", "forward", "library", "linear_q4", "linear_q8", "unavailable_reason", "use_native",
           "weight_args"]

SOURCES = tuple(Path(__file__).with_name(f) for f in ("kernels.h", "kernels.c", "block.c"))
MAX_ROWS = 16  # input rows per call (kernels.c MAX_M): decode steps, verifications, a server's decode batch
ABI = 2
FLAGS = ("-O3", "-fno-math-errno", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
         "-mavx512vnni", "-mavx512vbmi", "-mfma")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512vbmi")
_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
_lock = threading.Lock()
_loaded: dict[str, object] = {}  # "lib": the CDLL or None, "why": the reason when None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def _build(cc: str, out: Path) -> None:
    """Compile the sources into ``out`` atomically (a temporary name in the same directory, then a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, *(str(p) for p in SOURCES if p.suffix == ".c"), "-o", tmp], capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise OSError((r.stderr.strip().splitlines() or ["compiler failed"])[-1])
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("OPENGEMMA_NATIVE", "1") == "0":
        return None, "disabled by OPENGEMMA_NATIVE=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"needs Linux on x86-64 (this is {platform.system()} on {platform.machine()})"
    missing = [f for f in CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return None, f"this CPU lacks {', '.join(missing)}"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set $CC)"
    from ..checkpoints import cache  # noqa: PLC0415  (only when a kernel is first wanted)
    src = b"".join(p.read_bytes() for p in SOURCES)
    tag = hashlib.sha256(src + repr((FLAGS, cc, platform.machine())).encode()).hexdigest()[:16]
    path = cache.base_dir() / "kernels" / f"opengemma-kernels-{tag}.so"
    try:
        if not path.exists():
            try:
                _build(cc, path)
            except PermissionError:  # a read-only cache: build for this process only
                path = Path(tempfile.mkdtemp(prefix="opengemma-kernels-")) / path.name
                _build(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"could not build the kernels: {e}"
    if lib.og_abi_version() != ABI:
        return None, f"kernel library {path} has another ABI version"
    lib.og_linear_q8.argtypes = [_P, _I, _L, _I, _I, _P, _L, _P, _I, _P, _L, _I]
    lib.og_linear_q4.argtypes = [_P, _I, _L, _I, _I, _P, _P, _I, _L, _P, _L, _I]
    lib.og_block_decode.argtypes = [_P, _P, _P, _I, _I, _I, _P, _P, _P, _P, _L, _L, _L, _P, _P, _I]
    return lib, None


def library() -> ctypes.CDLL | None:
    """The kernel library, built and loaded on the first call (per process); None if unavailable."""
    if "lib" not in _loaded:
        with _lock:
            if "lib" not in _loaded:
                _loaded["lib"], _loaded["why"] = _load()
    return _loaded["lib"]  # type: ignore[return-value]


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str | None:
    library()
    return _loaded["why"]  # type: ignore[return-value]


def _out(x2: torch.Tensor, N: int) -> torch.Tensor:
    return torch.empty(x2.shape[0], N, dtype=x2.dtype)


def forward(mod, x2: torch.Tensor) -> torch.Tensor | None:
    """``mod(x2)`` through these kernels when the call fits them (at most :data:`MAX_ROWS` rows on
    the CPU, eager, no autograd), else None (the module then uses PyTorch's kernel)."""
    if (x2.shape[0] > MAX_ROWS or x2.device.type != "cpu" or torch.compiler.is_compiling()
            or (x2.requires_grad and torch.is_grad_enabled())):
        return None
    return linear_q8(mod, x2) if hasattr(mod, "scales") else linear_q4(mod, x2)


def weight_args(mod) -> tuple[int, int, int, int, int, int] | None:
    """(kind, K, N, ldw, weight pointer, scales pointer) of an :class:`~.linear.Int8Linear` (kind 8,
    ldw its row stride) or a CPU-layout :class:`~.linear.Int4Linear` (kind 4, ldw its padded rows) in a
    layout the kernels read; None for anything else (the caller then uses PyTorch's kernel)."""
    if hasattr(mod, "scales"):
        q, s = mod.qweight, mod.scales
        if s.dtype != torch.bfloat16 or q.stride(1) != 1 or not s.is_contiguous():
            return None
        return 8, mod.in_features, q.shape[0], q.stride(0), q.data_ptr(), s.data_ptr()
    sz = mod.scales_and_zeros
    if (mod.layout != "cpu" or mod.group_size != 32 or sz.dtype != torch.bfloat16 or not sz.is_contiguous()
            or not mod.qweight.is_contiguous()):
        return None
    return 4, mod.in_features, mod.out_features, sz.shape[1], mod.qweight.data_ptr(), sz.data_ptr()


def linear_q8(mod, x2: torch.Tensor) -> torch.Tensor | None:
    """``x2 [M, K] @ (q * s[:, None]).T`` for an :class:`~.linear.Int8Linear` with int8-quantized
    activations -> [M, N] in x2's dtype; None when the kernel cannot take these arguments."""
    lib, args = library(), weight_args(mod)
    if lib is None or args is None or x2.dtype not in (torch.bfloat16, torch.float32):
        return None
    _, K, N, ldw, w, s = args
    x2 = x2.contiguous()
    y = _out(x2, N)
    bf = int(x2.dtype == torch.bfloat16)
    rc = lib.og_linear_q8(x2.data_ptr(), bf, K, x2.shape[0], K, w, ldw, s, N, y.data_ptr(), N, bf)
    return None if rc else y


def linear_q4(mod, x2: torch.Tensor) -> torch.Tensor | None:
    """As :func:`linear_q8` for an :class:`~.linear.Int4Linear` in the CPU int4pack layout."""
    lib, args = library(), weight_args(mod)
    if lib is None or args is None or x2.dtype not in (torch.bfloat16, torch.float32):
        return None
    _, K, N, npad, w, sz = args
    x2 = x2.contiguous()
    y = _out(x2, N)
    bf = int(x2.dtype == torch.bfloat16)
    rc = lib.og_linear_q4(x2.data_ptr(), bf, K, x2.shape[0], K, w, sz, N, npad, y.data_ptr(), N, bf)
    return None if rc else y


def use_native(model: nn.Module, on: bool = True) -> int:
    """Route ``model``'s quantized CPU linears (and its head screen) through these kernels for calls of
    at most :data:`MAX_ROWS` rows (``on``), or back to PyTorch's; so too its transformer blocks, whole,
    where all their linears qualify (:mod:`.native_block`). Returns how many linear modules switched
    on; 0 when the kernels are unavailable (:func:`unavailable_reason`) or nothing fits them."""
    from .linear import Int4Linear, Int8Linear  # noqa: PLC0415  (linear imports this module)
    n = 0
    ok = on and available()
    for mod in model.modules():
        if isinstance(mod, Int8Linear):
            mod.native = ok and mod.qweight.device.type == "cpu" and mod.in_features % 64 == 0
        elif isinstance(mod, Int4Linear):
            mod.native = ok and mod.layout == "cpu" and mod.group_size == 32
        else:
            continue
        n += bool(mod.native)
    from .head import ScreenedEmbedding  # noqa: PLC0415
    for mod in model.modules():
        if isinstance(mod, ScreenedEmbedding) and mod.inner.native:
            # its 8-bit matrix gives the exact values of the screen's candidates: PyTorch's kernel
            mod.inner.native = False
            n -= 1
    from .native_block import use_native_blocks  # noqa: PLC0415  (it imports this module)
    use_native_blocks(model, on)
    return n
