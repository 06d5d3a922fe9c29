"""What only a CUDA device can check: the compiled decode step with CUDA graphs, int4/int8 packed
kernels on CUDA, and SDPA's GPU kernels against the reference attention. Skipped without a GPU
(CI has none); run on one with ``python -m pytest -q tests/test_cuda.py``."""

from __future__ import annotations

import pytest
import torch

from opengemma import attention as A
from opengemma import compiled
from opengemma.generate import decode_step, prefill
from opengemma.quant import Int4Linear, Int8Linear, quantize_model
from opengemma.testing import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _teacher_forced(model, prompt, cont):
    dev = model.final_norm.weight.device
    with torch.inference_mode():
        cache = model.make_cache(1, 64)
        out = [prefill(model, cache, [prompt])]
        for t, tok in enumerate(cont):
            tokens = torch.tensor([[tok]], device=dev)
            out.append(decode_step(model, tokens, torch.tensor([[len(prompt) + t]], device=dev), cache))
    return torch.stack(out).float().cpu()  # [1 + len(cont), 1, V]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager(dtype):
    model = tiny_model("tiny-gemma3", dtype=dtype).cuda()
    prompt, cont = [2, 17, 33, 5, 90], list(range(40, 60))  # 25 positions: the window of 8 wraps
    eager = _teacher_forced(model, prompt, cont)
    compiled.enable(model)
    assert model.compiled_decode.mode == "reduce-overhead"
    fast = _teacher_forced(model, prompt, cont)
    assert model.compiled_decode.error is None, model.compiled_decode.error
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fast, eager, atol=tol, rtol=tol)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_packed_kernels_on_cuda(cls):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(256, 512, generator=g) * 0.05).cuda()
    lin = cls.from_float(w, act_dtype=torch.bfloat16)
    assert lin.packed_ok
    x = torch.randn(4, 512, generator=g).cuda().bfloat16()
    want = x.float() @ lin.dequantize(dtype=torch.float32).t()
    torch.testing.assert_close(lin(x).float(), want, atol=2e-2, rtol=2e-2)


def test_quantized_model_generates_on_cuda():
    model = tiny_model("tiny-gemma2", dtype=torch.bfloat16).cuda()
    ref = _teacher_forced(model, [2, 3, 4], [5, 6, 7])
    quantize_model(model, "int8")
    got = _teacher_forced(model, [2, 3, 4], [5, 6, 7])
    assert torch.isfinite(got).all() and (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_on_gpu_equals_reference(dtype, causal):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 300, 64, generator=g) for n in (8, 2, 2))
    pos = torch.arange(300)[None].expand(2, 300)
    mask = None if causal else A.attention_mask(pos, pos, 100, torch.float32)
    want = A.attend(q.double(), k.double(), v.double(), scale=0.125, causal=causal,
                    window=100 if causal else None, mask=None if causal else mask.double(), backend="matmul")
    got = A.attend(*(t.cuda().to(dtype) for t in (q, k, v)), scale=0.125, causal=causal,
                   window=100 if causal else None, mask=None if causal else mask.cuda().to(dtype))
    torch.testing.assert_close(got.double().cpu(), want, atol=2e-2, rtol=2e-2)
