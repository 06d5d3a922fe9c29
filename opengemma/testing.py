"""Shared test helpers: tiny random Gemma models and a byte-level tokenizer.

Used by the test suite and by the evaluation harness's test helpers (``opengemma.eval.testing``);
nothing in the library imports it. The tokenizer has the interface of
:class:`opengemma.tokenizer.Tokenizer` that generation, serving and evaluation use (``encode``,
``decode``, ``id_bytes``, the special ids, ``stop_ids`` and an incremental ``stream_decoder``),
over bytes: id = byte + 3, with Gemma's PAD 0, EOS 1, BOS 2 and ``<end_of_turn>`` 259.
"""

from __future__ import annotations

import codecs

import torch

from .config import PRESETS, GemmaConfig
from .model import GemmaModel

PAD, EOS, BOS, EOT = 0, 1, 2, 259  # bytes are ids 3..258
SPECIALS = (PAD, EOS, BOS, EOT)


def tiny_model(name: str | GemmaConfig = "tiny-gemma3", dtype: torch.dtype = torch.float32, seed: int = 1,
               std: float = 0.2) -> GemmaModel:
    """A tiny preset (or config) with seeded N(0, ``std``^2) weights, norm weights included,
    without touching the global RNG, in eval mode. The default std 0.2 spreads the logits
    (std ~ 8 * 0.2 for the tiny presets) so that argmax margins dwarf float noise."""
    config = PRESETS[name] if isinstance(name, str) else name
    model = GemmaModel(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.to(dtype).eval()


class _Utf8Stream:
    def __init__(self, tok: ByteTokenizer):
        self.tok, self.dec = tok, codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, i: int) -> str:
        return self.dec.decode(self.tok.id_bytes(i))

    def flush(self) -> str:
        return self.dec.decode(b"", final=True)


class ByteTokenizer:
    """Byte-level tokenizer: id = byte + 3, the specials of :data:`SPECIALS`, and optional ``extra``
    multi-byte pieces {id: bytes} (ids >= 260) that ``decode`` knows but ``encode`` never makes."""

    eos_id, end_of_turn_id, pad_id, bos_id = EOS, EOT, PAD, BOS
    stop_ids = (EOS, EOT)

    def __init__(self, extra: dict[int, bytes] | None = None):
        self.extra = dict(extra or {})
        self.vocab_size = max([EOT, *self.extra]) + 1

    def id_bytes(self, i: int) -> bytes:
        if i in self.extra:
            return self.extra[i]
        return b"" if i in SPECIALS else bytes([(i - 3) % 256])

    def encode_plain(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode()]

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([BOS] if bos else []) + self.encode_plain(text)

    def decode(self, ids) -> str:
        return b"".join(self.id_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> _Utf8Stream:
        return _Utf8Stream(self)
