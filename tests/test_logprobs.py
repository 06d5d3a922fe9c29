"""The one token-log-prob function: equal to log_softmax over the full logits (and, under
autograd, its gradients equal naive cross-entropy's), soft-capped too, chunk edges included."""

from __future__ import annotations

import pytest
import torch

from opengemma.config import PRESETS
from opengemma.logprobs import from_logits, token_logprobs
from opengemma.testing import tiny_model


def _setup(name, cap=None, seed=0):
    cfg = PRESETS[name].replace(vocab_size=3000, final_softcap=cap)  # vocab: several 1024-wide chunks
    model = tiny_model(cfg, std=0.1, seed=seed)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 3000, (3, 9), generator=g)
    return model, tokens


@pytest.mark.parametrize("cap", [None, 4.0])
def test_inference_path_equals_log_softmax(cap):
    model, tokens = _setup("tiny-gemma2", cap)
    with torch.no_grad():
        h = model.trunk(tokens)
        logits = model(tokens)
        want = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
        lp, greedy = token_logprobs(model, h, tokens, greedy=True, budget=4 * 3000 * 5)  # 5 rows at a time
        torch.testing.assert_close(lp, want, atol=1e-6, rtol=1e-6)
        assert torch.equal(greedy, logits.argmax(-1) == tokens)
        lp2, greedy2, lse = from_logits(logits, tokens)
        torch.testing.assert_close(lp2, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse, torch.logsumexp(logits, -1))


@pytest.mark.parametrize("cap", [None, 4.0])
def test_training_path_equals_naive_cross_entropy(cap):
    model, tokens = _setup("tiny-gemma3", cap, seed=1)
    model.train()
    targets = tokens.roll(1, dims=1)
    targets[0, 3] = int(model(tokens).argmax(-1)[0, 3])  # one target that is the argmax
    mask = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(2)) > 0.3

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    logits = model(tokens)
    naive_lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    naive = grads(-(naive_lp * mask).sum())
    # budget for a 1024-wide chunk: 3000 = 1024 + 1024 + 952, the last one ragged
    lp, greedy = token_logprobs(model, model.trunk(tokens), targets, greedy=True, budget=4 * 27 * 1024)
    torch.testing.assert_close(lp.detach(), naive_lp.detach(), atol=1e-6, rtol=1e-6)
    assert torch.equal(greedy, logits.argmax(-1) == targets) and greedy[0, 3]
    fused = grads(-(lp * mask).sum())
    for n in naive:  # through the whole network: 1e-5 of each gradient's scale (fp32 rounding)
        torch.testing.assert_close(fused[n], naive[n], atol=1e-5 * float(naive[n].abs().max()), rtol=1e-5, msg=n)
    # the function's own gradients (hidden states and head) within 1e-6
    h = model.trunk(tokens).detach().requires_grad_(True)
    w = model.embed.weight
    lp = token_logprobs(model, h, targets, budget=4 * 27 * 1024)
    got = torch.autograd.grad(-(lp * mask).sum(), (h, w))
    naive_lp = torch.log_softmax(model.head(h), -1).gather(-1, targets[..., None])[..., 0]
    want = torch.autograd.grad(-(naive_lp * mask).sum(), (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_training_path_in_bf16_is_close():
    model, tokens = _setup("tiny-gemma1", None, seed=3)
    model = model.to(torch.bfloat16).train()
    lp = token_logprobs(model, model.trunk(tokens), tokens, budget=4 * 27 * 1024)
    naive = torch.log_softmax(model(tokens), -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(lp, naive, atol=2e-2, rtol=2e-2)
    lp.sum().backward()
    assert model.embed.weight.grad.dtype == torch.bfloat16 and torch.isfinite(model.embed.weight.grad).all()
