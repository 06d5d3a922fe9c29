"""Test helpers for the evaluation harness (report section "Evaluation"): a mock model whose
log-likelihoods are known in closed form, and a tiny random Gemma bundle with the byte tokenizer.

Used by ``tests/test_eval*.py``; nothing here is imported by the harness itself. The tokenizer and
the tiny models are the shared ones of :mod:`opengemma.testing`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache import KVCache
from ..config import PRESETS
from ..model import GemmaModel
from ..testing import BOS, EOS, EOT, PAD, ByteTokenizer

__all__ = ["BOS", "EOS", "EOT", "PAD", "BigramModel", "ByteTokenizer", "tiny_gemma"]


class BigramModel(nn.Module):
    """GemmaModel's interface; the logits after token ``a`` are ``table[a]`` whatever came before, so
    log p(continuation | context) = sum of log_softmax(table[prev])[next]: known exactly. Its
    "hidden state" is the token id itself, which :meth:`head` looks up in the table."""

    def __init__(self, table: torch.Tensor, context_length: int = 4096):
        super().__init__()
        self.table = nn.Parameter(table.float(), requires_grad=False)  # [V, V]
        self.config = PRESETS["tiny-gemma1"].replace(vocab_size=table.shape[0], context_length=context_length,
                                                     final_softcap=None)
        self.embed = None

    def make_cache(self, batch_size, max_len, dtype=None, device=None):
        return KVCache(self.config, batch_size, max_len, dtype=torch.float32)

    def trunk(self, tokens, input_pos=None, cache=None, **_):
        return tokens[..., None].float()  # [B, T, 1]

    def head(self, hidden):
        return self.table[hidden[..., 0].long()]  # [..., V]

    def forward(self, tokens, input_pos=None, cache=None, logits_at=None):
        if logits_at is not None:
            tokens = tokens[torch.arange(tokens.shape[0]), logits_at][:, None]
        return self.table[tokens]  # [B, T, V]

    def loglik(self, context: list[int], continuation: list[int]) -> float:
        """The exact answer the engine must give."""
        lsm = torch.log_softmax(self.table, dim=-1)
        seq = context + continuation
        start = len(context)
        return float(sum(lsm[seq[i - 1], seq[i]] for i in range(start, len(seq))))


def tiny_gemma(name: str = "tiny-gemma3", seed: int = 1, context_length: int = 16384):
    """A tiny random preset (as ``opengemma.load(name, seed=seed)`` makes it: ``init_weights``) with
    the byte tokenizer, as an :class:`opengemma.Gemma`."""
    from ..api import Gemma

    # Byte-level prompts are long: a longer context (RoPE has no limit; only generation checks it).
    config = PRESETS[name].replace(context_length=context_length)
    model = GemmaModel(config).init_weights(torch.Generator().manual_seed(seed)).eval()
    return Gemma(model, ByteTokenizer(), name)
