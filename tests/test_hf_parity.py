"""Reference parity: our model vs HF transformers on tiny random Gemma 1, 2 and 3 checkpoints.

Each checkpoint is written by transformers' ``save_pretrained`` and read back through our real HF
loader (``opengemma.checkpoints.hf``), so the name map and config mapping are under test too.
Everything runs in fp32 with eager attention on the transformers side. The weights, norms
included, are re-randomised (std 0.1) so that no term hides behind a zero init, and the soft-caps
are set low enough that tanh actually bends the logits.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from opengemma.checkpoints import hf  # noqa: E402
from opengemma.checkpoints import load_weights  # noqa: E402

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_attention_heads=4, head_dim=16,
              max_position_embeddings=256, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh")


def _hf_gemma1():
    cfg = transformers.GemmaConfig(**COMMON, num_hidden_layers=3, num_key_value_heads=1)
    return transformers.GemmaForCausalLM, cfg


def _hf_gemma2():
    cfg = transformers.Gemma2Config(**COMMON, num_hidden_layers=4, num_key_value_heads=2, query_pre_attn_scalar=24,
                                    sliding_window=8, attn_logit_softcapping=1.5, final_logit_softcapping=3.0)
    return transformers.Gemma2ForCausalLM, cfg


def _hf_gemma3():
    cfg = transformers.Gemma3TextConfig(
        **COMMON, num_hidden_layers=6, num_key_value_heads=2, query_pre_attn_scalar=20, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    return transformers.Gemma3ForCausalLM, cfg


BUILDERS = {"gemma1": _hf_gemma1, "gemma2": _hf_gemma2, "gemma3": _hf_gemma3}


@pytest.fixture(scope="module", params=list(BUILDERS))
def pair(request, tmp_path_factory):
    """(ours, theirs) for one generation, loaded from the same saved checkpoint."""
    torch.manual_seed(1234)
    cls, cfg = BUILDERS[request.param]()
    cfg._attn_implementation = "eager"
    theirs = cls(cfg).float().eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp(request.param)
    theirs.save_pretrained(path)
    theirs = cls.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    config, state_dict = hf.load(path)
    ours = load_weights(config, state_dict, dtype=torch.float32)
    return request.param, ours, theirs


def _tokens(n_rows: int, length: int, vocab: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, vocab, (n_rows, length), generator=g)


@torch.no_grad()
def test_config_mapping(pair):
    name, ours, theirs = pair
    c, h = ours.config, theirs.config
    assert (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size) == (
        h.hidden_size, h.num_hidden_layers, h.num_attention_heads, h.num_key_value_heads, h.head_dim,
        h.intermediate_size, h.vocab_size)
    if name == "gemma1":
        assert not c.layer_types and c.query_pre_attn_scalar == h.head_dim
    else:
        assert c.sliding_window == 8 and c.sandwich_norms
        hf_local = [t == "sliding_attention" for t in h.layer_types]
        assert [c.is_local(i) for i in range(c.n_layers)] == hf_local
    if name == "gemma3":
        assert c.qk_norm and c.rope_scale == 8.0 and c.local_rope_base == 10_000.0 and c.rope_base == 1e6


@torch.no_grad()
def test_full_forward_matches_transformers(pair):
    _, ours, theirs = pair
    tokens = _tokens(2, 24)  # 24 > sliding window 8: local layers really slide
    expected = theirs(tokens).logits
    got = ours(tokens)
    assert got.shape == expected.shape == (2, 24, 512)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cached_decode_matches_transformers(pair):
    """Prefill 5 tokens, then decode one at a time well past the window; each step equals HF."""
    _, ours, theirs = pair
    tokens = _tokens(2, 30)
    expected = theirs(tokens).logits
    cache = ours.make_cache(batch_size=2, max_len=32)
    steps = [ours(tokens[:, :5], torch.arange(5), cache)]
    for t in range(5, 30):
        steps.append(ours(tokens[:, t:t + 1], torch.full((2, 1), t), cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_chunked_prefill_and_ragged_batch_match_transformers(pair):
    """Chunks longer than the window, and rows at different positions in one batch."""
    _, ours, theirs = pair
    tokens = _tokens(2, 30)
    expected = theirs(tokens).logits
    cache = ours.make_cache(batch_size=2, max_len=30)
    got = [ours(tokens[:, s:s + 11], torch.arange(s, min(s + 11, 30)), cache) for s in range(0, 30, 11)]
    torch.testing.assert_close(torch.cat(got, dim=1), expected, atol=1e-5, rtol=1e-5)
    # Row 1 runs 7 positions behind row 0; padding (-1) marks row 1's missing tokens.
    cache = ours.make_cache(batch_size=2, max_len=30)
    pos = torch.stack([torch.arange(0, 20), torch.cat([torch.arange(0, 13), torch.full((7,), -1)])])
    step1 = ours(torch.stack([tokens[0, :20], tokens[1, :20]]), pos, cache)
    torch.testing.assert_close(step1[0], expected[0, :20], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step1[1, :13], expected[1, :13], atol=1e-5, rtol=1e-5)
    for t in range(8):  # row 0 decodes 20.., row 1 decodes 13..
        pos = torch.tensor([[20 + t], [13 + t]])
        tok = torch.stack([tokens[0, 20 + t:21 + t], tokens[1, 13 + t:14 + t]])
        out = ours(tok, pos, cache)
        torch.testing.assert_close(out[0, 0], expected[0, 20 + t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, 0], expected[1, 13 + t], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_last_position_logits(pair):
    _, ours, theirs = pair
    tokens = _tokens(2, 12)
    full = ours(tokens)
    last = ours(tokens, logits_at=torch.tensor([11, 4]))
    assert last.shape == (2, 1, 512)
    torch.testing.assert_close(last[0, 0], full[0, 11])
    torch.testing.assert_close(last[1, 0], full[1, 4])


def test_training_step_gradients_match_transformers(pair):
    """One training step: the next-token loss and every parameter's gradient (the tied embedding's
    included, which collects both its input and its output use) equal transformers' in fp32."""
    name, ours, theirs = pair
    # Past the sliding window. Without id 0: transformers' embedding has padding_idx = <pad> = 0,
    # which drops the input-side gradient of that row; the reference model has no such rule.
    tokens = _tokens(2, 24).clamp_min(1)
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    ce = torch.nn.functional.cross_entropy
    loss = ce(ours(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    ref = ce(theirs(tokens[:, :-1]).logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=0, rtol=1e-6)
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters()}
    mapped = 0
    for n, p in ours.named_parameters():
        want = theirs_grads[hf.to_hf_name(n, name == "gemma1")]
        assert p.grad is not None, n
        # relative to the gradient's own scale (elements near 0 get the same absolute slack)
        torch.testing.assert_close(p.grad, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5, msg=n)
        mapped += 1
    assert mapped == len(theirs_grads)  # every one of theirs (lm_head is tied: one tensor)
