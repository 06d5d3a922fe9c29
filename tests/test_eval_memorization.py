"""Memorization evaluation (report section "Memorization Evaluations"): a tiny model over-trained on
a small corpus memorizes it exactly (50-token prompt, 50 greedy tokens) and nothing held out; the
sampling, thresholds and intervals are checked on their own."""

from __future__ import annotations

import random

import pytest

from opengemma.eval import memorization
from opengemma.eval.testing import ByteTokenizer, tiny_gemma


def test_sampling_keeps_only_long_enough_documents():
    docs = [[1] * 99, [1] * 100, [1] * 150, [1] * 10]
    assert memorization.sample_documents(docs, 10) == [1, 2]
    assert memorization.sample_documents(docs, 1, seed=0) == memorization.sample_documents(docs, 1, seed=0)
    assert len(memorization.sample_documents(docs, 1)) == 1


def test_exact_and_approximate_classification():
    target = list(range(50))
    assert memorization.classify(target, target) == (True, True)
    assert memorization.classify([99] * 5 + target[5:], target) == (False, True)  # 5 edits = 10%
    assert memorization.classify([99] * 6 + target[6:], target) == (False, False)


def test_overtrained_tiny_model_memorizes_its_corpus_and_not_held_out_text():
    rnd = random.Random(0)
    # 100 distinct byte tokens per document: memorizable by a 2-layer model in a few dozen steps
    train = [rnd.sample(range(3, 259), 100) for _ in range(4)]
    held = [rnd.sample(range(3, 259), 100) for _ in range(4)]
    g = tiny_gemma("tiny-gemma1", seed=0)
    losses = memorization.overtrain(g.model, [[2] + d for d in train], steps=80, lr=3e-3)
    assert losses[-1] < 0.3 < losses[0]
    tok = ByteTokenizer()
    seen = memorization.evaluate_corpus(g.model, tok, train, n=10)
    unseen = memorization.evaluate_corpus(g.model, tok, held, n=10)
    assert seen["n"] == 4 and seen["exact_rate"] >= 0.75 and seen["approximate_rate"] >= seen["exact_rate"]
    assert unseen["exact_rate"] == 0.0 and unseen["approximate_rate"] == 0.0
    lo, hi = seen["exact_ci95"]
    assert lo <= seen["exact_rate"] <= hi


def test_loss_is_next_token_cross_entropy():
    import torch

    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 100.0  # predicts token 2 at position 1: right
    tokens = torch.tensor([[0, 2, 1]])  # position 2 predicted uniformly: log 4
    assert float(memorization.next_token_loss(logits, tokens)) == pytest.approx((0 + torch.log(torch.tensor(4.0))) / 2)


def test_read_corpus_takes_records_strings_and_text_and_rejects_other_lines(tmp_path):
    from opengemma.errors import OpenGemmaError
    from opengemma.eval.memorization import read_corpus

    recs = tmp_path / "a.jsonl"
    recs.write_text('{"text": "one"}\n\n"two"\n')  # a record, a blank line, a JSON string (oasst prompt files)
    assert read_corpus(recs) == ["one", "two"]
    txt = tmp_path / "b.txt"
    txt.write_text("first line\nsecond\n")
    assert read_corpus(txt) == ["first line", "second"]
    recs.write_text('{"text": "one"}\n{"body": "x"}\n')
    with pytest.raises(OpenGemmaError, match=r"a\.jsonl:2: not a JSON record with a 'text' field"):
        read_corpus(recs)
