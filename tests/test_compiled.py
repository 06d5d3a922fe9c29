"""The compiled decode step (opengemma.compiled): the same numbers as eager, past the sliding
window; power-of-two cache buckets; and a clean, one-line fallback when compiling fails."""

from __future__ import annotations

import pytest
import torch

from opengemma import compiled
from opengemma.generate import GenerationConfig, RowState, cache_length, decode_step, generate_tokens, prefill
from opengemma.model import GemmaModel
from opengemma.testing import tiny_model


def _tiny(seed: int = 3) -> GemmaModel:
    return tiny_model("tiny-gemma3", seed=seed)


def _teacher_forced(model, prompt, cont):
    with torch.inference_mode():
        cache = model.make_cache(1, 64)
        out = [prefill(model, cache, [prompt])]
        for t, tok in enumerate(cont):
            out.append(decode_step(model, torch.tensor([[tok]]), torch.tensor([[len(prompt) + t]]), cache))
    return torch.stack(out)  # [1 + len(cont), 1, V]


def test_compiled_decode_equals_eager_past_the_window():
    pytest.importorskip("torch._inductor")
    model = _tiny()
    prompt, cont = [2, 17, 33, 5, 90], [int(t) for t in torch.randint(3, 500, (20,), generator=torch.Generator().manual_seed(1))]
    eager = _teacher_forced(model, prompt, cont)  # 25 positions: the window of 8 wraps three times
    compiled.enable(model)
    fast = _teacher_forced(model, prompt, cont)
    assert model.compiled_decode.error is None, model.compiled_decode.error
    torch.testing.assert_close(fast, eager, atol=1e-4, rtol=1e-4)  # inductor may reorder reductions
    gen = GenerationConfig(max_new_tokens=12)
    compiled_tokens = list(generate_tokens(model, [prompt], gen))  # a 256-slot cache: another shape
    del model.compiled_decode
    assert compiled_tokens == list(generate_tokens(model, [prompt], gen))


def _compiled_matches_eager() -> GemmaModel:
    """A tiny model whose decode, through compiled.enable, gives exactly its eager logits."""
    model = _tiny()
    prompt, cont = [2, 9, 4], [7, 8, 9]
    eager = _teacher_forced(model, prompt, cont)
    compiled.enable(model)
    assert torch.equal(_teacher_forced(model, prompt, cont), eager)
    return model


def test_compile_failure_falls_back_once(monkeypatch, capsys):
    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(compiled.torch, "compile", broken)
    _compiled_matches_eager()
    err = capsys.readouterr().err
    assert err.count("torch.compile failed") == 1 and "RuntimeError: no C++ compiler found" in err
    assert len(err.strip().splitlines()) == 1


def test_cpp_wrapper_failure_falls_back_to_the_python_wrapper(monkeypatch, capsys):
    calls = []

    def fake_compile(fn, dynamic=None, mode=None, options=None):
        calls.append(options or mode)
        if options and options.get("cpp_wrapper"):
            def broken(*a, **k):
                raise RuntimeError("C++ compile error: Python.h not found\nmore")
            return broken
        return fn  # stands in for the Python-wrapper graph: same numbers

    monkeypatch.setattr(compiled.torch, "compile", fake_compile)
    model = _compiled_matches_eager()
    cd = model.compiled_decode
    assert calls == [{"cpp_wrapper": True}, "default"]  # one retry, then the Python wrapper stays
    assert cd.error is None and cd.cpp_error == "RuntimeError: C++ compile error: Python.h not found"
    assert capsys.readouterr().err == ""


def test_compiled_models_bucket_cache_lengths():
    rows = [RowState([1] * 10, 20), RowState([1] * 300, 5)]
    assert cache_length(rows, 8192) == 320  # eager: multiples of 64
    assert cache_length(rows, 8192, pow2=True) == 512
    assert cache_length(rows[:1], 8192, pow2=True) == 256  # at least 256
    assert cache_length(rows, 400, pow2=True) == 400  # never past the context


def test_eager_methods_are_marked_when_compiling_not_at_import():
    # The screened head's re-scoring must stay eager inside a compiled step; marking it is
    # torch.compiler.disable, which imports torch._dynamo (~1 s): done when compiling, so that
    # loading and running a mixed model (every command's start-up) never imports it.
    import subprocess
    import sys

    code = ("import sys, opengemma; g = opengemma.load('tiny-gemma3', quantize='mixed'); "
            "g.generate('hi', max_new_tokens=2); print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout

    import opengemma
    from opengemma.quant.head import ScreenedEmbedding

    model = opengemma.load("tiny-gemma3", quantize="mixed").model
    heads = [m for m in model.modules() if isinstance(m, ScreenedEmbedding)]
    assert heads and all("_rescore" not in vars(m) for m in heads)
    compiled.keep_eager(model)
    compiled.keep_eager(model)  # idempotent: wraps the class's function, not the wrapper
    for m in heads:
        fn = vars(m)["_rescore"]
        assert getattr(fn, "_torchdynamo_disable", False) and fn.__wrapped__.__func__ is ScreenedEmbedding._rescore
