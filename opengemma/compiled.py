"""``torch.compile`` for the decode step, with a clean fallback (fast-inference issue, item 2).

``enable(model)`` attaches a :class:`CompiledDecode` to the model; :func:`opengemma.generate.decode_step`
then runs through it. The step has static shapes (tokens [B, 1], positions [B, 1], a preallocated
cache), so one graph serves every token of a generation; cache lengths are bucketed to powers of
two while a model is compiled (:func:`opengemma.generate.cache_length`), so later requests reuse it.

* CPU: inductor fuses the element-wise work between the matmuls (norms, RoPE, GeGLU, residuals)
  into a few C++ loops; the packed int4/int8 kernels stay as they are. The graph's wrapper (the
  code that calls those kernels, several hundred calls per token) is generated as C++ too
  (inductor's ``cpp_wrapper``) rather than Python: the embedded 270M, int4 + bf16, 1024-slot
  cache, 2 threads: 18 -> 14.5 ms per token; it costs a longer first compile. Inside a compiled
  graph every cache slot is attended (masked) instead of only the filled ones, so the gain depends
  on the context (``bench/bench_inference.py`` measures it, engine ``opengemma-int4-compile``).
  Compiling takes tens of seconds once per shape; inductor's on-disk cache makes later processes
  faster.
* CUDA: ``mode="reduce-overhead"``, i.e. CUDA graphs: one launch per token instead of hundreds.
  The cache tensors are marked as static addresses so the graph can write them in place.
  UNTESTED here (no GPU on the development machine).

If compiling fails (no C++ compiler, an unsupported op, a torch bug) the error is reported once, in
one line on stderr, and decoding continues eagerly with identical results.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["CompiledDecode", "enable", "keep_eager"]


class CompiledDecode:
    """The model's decode step, compiled on first use; falls back to eager for good on failure."""

    def __init__(self, model, mode: str | None = None):
        self.model = model
        cuda = next(model.parameters(), torch.empty(0)).device.type == "cuda"
        self.mode = mode if mode is not None else ("reduce-overhead" if cuda else "default")
        # torch.compile takes a mode or inductor options, not both; cpp_wrapper is CPU-only here
        # (on CUDA the graph replays as one CUDA graph, so the wrapper's cost is not per token).
        self.options = {"cpp_wrapper": True} if self.mode == "default" and not cuda else None
        self.fn = None  # torch.compile on first use: importing torch._dynamo costs ~1 s of start-up
        self.error: str | None = None  # why compiling failed (then decoding is eager)
        self.cpp_error: str | None = None  # why the C++ wrapper failed (then inductor's Python one runs)
        self._static: set[int] = set()

    def _eager(self, tokens: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        return self.model(tokens, pos, cache)[:, 0]  # [B, V]

    def _mark_static(self, cache) -> None:
        # CUDA graphs replay fixed addresses: the cache must be known to live at one.
        if self.mode == "reduce-overhead" and id(cache) not in self._static:
            for t in (*cache.k, *cache.v, cache.pos_global, cache.pos_local):
                torch._dynamo.mark_static_address(t)
            self._static.add(id(cache))

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        while self.error is None:
            try:
                if self.fn is None:
                    keep_eager(self.model)
                    how = {"options": self.options} if self.options else {"mode": self.mode}
                    self.fn = torch.compile(self._eager, dynamic=None, **how)
                self._mark_static(cache)
                return self.fn(tokens, pos, cache)
            except Exception as e:  # compilation problems surface as many exception types
                first = (str(e).strip().splitlines() or [""])[0][:200]
                err = f"{type(e).__name__}: {first}"
                if self.options:  # the C++ wrapper failed to build: inductor's Python wrapper may not
                    self.options, self.fn, self.cpp_error = None, None, err
                    continue
                self.error = err
                print(f"opengemma: torch.compile failed ({self.error}); decoding without it", file=sys.stderr)
        return self._eager(tokens, pos, cache)


def keep_eager(model) -> None:
    """Run the methods each submodule names in its ``compile_eager`` attribute eagerly inside
    compiled graphs: ``torch.compiler.disable`` of the class's function, bound to the module as an
    instance attribute (idempotent). Applied here, when compiling, rather than as a decorator,
    which would import torch._dynamo (~1 s) whenever the module is imported."""
    for m in model.modules():
        for name in getattr(m, "compile_eager", ()):
            setattr(m, name, torch.compiler.disable(getattr(type(m), name).__get__(m)))


def enable(model, mode: str | None = None):
    """Compile ``model``'s decode step (in place; returns the model)."""
    model.compiled_decode = CompiledDecode(model, mode)
    return model
