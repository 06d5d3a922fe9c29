"""Process-wide settings for inference, applied once by the command line (``opengemma generate``,
``chat``, ``serve``, ``eval``) before it loads a model: cold start and prefill speed. Importing this
module changes nothing; :func:`tune` does, and says what it did (:data:`APPLIED`).
``OPENGEMMA_NO_PROCESS_TUNING=1`` turns both settings off. The library never calls it
(``opengemma.load()`` leaves the interpreter as it found it: a trainer's data-loader workers, say,
must not inherit a frozen collector or malloc settings they did not ask for); the commands use
:func:`load_for_command`.

* **Garbage collector** (``gc.freeze()``): importing torch leaves a few hundred thousand GC-tracked
  objects (modules, functions, classes) that live until exit. Python's final collection walks them
  all: 0.4-0.5 s of every short run on the 2-core dev machine (``import torch`` alone: 0.45 s of
  teardown, 0.12 s frozen), a quarter of the 2 s cold-start budget; each full collection during a
  long run walks them again. Frozen objects are skipped by the collector and still freed by
  reference counting. Only what exists at the first load is frozen (the model is built after), so a
  dropped model's reference cycles are still collected; cyclic garbage made before is kept.
* **glibc malloc thresholds** (``mallopt``; Linux with glibc only): torch's CPU tensors come from
  malloc, and by default glibc serves blocks above 128 KiB-32 MiB with fresh ``mmap`` pages and
  hands them back on free, so every prefill faults its activations and on-the-fly dequantized
  weights in again, page by page (the embedded 270M, int4 + bf16, 512 tokens: 4,000-60,000 minor
  faults and 440-650 ms per prefill; with the settings below 0-1,300 faults and 445 ms). Blocks up
  to 32 MiB (glibc's maximum) now come from the heap, and the heap keeps up to 256 MiB of freed
  memory instead of trimming it: resident memory stays near its peak (+28 MiB peak in that run),
  as with any caching allocator.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

__all__ = ["APPLIED", "load_for_command", "tune"]

MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value (HEAP_MAX / 2 on 64-bit)
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers from glibc's malloc.h

APPLIED: list[str] = []  # what tune() did in this process ("gc.freeze", "mallopt"); empty before


def tune() -> None:
    """Apply the settings above, once per process (later calls do nothing)."""
    if APPLIED or os.environ.get("OPENGEMMA_NO_PROCESS_TUNING", "") not in ("", "0"):
        return
    gc.freeze()
    APPLIED.append("gc.freeze")
    if _set_malloc_thresholds():
        APPLIED.append("mallopt")


def _set_malloc_thresholds() -> bool:
    """Raise glibc's mmap and trim thresholds; False where there is no glibc (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):  # musl also answers to libc.so.6 on some systems
            return False
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False


def load_for_command(model, adapter=None, **kwargs):
    """:func:`tune`, then ``opengemma.load(model, **kwargs)``: how the commands load a model, with
    the LoRA ``adapter`` (a directory, or ``default``) merged in when one is named. (Freezing after
    ``import torch`` and before the model exists is what keeps the model's own reference cycles
    collectable.)"""
    import torch  # noqa: F401  -- imported first, so that its objects are the ones frozen

    from .api import load

    if adapter:
        from .train.lora import load_with_adapter

        return load_with_adapter(model, adapter, **kwargs)
    tune()
    return load(model, **kwargs)
