"""Shared helpers of the instruction-tuning tests (test_tune_*.py): a byte-level tokenizer that
speaks Gemma's chat format, so that tiny models (vocabulary 512) can be fine-tuned, scored and
rolled out through the real chat formatter in seconds, and a fixture that keeps tiny-model tests on one thread. No tests here."""

from __future__ import annotations

import pytest
import torch

from opengemma.testing import ByteTokenizer

SOT = 260  # <start_of_turn>; <end_of_turn> is ByteTokenizer's 259


class ChatByteTokenizer(ByteTokenizer):
    """:class:`opengemma.testing.ByteTokenizer` plus ``<start_of_turn>`` (id 260) and ``id_to_piece``."""

    start_of_turn_id = SOT

    def __init__(self):
        super().__init__(extra={SOT: b""})

    def id_to_piece(self, i: int) -> str:
        return {0: "<pad>", 1: "<eos>", 2: "<bos>", 259: "<end_of_turn>", SOT: "<start_of_turn>"}.get(
            i, self.decode([i]))

    def model_bytes(self) -> bytes:
        return b"chat-byte-tokenizer"


@pytest.fixture
def one_thread():
    """One torch thread for the test: on a shared 2-core machine, two threads of tiny matmuls spin
    against other processes (measured: 0.1 s a step with one thread, up to 6 s with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
