"""The model's contract, stated without touching private paths.

* :func:`opengemma.attention.attend`: every backend against a naive float64 reference (causal,
  sliding window, soft-cap, ragged batches with padding, packed documents), at the edges of the
  window and of the query blocks, forward and (where a backend runs under autograd) backward.
* The model: ``head(trunk(x)) == forward(x)``; packed documents equal each document alone;
  forward and backward in fp32 and bf16 for every generation's features; ``init_weights``.
* The KV cache API: ``rows`` views write through, ``take`` copies, ``reset`` forgets, and
  cached decoding through a long cache equals full forwards.
* Stacked projections (:mod:`opengemma.fusion`) give the same numbers and unfuse back to the
  checkpoint's names.
"""

from __future__ import annotations

import pytest
import torch

from opengemma import attention as A
from opengemma.config import PRESETS
from opengemma.fusion import fuse_projections, unfuse_projections
from opengemma.model import GemmaModel, segment_positions
from opengemma.testing import tiny_model

GENERATIONS = ["tiny-gemma1", "tiny-gemma2", "tiny-gemma3"]


# -- attention -----------------------------------------------------------------------------------

def naive(q, k, v, scale, visible, softcap=None):
    """float64 softmax(q k^T) v over the ``visible`` [B, T, S] keys; fully hidden rows give 0."""
    G = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(G, dim=1), v.double().repeat_interleave(G, dim=1)
    s = q.double() @ k.transpose(-1, -2) * scale  # [B, H, T, S]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~visible[:, None], float("-inf"))
    return torch.nan_to_num(torch.softmax(s, dim=-1)) @ v  # [B, H, T, D]


def visibility(q_pos, k_pos, window=None, q_seg=None, k_seg=None):
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    ok = (kp >= 0) & (kp <= qp)
    if window is not None:
        ok &= qp - kp < window
    if q_seg is not None:
        ok &= q_seg[:, :, None] == k_seg[:, None, :]
    return ok  # [B, T, S]


def qkv(B, H, KV, T, S, D=16, seed=0, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(B, n, length, D, generator=g, dtype=dtype) for n, length in ((H, T), (KV, S), (KV, S))]
    return [t.requires_grad_(grad) for t in ts]


def allowed(backend, causal_fast: bool, softcap) -> bool:
    """Which backends accept a case: sdpa and causal_blocks have no soft-cap; causal_blocks
    needs plain causal attention (no mask, no window cut)."""
    if softcap is not None and backend in ("sdpa", "causal_blocks"):
        return False
    return backend != "causal_blocks" or causal_fast


# query counts at the window's edges (8, 40, 300) and the query blocks' (256 causal, 512 soft-capped)
SHAPES = [(1, None), (7, None), (8, 8), (9, 8), (255, None), (256, None), (257, None), (257, 300), (300, 40),
          (513, None)]
CAUSAL_CASES = [(b, T, w, cap) for b in A.BACKENDS for T, w in SHAPES for cap in (None, 1.5)
                if allowed(b, w is None or T <= w, cap)]


@pytest.mark.parametrize("backend,T,window,softcap", CAUSAL_CASES)
def test_causal_attention_equals_reference(backend, T, window, softcap):
    q, k, v = qkv(2, 4, 2, T, T)
    pos = torch.arange(T)[None].expand(2, T)
    want = naive(q, k, v, 0.3, visibility(pos, pos, window), softcap)
    got = A.attend(q, k, v, scale=0.3, causal=True, window=window, softcap=softcap, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    # the same visibility as an explicit mask
    if backend != "causal_blocks":
        mask = A.attention_mask(pos, pos, window, q.dtype)
        got = A.attend(q, k, v, scale=0.3, mask=mask, softcap=softcap, backend=backend)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend,softcap", [("sdpa", None), ("matmul", None), ("matmul", 2.0), ("blocks", None),
                                             ("blocks", 2.0)])
def test_ragged_batch_with_cache_positions(backend, softcap):
    # Queries at different positions per row over a cache whose slots hold scattered positions
    # (-1: empty or padding); padded query rows (-1) are not part of the contract.
    q, k, v = qkv(3, 4, 1, 5, 12, seed=1)
    q_pos = torch.tensor([[7, 8, 9, 10, 11], [3, 4, -1, -1, -1], [0, 1, 2, 3, -1]])
    k_pos = torch.tensor([list(range(12)), [0, 1, 2, 3, 4, -1, -1, -1, -1, -1, -1, -1],
                          [2, 0, 1, 3, -1, -1, 9, -1, -1, -1, -1, -1]])
    for window in (None, 3):
        want = naive(q, k, v, 0.25, visibility(q_pos, k_pos, window), softcap)
        mask = A.attention_mask(q_pos, k_pos, window, q.dtype)
        got = A.attend(q, k, v, scale=0.25, mask=mask, softcap=softcap, backend=backend)
        real = q_pos >= 0
        torch.testing.assert_close(got.transpose(1, 2)[real], want.transpose(1, 2)[real], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", ["sdpa", "matmul", "blocks"])
def test_packed_documents_equal_each_document_alone(backend):
    lens = [5, 9, 3]
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))[None]  # [1, 17]
    pos = segment_positions(seg)
    assert pos.tolist() == [list(range(5)) + list(range(9)) + list(range(3))]
    q, k, v = qkv(1, 4, 2, 17, 17, seed=2)
    got = A.attend(q, k, v, scale=0.5, mask=A.attention_mask(pos, pos, 4, q.dtype, q_seg=seg, k_seg=seg),
                   backend=backend)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        alone = A.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], scale=0.5, causal=True, window=4, backend="matmul")
        torch.testing.assert_close(got[:, :, sl], alone, atol=1e-12, rtol=1e-12)
        start += n


