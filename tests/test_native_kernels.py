"""opengemma's native int8 x int8 kernels (opengemma/quant/native.py, kernels.c): numbers against a
reference written here in torch, row independence, routing, the build, and the commands' choice.

Skipped where the CPU or the compiler cannot run them (the reason is printed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from opengemma.api import use_kernels
from opengemma.quant import native
from opengemma.quant.linear import Int4Linear, Int8Linear

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")


def quantize_act(x: torch.Tensor) -> torch.Tensor:
    """What the kernels multiply: x [M, K] rounded per block of 32 to int8 (d = max|x| / 127, q =
    round-half-even(x * (127 / max|x|))), dequantized again, in fp64."""
    M, K = x.shape
    xb = x.float().view(M, K // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)  # [M, K/32, 1]
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv).clamp(-127, 127)
    return (q.double() * (amax.double() / 127.0)).view(M, K)


def heavy_tailed(M: int, K: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(M, K, generator=gen) * torch.rand(K, generator=gen) * 3  # [M, K]
    x[:, 5] *= 40  # an outlier channel, as Gemma's activations have
    return x


@pytest.mark.parametrize("kind", ["q8", "q4"])
@pytest.mark.parametrize("N,K", [(200, 128), (130, 96), (64, 640)])
def test_kernel_equals_the_reference_and_rows_are_independent(kind, N, K):
    if kind == "q8" and K % 64:
        pytest.skip("the int8 kernel needs K % 64 == 0 (the module then keeps PyTorch's)")
    gen = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=gen) * 0.05
    mod = (Int8Linear if kind == "q8" else Int4Linear).from_float(w, act_dtype=torch.float32)
    fn = native.linear_q8 if kind == "q8" else native.linear_q4
    wd = mod.dequantize().double()  # [N, K] the stored weights, exactly
    for M in (1, 3, native.MAX_ROWS):
        x = heavy_tailed(M, K, gen)
        y = fn(mod, x)  # [M, N] fp32
        ref = quantize_act(x) @ wd.T  # [M, N]
        assert y.shape == (M, N) and y.dtype == torch.float32
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 2e-6, f"M={M}: relative error {err:.2e}"
        # each row is its own dot product: the same bits whatever else is in the call
        for i in range(M):
            assert torch.equal(fn(mod, x[i:i + 1]), y[i:i + 1])
        # bf16 in and out: bf16 activations quantize as their fp32 values do; the output is the fp32
        # result rounded to nearest even
        xb = x.bfloat16()
        assert torch.equal(fn(mod, xb), fn(mod, xb.float()).bfloat16())


def test_rounding_differs_from_torch_kernels_only_by_the_activation_rounding():
    """Against PyTorch's weight-only kernel (bf16 activations) on one layer shape of the 270M: the
    difference is that of rounding activations to 8 bits per block of 32 instead of to bf16."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 640, generator=gen) * 0.05
    mod = Int8Linear.from_float(w, act_dtype=torch.bfloat16)
    x = heavy_tailed(1, 640, gen).bfloat16()
    ours, theirs = native.linear_q8(mod, x).float(), mod.packed(x).float()
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert 1e-4 < rel < 2e-2, rel  # not the same kernel, and not far from it


def test_modules_route_few_rows_to_the_kernels_and_the_rest_to_torch():
    gen = torch.Generator().manual_seed(1)
    mod = Int8Linear.from_float(torch.randn(96, 128, generator=gen) * 0.05, act_dtype=torch.float32)
    x = torch.randn(native.MAX_ROWS + 1, 128, generator=gen)
    torch_rows = mod(x)  # native off: PyTorch's kernel
    mod.native = True
    assert torch.equal(mod(x[:3]), native.linear_q8(mod, x[:3]))
    assert torch.equal(mod(x), torch_rows)  # more rows than the kernels take
    xg = x[:2].clone().requires_grad_(True)
    y = mod(xg)  # autograd: PyTorch's kernel, differentiable
    assert torch.equal(y.detach(), torch_rows[:2])


def test_use_native_counts_switches_back_and_keeps_a_screened_heads_exact_rows():
    from opengemma.config import PRESETS
    from opengemma.model import build_model
    from opengemma.quant import quantize_model

    model = build_model(PRESETS["tiny-gemma3"], device="cpu", dtype=torch.float32)
    model.init_weights(torch.Generator().manual_seed(0)).eval()
    quantize_model(model, "mixed")
    n = native.use_native(model)
    mods = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    assert n == sum(m.native for m in mods) > 0
    assert not model.embed.inner.native  # the candidates' exact 8-bit values: PyTorch's kernel
    assert native.use_native(model, False) == 0 and not any(m.native for m in mods)


def test_unavailable_reasons(monkeypatch):
    monkeypatch.setenv("OPENGEMMA_NATIVE", "0")
    assert native._load() == (None, "disabled by OPENGEMMA_NATIVE=0")
    monkeypatch.delenv("OPENGEMMA_NATIVE")
    monkeypatch.setattr(native, "_compiler", lambda: None)
    lib, why = native._load()
    assert lib is None and "no C compiler" in why
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx2"})
    lib, why = native._load()
    assert lib is None and "avx512_vnni" in why


