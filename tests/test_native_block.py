"""A decode step's whole block in one native call (opengemma/quant/native_block.py, block.c) against
the block's PyTorch forward on the same inputs: Gemma 1/2/3 flags (MQA/GQA, soft-capped attention,
sandwich and q/k norms, sliding-window rings), fp32 and bf16, int8 and int4 linears; one-token steps,
ragged batches with padding, and speculative verification. Then when it steps aside, and the class
swap. Skipped where the native kernels cannot run (the reason is printed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import opengemma
from opengemma.api import use_kernels
from opengemma.model import Block
from opengemma.quant import native
from opengemma.quant.native_block import NativeBlock, decode, use_native_blocks

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")


def _model(preset: str, quantize: str, dtype: str):
    g = opengemma.load(preset, quantize=quantize, dtype=dtype, seed=3)
    assert all(type(b) is NativeBlock for b in g.model.layers)
    for b in g.model.layers:
        # a random tiny model's attention logits are ~0.01 (near-uniform attention, and far below
        # Gemma 2's cap of 50, where tanh is the identity): sharpen them to ~2 and cap them at 2
        b.attn.scale *= 200
        if g.config.attn_softcap is not None:
            b.attn.config = dataclasses.replace(b.attn.config, attn_softcap=2.0)
    return g.model


def _compare_blocks(model, tokens, pos, cache):
    """Run one cached forward block by block; at each block compare the native call with the
    block's PyTorch forward from the same hidden state and cache contents (outputs, and the keys and
    values each writes), then continue from PyTorch's output. Returns per-block relative errors."""
    dt = model.final_norm.weight.dtype
    errs = []
    with torch.inference_mode():
        h = model.embed(tokens).to(dt) * model._embed_scale[dt]  # [B, T, d]
        rope = {loc: model.rope(pos, loc, dt) for loc in (False, True)}
        step = cache.step(pos, dt)
        for i, blk in enumerate(model.layers):
            k0, v0 = cache.k[i].clone(), cache.v[i].clone()
            ours = decode(blk, h, rope[blk.local], step)
            assert ours is not None, f"block {i} stepped aside"
            k1, v1 = cache.k[i].clone(), cache.v[i].clone()
            cache.k[i].copy_(k0)
            cache.v[i].copy_(v0)
            ref = Block.forward(blk, h, rope, {False: None, True: None}, step)
            tol = 1e-5 if dt == torch.float32 else 8e-3  # bf16: one rounding step of a value
            for a, b in ((k1, cache.k[i]), (v1, cache.v[i])):
                torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
            errs.append(((ours.float() - ref.float()).norm() / ref.float().norm()).item())
            h = ref
    return errs


def _prefill(model, B, n, max_len, spare=0, lengths=None):
    """A cache holding ``n`` random tokens per row (``lengths``: fewer for some rows)."""
    gen = torch.Generator().manual_seed(n)
    cache = model.make_cache(B, max_len, spare=spare)
    toks = torch.randint(0, model.config.vocab_size, (B, n), generator=gen)
    pos = torch.arange(n).repeat(B, 1)
    for r, length in enumerate(lengths or []):
        pos[r, length:] = -1
    with torch.inference_mode():
        model(toks, pos, cache)
    return cache


@pytest.mark.parametrize("preset", ["tiny-gemma1", "tiny-gemma2", "tiny-gemma3"])
@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_block_equals_pytorch_block(preset, quantize, dtype):
    model = _model(preset, quantize, dtype)
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(7)
    errs = []
    # one token at a time, past the sliding window (8): the local rings wrap
    cache = _prefill(model, 1, 11, 40)
    for p in (11, 12, 13):
        errs += _compare_blocks(model, torch.randint(0, V, (1, 1), generator=gen), torch.tensor([[p]]), cache)
    # a prompt's first chunk in a row whose earlier tenant (11 positions, wrapped rings) was not reset
    errs += _compare_blocks(model, torch.randint(0, V, (1, 5), generator=gen), torch.arange(5)[None], cache)
    # a ragged batch: rows at different positions, one row padding
    cache = _prefill(model, 3, 9, 40, lengths=[9, 4, 6])
    errs += _compare_blocks(model, torch.randint(0, V, (3, 1), generator=gen), torch.tensor([[9], [4], [-1]]), cache)
    # a speculative verification: 4 tokens per row with 3 spare ring slots
    cache = _prefill(model, 2, 10, 40, spare=3)
    errs += _compare_blocks(model, torch.randint(0, V, (2, 4), generator=gen), torch.arange(10, 14).repeat(2, 1), cache)
    errs = torch.tensor(errs)
    if dtype == "float32":
        # the order of sums differs; an activation then and again lands on the other side of an
        # 8-bit rounding boundary in the next linear (~1e-4 relative for that block)
        assert errs.median() < 1e-6 and errs.max() < 1e-3, errs
    else:
        # bf16 rounds where PyTorch rounds: most blocks are bitwise equal, the rest one rounding apart
        assert (errs == 0).float().mean() >= 0.5 and errs.max() < 2e-2, errs


