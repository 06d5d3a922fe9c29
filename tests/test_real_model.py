"""The embedded Gemma 3 270M: opengemma vs transformers' own loading of the same GGUF, in fp32.

Both sides dequantize the same Q4_K_M file, so the weights are the same numbers and the outputs
must agree closely: identical token ids, last-position logits within 1e-3, identical greedy text.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away,",
    "Q: What is 12 * 7?\nA:",
]
MIXED = "Hello  world\n\n\tdigits 12345 café naïve Ünïcödé 🙂🚀 <start_of_turn>user\nhi<end_of_turn>\n  end"


def test_config_read_from_the_file(real_gemma):
    from opengemma.config import PRESETS

    assert real_gemma.config.replace(name="gemma3-270m") == PRESETS["gemma3-270m"]


@pytest.mark.parametrize("text", PROMPTS + [MIXED])
def test_same_token_ids(real_gemma, hf_gguf_tokenizer, text):
    assert real_gemma.tokenizer.encode(text, bos=True) == hf_gguf_tokenizer(text).input_ids


@torch.no_grad()
def test_last_position_logits(real_gemma, hf_gguf_model, hf_gguf_tokenizer):
    for text in PROMPTS + [MIXED]:
        ids = torch.tensor([hf_gguf_tokenizer(text).input_ids])
        expected = hf_gguf_model(ids).logits[0, -1]
        got = real_gemma.model(ids)[0, -1]
        assert (got - expected).abs().max().item() < 1e-3, text


@torch.no_grad()
def test_greedy_continuations_identical(real_gemma, hf_gguf_model, hf_gguf_tokenizer):
    for text in PROMPTS:
        ids = torch.tensor([hf_gguf_tokenizer(text).input_ids])
        out = hf_gguf_model.generate(ids, max_new_tokens=24, do_sample=False)
        expected = hf_gguf_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        got = real_gemma.generate(text, max_new_tokens=24)
        # transformers stops at EOS too; compare the text both produced before any stop.
        assert got == expected, text


@torch.no_grad()
def test_batched_equals_one_by_one(real_gemma):
    batched = real_gemma.generate(PROMPTS, max_new_tokens=16)
    singles = [real_gemma.generate(p, max_new_tokens=16) for p in PROMPTS]
    assert batched == singles