def test_build_is_cached_per_source_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENGEMMA_CACHE", str(tmp_path))
    lib, why = native._load()
    assert lib is not None, why
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporaries left behind
    mtime = built[0].stat().st_mtime_ns
    lib2, _ = native._load()
    assert lib2 is not None and built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt


def test_a_read_only_cache_builds_for_the_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENGEMMA_CACHE", str(tmp_path))
    real, where = native._build, []

    def build(cc, out):
        where.append(out)
        if len(where) == 1:
            raise PermissionError(13, "Permission denied", str(out.parent))
        real(cc, out)

    monkeypatch.setattr(native, "_build", build)
    lib, why = native._load()
    assert lib is not None, why
    assert where[0].parent == tmp_path / "kernels" and where[1].parent != where[0].parent
    shutil.rmtree(where[1].parent)


def _teacher_forced(g, ids, chunk):
    """(log p of each next token, argmax, top-2 gap) over ids, in forwards of ``chunk`` tokens."""
    from opengemma.quant import exact_head

    model = g.model
    cache = model.make_cache(1, len(ids))
    lp, best, gap = [], [], []
    t = torch.tensor([ids])
    with torch.inference_mode(), exact_head(model):
        for i in range(0, len(ids) - 1, chunk):
            j = min(i + chunk, len(ids) - 1)
            logits = model(t[:, i:j], torch.arange(i, j)[None], cache)[0].float()  # [n, V]
            top = logits.topk(2, dim=-1).values
            lp.append(logits.log_softmax(-1).gather(1, t[0, i + 1:j + 1, None])[:, 0])
            best.append(logits.argmax(-1))
            gap.append(top[:, 0] - top[:, 1])
    return torch.cat(lp), torch.cat(best), torch.cat(gap)


def test_embedded_model_quality_with_native_kernels(gguf_path, tokenizer):
    """The default mode (mixed, bf16) on the embedded model, native kernels against PyTorch's, teacher
    forced over 256 tokens of a shipped text in decode-sized forwards: perplexity within 1%, and the same
    greedy token wherever PyTorch's top two logits are 0.5 or more apart (bf16 logits move by ~0.1)."""
    import opengemma

    text = (Path(__file__).parent / "fixtures" / "eval" / "bbh" / "cot-prompts" / "date_understanding.txt").read_text()
    ids = tokenizer.encode(text, bos=True)[:257]
    g = opengemma.load(gguf_path, quantize="auto", device="cpu")
    assert any(getattr(m, "native", False) for m in g.model.modules())
    lp_n, best_n, _ = _teacher_forced(g, ids, native.MAX_ROWS)
    use_kernels(g.model, "torch")
    lp_t, best_t, gap_t = _teacher_forced(g, ids, native.MAX_ROWS)
    ppl_n, ppl_t = lp_n.neg().mean().exp().item(), lp_t.neg().mean().exp().item()
    assert ppl_n / ppl_t < 1.01, (ppl_n, ppl_t)
    clear = gap_t >= 0.5
    assert clear.sum() > 100 and torch.equal(best_n[clear], best_t[clear]), (best_n != best_t)[clear].sum()


def test_load_kernels_option(monkeypatch):
    import opengemma
    from opengemma.errors import OpenGemmaError

    with pytest.raises(ValueError, match="kernels must be one of"):
        opengemma.load("tiny-gemma3", kernels="fast")
    with pytest.raises(OpenGemmaError, match="needs a quantized model"):
        opengemma.load("tiny-gemma3", kernels="native")
    g = opengemma.load("tiny-gemma3", quantize="int8")  # auto: native where available
    assert any(getattr(m, "native", False) for m in g.model.modules())
    assert use_kernels(g.model, "torch") == 0
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "unavailable_reason", lambda: "this CPU lacks avx512_vnni")
    assert use_kernels(g.model, "auto") == 0
    with pytest.raises(OpenGemmaError, match="unavailable: this CPU lacks avx512_vnni"):
        use_kernels(g.model, "native")


def test_cli_refuses_native_kernels_without_quantization_in_one_line(capsys):
    from opengemma.cli import main

    assert main(["generate", "hi", "-n", "1", "--model", "tiny-gemma3", "--quantize", "none",
                 "--kernels", "native"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a quantized model" in err[0]


def test_layouts_the_kernels_cannot_read_are_left_to_torch():
    gen = torch.Generator().manual_seed(2)
    mod = Int8Linear.from_float(torch.randn(64, 128, generator=gen) * 0.05, act_dtype=torch.float32)
    x = torch.randn(1, 128, generator=gen)
    wide = torch.zeros(64, 2, dtype=mod.scales.dtype)
    wide[:, 0] = mod.scales
    mod.scales = wide[:, 0]  # a strided view: same values, not contiguous
    assert native.linear_q8(mod, x) is None  # the module then runs PyTorch's kernel
    mod.scales = wide[:, 0].contiguous()
    assert native.linear_q8(mod, x) is not None
    assert native.linear_q8(mod, x.half()) is None  # fp16 activations: not a kernel input