@pytest.mark.parametrize("backend,softcap", [("sdpa", None), ("matmul", None), ("matmul", 1.5), ("blocks", 1.5)])
def test_attention_gradients_equal_reference(backend, softcap):
    T = 600 if backend == "blocks" else 40  # blocks: past one query block, so blocks are checkpointed
    q, k, v = qkv(1, 4, 2, T, T, seed=3, grad=True)
    pos = torch.arange(T)[None]
    out = A.attend(q, k, v, scale=0.3, causal=True, window=50, softcap=softcap, backend=backend)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=out.dtype)
    got = torch.autograd.grad((out * probe).sum(), (q, k, v))
    want = torch.autograd.grad((naive(q, k, v, 0.3, visibility(pos, pos, 50), softcap) * probe).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_attend_rejects_what_a_backend_cannot_do():
    q, k, v = qkv(1, 2, 1, 4, 4)
    with pytest.raises(ValueError, match="exactly one"):
        A.attend(q, k, v, scale=1.0)
    with pytest.raises(ValueError, match="soft-cap"):
        A.attend(q, k, v, scale=1.0, causal=True, softcap=1.0, backend="sdpa")
    with pytest.raises(ValueError, match="causal_blocks"):
        A.attend(q, k, v, scale=1.0, causal=True, window=2, backend="causal_blocks")
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.attend(q, k, v, scale=1.0, causal=True, backend="flash")


# -- the model -----------------------------------------------------------------------------------

def tokens(B, T, seed=5, vocab=512):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", GENERATIONS)
def test_trunk_then_head_is_forward(name):
    model, x = tiny_model(name), tokens(2, 13)
    with torch.no_grad():
        h = model.trunk(x)
        assert h.shape == (2, 13, model.config.d_model)
        logits = model(x)
        torch.testing.assert_close(model.head(h), logits, atol=0, rtol=0)
        last = model(x, logits_at=torch.tensor([12, 3]))
        torch.testing.assert_close(last[:, 0], torch.stack([logits[0, 12], logits[1, 3]]))
    if model.config.final_softcap is not None:
        assert logits.abs().max() <= model.config.final_softcap


@pytest.mark.parametrize("name", GENERATIONS)
def test_packed_rows_equal_documents_alone(name):
    # Documents packed into one row with segment ids, past the sliding window (8): each gets
    # exactly the logits it gets alone; positions restart per document.
    model = tiny_model(name, dtype=torch.float64)
    docs = [tokens(1, n, seed=n)[0] for n in (11, 4, 17)]
    packed = torch.cat(docs)[None]  # [1, 32]
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor([len(d) for d in docs]))[None]
    with torch.no_grad():
        got = model(packed, segment_ids=seg)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(got, alone, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", GENERATIONS)
def test_forward_and_backward(name, dtype):
    # Every generation's features under autograd (soft-caps, windows, QK-norm, sandwich norms,
    # the tied embedding), past the window, in both training dtypes.
    model = tiny_model(name, dtype=dtype, std=0.05).train()
    x = tokens(2, 20)
    logits = model(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    assert torch.isfinite(loss)
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all(), n
    # the tied embedding's gradient holds both uses: rows never fed as input still get the head's part
    unseen = torch.ones(model.config.vocab_size, dtype=torch.bool)
    unseen[x[:, :-1].reshape(-1)] = False
    assert model.embed.weight.grad[unseen].abs().sum() > 0


def test_init_weights():
    cfg = PRESETS["tiny-gemma3"]
    a = GemmaModel(cfg).init_weights(torch.Generator().manual_seed(0))
    b = GemmaModel(cfg).init_weights(torch.Generator().manual_seed(0))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
        if n.endswith("norm.weight"):
            assert not p.any(), n
    w = a.layers[0].mlp.gate_proj.weight
    assert abs(float(w.detach().std()) - 0.02) < 0.002 and abs(float(w.detach().mean())) < 0.002


# -- the KV cache ---------------------------------------------------------------------------------

def test_cache_rows_take_and_reset():
    model = tiny_model("tiny-gemma3", dtype=torch.float64)
    x = tokens(3, 6)
    with torch.no_grad():
        full = model.make_cache(3, 16)
        model(x, torch.arange(6), full)
        # a view of rows 1..2 (and 8 global positions) writes through to the parent
        view = full.rows(1, 3, length=8)
        assert view.batch_size == 2 and view.max_len == 8
        step = model(x[1:, :1], torch.tensor([[6], [6]]), view)
        assert (full.pos_global[1:, 6] == 6).all() and (full.pos_global[0, 6] == -1)
        # take copies rows (repeats allowed); writes to the copy leave the parent alone
        copy = full.take([0, 0, 2])
        assert copy.batch_size == 3 and torch.equal(copy.k[0][1], full.k[0][0])
        model(x[:, :1], torch.tensor([[6], [6], [7]]), copy)
        assert full.pos_global[0, 6] == -1 and copy.pos_global[0, 6] == 6
        # the copy continues exactly as the original row would: row 2 holds x[2] at 0..5 and x[2, 0]
        # at 6 (through the view), 7 (in the copy) and now 8
        ref = model(torch.cat([x[2], x[2, :1].repeat(3)])[None])[0, -1]
        torch.testing.assert_close(copy_step := model(x[2:, :1], torch.tensor([[8]]), copy.rows(2, 3))[0, 0], ref)
        full.reset([0])
        assert (full.pos_global[0] == -1).all() and (full.pos_local[0] == -1).all() and (full.pos_global[1, :7] >= 0).all()
        full.reset()
        assert (full.pos_global == -1).all()
    assert step.shape == (2, 1, 512) and copy_step.shape == (512,)


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
def test_cached_decoding_through_a_long_cache_equals_full_forwards(name):
    # Two ragged rows decoded for 140 steps in a 300-slot cache with a 100-slot ring: reads cross
    # 128/192/256 slots and the ring wraps. Every step equals a full forward over the sequence.
    cfg = PRESETS[name].replace(sliding_window=100, context_length=512)
    model = tiny_model(cfg, dtype=torch.float64, std=0.1)
    prompts = [tokens(1, 5, seed=21)[0], tokens(1, 70, seed=22)[0]]
    cont = tokens(2, 140, seed=23)
    with torch.no_grad():
        cache = model.make_cache(2, 300)
        lens = torch.tensor([len(p) for p in prompts])
        pos = torch.stack([torch.cat([torch.arange(len(p)), torch.full((70 - len(p),), -1)]) for p in prompts])
        toks = torch.stack([torch.cat([p, torch.zeros(70 - len(p), dtype=torch.long)]) for p in prompts])
        model(toks, pos, cache)
        for t in range(0, 140, 23):
            for s in range(t, min(t + 23, 140)):
                out = model(cont[:, s:s + 1], (lens + s)[:, None], cache)[:, 0]
            for r, p in enumerate(prompts):
                ref = model(torch.cat([p, cont[r, :s + 1]])[None])[0, -1]
                torch.testing.assert_close(out[r], ref, atol=1e-10, rtol=1e-10)


# -- stacked projections --------------------------------------------------------------------------

@pytest.mark.parametrize("name", GENERATIONS)
def test_fused_projections_equal_separate_and_unfuse_back(name):
    model, x = tiny_model(name), tokens(2, 12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(x)
        fuse_projections(model)
        assert "layers.0.attn.qkv_proj.weight" in model.state_dict()
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        cache = model.make_cache(2, 16)
        torch.testing.assert_close(model(x, torch.arange(12), cache), want, atol=1e-5, rtol=1e-5)
        unfuse_projections(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_rmsnorm_scale_is_kept_for_inference_and_renewed_when_the_weight_changes():
    from opengemma.model import RMSNorm

    norm = RMSNorm(8, 1e-6)
    x = torch.randn(2, 8)
    with torch.inference_mode():
        a = norm(x)
        assert norm.scale() is norm.scale()  # kept between calls
    with torch.no_grad():
        norm.weight.add_(1.0)  # an in-place edit (loading, a training step) bumps the version
    with torch.inference_mode():
        b = norm(x)
    assert torch.allclose(b, 2 * a, atol=1e-6)
    assert norm.scale() is not norm.scale()  # outside inference mode: computed afresh each call
    norm(x).sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    norm.weight.requires_grad_(False)  # frozen (LoRA), after an inference-mode rollout: usable by autograd
    x.requires_grad_(True)
    norm(x).sum().backward()
    assert x.grad is not None


def test_bf16_decode_attention_over_few_keys_runs_in_fp32():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 32, generator=gen).bfloat16()
    k, v = (torch.randn(1, 1, 40, 32, generator=gen).bfloat16() for _ in range(2))
    mask = torch.zeros(1, 1, 1, 40, dtype=torch.bfloat16)
    mask[..., 30:] = torch.finfo(torch.bfloat16).min
    with torch.inference_mode():
        out = A.attend(q, k, v, scale=0.2, mask=mask)
        ref = A.attend(q.float(), k.float(), v.float(), scale=0.2, mask=mask.float())
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.bfloat16())