def test_generation_with_native_blocks_matches_pytorch_blocks():
    """Whole greedy decodes through generate's loop: the same tokens with the blocks native or not
    (fp32, where both paths agree to rounding; a random tiny model has no near-ties to speak of)."""
    from opengemma.generate import GenerationConfig, generate_tokens

    g = opengemma.load("tiny-gemma3", quantize="int8", dtype="float32", seed=5)
    prompts = [[2, 17, 99, 4, 250], [2, 8, 31]]
    cfg = GenerationConfig(max_new_tokens=24, temperature=0.0)
    ours = list(generate_tokens(g.model, prompts, cfg))
    use_native_blocks(g.model, False)
    assert not any(type(b) is NativeBlock for b in g.model.layers)
    ref = list(generate_tokens(g.model, prompts, cfg))
    assert len(ours) == 24 and ours == ref


def test_native_block_steps_aside():
    model = _model("tiny-gemma3", "int8", "float32")
    blk = model.layers[2]  # a global layer
    V = model.config.vocab_size
    cache = _prefill(model, 1, 6, 64)
    dt = torch.float32
    h = torch.randn(1, 1, model.config.d_model)
    rope = model.rope(torch.tensor([[6]]), False, dt)
    with torch.inference_mode():
        assert decode(blk, h, rope, cache.step(torch.tensor([[6]]), dt)) is not None
        # more rows than the kernels take
        big = torch.randn(1, native.MAX_ROWS + 1, model.config.d_model)
        pos = torch.arange(20, 20 + native.MAX_ROWS + 1)[None]
        assert decode(blk, big, model.rope(pos, False, dt), cache.step(pos, dt)) is None
        # activations in another dtype than the cache's
        assert decode(blk, h.bfloat16(), model.rope(torch.tensor([[7]]), False, torch.bfloat16),
                      cache.step(torch.tensor([[7]]), torch.bfloat16)) is None
    # autograd: PyTorch's forward (the kernels have no backward)
    hg = h.clone().requires_grad_()
    assert decode(blk, hg, rope, cache.step(torch.tensor([[8]]), dt)) is None
    # a prefill through the blocks still works (PyTorch's path), and so does a decode after it
    with torch.inference_mode():
        logits = model(torch.randint(0, V, (1, 30)), torch.arange(30)[None], model.make_cache(1, 64))
    assert logits.shape == (1, 30, V) and torch.isfinite(logits).all()


def test_class_swap_keeps_the_state_dict_and_follows_the_kernels_choice():
    g = opengemma.load("tiny-gemma2", quantize="int4", dtype="bfloat16")
    keys = list(g.model.state_dict())
    assert all(type(b) is NativeBlock for b in g.model.layers)
    use_kernels(g.model, "torch")
    assert all(type(b) is Block for b in g.model.layers) and list(g.model.state_dict()) == keys
    use_kernels(g.model, "auto")
    assert all(type(b) is NativeBlock for b in g.model.layers)
    # a block with a linear off the kernels stays PyTorch's
    g.model.layers[1].mlp.down_proj.native = False
    assert use_native_blocks(g.model) == len(g.model.layers) - 1 and type(g.model.layers[1]) is Block
    # an unquantized model has no native blocks
    plain = opengemma.load("tiny-gemma2", dtype="bfloat16")
    assert use_native_blocks(plain.model) == 0
