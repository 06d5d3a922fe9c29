"""Test helpers for the evaluation harness (report section "Evaluation"): a byte-level tokenizer, a
mock model whose log-likelihoods are known in closed form, and a tiny random Gemma bundle.

Used by ``tests/test_eval*.py``; nothing here is imported by the harness itself.
"""

from __future__ import annotations

import codecs

import torch
from torch import nn

from ..config import PRESETS
from ..model import KVCache

PAD, EOS, BOS, EOT = 0, 1, 2, 259  # bytes are ids 3..258


class _Utf8Stream:
    def __init__(self, tok):
        self.tok, self.dec = tok, codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, i: int) -> str:
        return self.dec.decode(self.tok.id_bytes(i))

    def flush(self) -> str:
        return self.dec.decode(b"", final=True)


class ByteTokenizer:
    """Byte-level tokenizer: id = byte + 3; specials PAD 0, EOS 1, BOS 2, <end_of_turn> 259."""

    eos_id, end_of_turn_id, pad_id, bos_id = EOS, EOT, PAD, BOS
    stop_ids = (EOS, EOT)
    vocab_size = 260

    def id_bytes(self, i: int) -> bytes:
        return b"" if i in (PAD, EOS, BOS, EOT) else bytes([(i - 3) % 256])

    def encode_plain(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode()]

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([BOS] if bos else []) + self.encode_plain(text)

    def decode(self, ids) -> str:
        return b"".join(self.id_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> _Utf8Stream:
        return _Utf8Stream(self)


class BigramModel(nn.Module):
    """GemmaModel's interface; the logits after token ``a`` are ``table[a]`` whatever came before, so
    log p(continuation | context) = sum of log_softmax(table[prev])[next]: known exactly."""

    def __init__(self, table: torch.Tensor, context_length: int = 4096):
        super().__init__()
        self.table = nn.Parameter(table.float(), requires_grad=False)  # [V, V]
        self.config = PRESETS["tiny-gemma1"].replace(vocab_size=table.shape[0], context_length=context_length)

    def make_cache(self, batch_size, max_len, dtype=None, device=None):
        return KVCache(self.config, batch_size, max_len, dtype=torch.float32)

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
    """A tiny random preset with the byte tokenizer, as an :class:`opengemma.Gemma`."""
    from ..api import Gemma, load

    g = load(name, dtype="float32", device="cpu", seed=seed)
    # Byte-level prompts are long: a longer context (RoPE has no limit; only generation checks it).
    g.model.config = g.model.config.replace(context_length=context_length)
    return Gemma(g.model, ByteTokenizer(), name)
