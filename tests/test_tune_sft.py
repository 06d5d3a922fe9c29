"""SFT data: conversation readers and their counted skips, the chat loss mask (gradients only from
model turns), packing with document masks equal to unpacked training, over-long examples, the
filters (PII, toxicity, self-identification, duplicates) and the held-out split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_tune_helpers import ChatByteTokenizer, one_thread  # noqa: F401 (fixture)

from opengemma.chat import format_chat
from opengemma.testing import tiny_model
from opengemma.train import prefs, sft
from opengemma.train.data import collate
from opengemma.train.losses import next_token_loss

pytestmark = pytest.mark.usefixtures("one_thread")
TOK = ChatByteTokenizer()


def _conv(q, a, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_conversation_readers_and_counted_skips(tmp_path):
    f = tmp_path / "conv.jsonl"
    recs = [
        {"messages": _conv("hi", "hello")},
        {"messages": [{"role": "user", "content": "a"}, {"role": "model", "content": "b"}]},  # model alias
        {"question": "2 apples and 3 more?", "answer": "2 + 3 = <<2+3=5>>5 apples.\n#### 5"},  # GSM8K
        {"prompt": "Say x", "completion": "x"},
        {"instruction": "Reverse", "instances": [{"input": "ab", "output": "ba"}]},
        {"messages": [{"role": "bot", "content": "x"}]},  # unknown role
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},  # empty turn
        {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]},  # not alternating
        {"messages": [{"role": "user", "content": "x"}]},  # nothing to learn
        {"text": "plain"},  # unknown format
    ]
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n[1, 2\n")
    convs, skips = prefs.read_conversations(f)
    assert len(convs) == 5
    assert convs[1][-1] == {"role": "model", "content": "b"}
    assert convs[2][-1]["content"] == "2 + 3 = 5 apples.\nThe answer is 5."
    assert convs[4][0]["content"] == "Reverse\n\nab"
    assert dict(skips.counts) == {"unknown_role": 1, "empty_turn": 1, "not_alternating": 1, "no_model_turn": 1,
                                  "unknown_format": 1, "bad_json": 1}


def test_oasst_thread_follows_best_ranked_usable_replies():
    tree = {"message_tree_id": "t", "prompt": {"role": "prompter", "text": "Q1", "replies": [
        {"role": "assistant", "text": "second", "rank": 1, "replies": []},
        {"role": "assistant", "text": "first", "rank": 0, "replies": [
            {"role": "prompter", "text": "Q2", "replies": [
                {"role": "assistant", "text": "deleted", "deleted": True, "replies": []}]}]}]}}
    conv = prefs.oasst_thread(tree, prefs.Skips(), "x")
    # the deleted reply is cut, and with it the dangling user turn
    assert conv == [{"role": "user", "content": "Q1"}, {"role": "model", "content": "first"}]


def _row_inputs(ct):
    ids = torch.tensor([ct.ids])
    return ids[:, :-1], ids[:, 1:], torch.tensor([ct.mask[1:]], dtype=torch.bool)


def _grads(model, *args, **kw):
    model.zero_grad(set_to_none=True)
    out = next_token_loss(model, *args, **kw)
    out.loss_sum.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_only_model_turns_drive_the_gradient():
    """Replacing every target outside model turns (user, system, template tokens) leaves the loss and
    the gradients bitwise unchanged; rewriting a user turn after the last model turn leaves them unchanged too."""
    model = tiny_model("tiny-gemma3").train()
    conv = _conv("What is 2+2?", "4, of course.", system="Be brief.")
    ct = format_chat(TOK, conv, add_generation_prompt=False)
    x, y, m = _row_inputs(ct)
    out, g = _grads(model, x, y, m)
    assert int(out.count) == len(TOK.encode_plain("4, of course.")) + 1  # the reply and its <end_of_turn>
    y2 = torch.where(m, y, torch.randint(3, 250, y.shape, generator=torch.Generator().manual_seed(1)))
    out2, g2 = _grads(model, x, y2, m)
    assert torch.equal(out.loss_sum, out2.loss_sum) and all(torch.equal(g[k], g2[k]) for k in g)
    longer = [format_chat(TOK, conv + [{"role": "user", "content": u}], add_generation_prompt=False) for u in ("a", "zz")]
    (x3, y3, m3), (x4, y4, m4) = _row_inputs(longer[0]), _row_inputs(longer[1])
    out3, g3 = _grads(model, x3, y3, m3)
    out4, g4 = _grads(model, x4, y4, m4)
    # (different lengths change the float order of the weight-gradient sums: equal to 1e-6, not bitwise)
    assert torch.equal(out3.loss_sum, out4.loss_sum)
    assert all((g3[k] - g4[k]).abs().max() < 1e-6 for k in g3)


def test_batch_without_model_tokens_gives_zero_loss_and_no_nan():
    model = tiny_model("tiny-gemma3").train()
    ct = format_chat(TOK, [{"role": "user", "content": "only a question"}], add_generation_prompt=False)
    x, y, m = _row_inputs(ct)
    assert not m.any()
    out, g = _grads(model, x, y, m)
    assert float(out.loss_sum.detach()) == 0.0 and int(out.count) == 0
    assert all(torch.isfinite(t).all() and not t.any() for t in g.values())


def test_packed_rows_equal_unpacked_training():
    """Three conversations packed in one row (document masks, positions restarting) give the same
    summed loss and gradients as the three trained one by one, within 1e-6 in fp32."""
    model = tiny_model("tiny-gemma3", std=0.05).train()
    convs = [_conv("hi", "hello!"), _conv("What is 3*3?", "9."), _conv("Name a color", "Blue, like the sky.")]
    examples, skips = sft.encode(TOK, convs, 256)
    rows = sft.pack_examples(examples, 200)
    assert len(rows) == 1 and skips.total == 0
    b = collate(rows, ())
    packed, gp = _grads(model, b.tokens, b.targets, b.loss_mask, b.segment_ids)
    total, gsum, count = 0.0, None, 0
    for ex in examples:
        ids = torch.tensor(ex.ids)[None]
        out, g = _grads(model, ids[:, :-1], ids[:, 1:], torch.tensor(ex.mask[1:], dtype=torch.bool)[None])
        total += float(out.loss_sum.detach())
        count += int(out.count)
        gsum = g if gsum is None else {k: gsum[k] + g[k] for k in g}
    assert int(packed.count) == count
    assert abs(float(packed.loss_sum) / count - total / count) < 1e-6
    for k in gp:
        assert (gp[k] / count - gsum[k] / count).abs().max() < 1e-6, k


def test_overlong_examples_are_truncated_or_dropped_and_counted():
    convs = [_conv("q" * 10, "a" * 200), _conv("q" * 120, "a" * 10), _conv("hi", "ok")]
    ex, skips = sft.encode(TOK, convs, 64, overlong="truncate")
    assert len(ex) == 2 and all(len(e.ids) <= 64 for e in ex)
    assert dict(skips.counts) == {"truncated": 1, "overlong_no_target": 1}
    ex, skips = sft.encode(TOK, convs, 64, overlong="drop")
    assert len(ex) == 1 and dict(skips.counts) == {"overlong_dropped": 2}


def test_filters_remove_and_report():
    convs = [
        _conv("Who are you?", "I am ChatGPT, a large language model trained by OpenAI."),
        _conv("Who are you?", "I'm a helpful assistant."),
        _conv("Who are you?", "I'm a helpful assistant."),  # exact duplicate
        _conv("Mail?", "Write to jane.doe@example.com please."),  # personal: redacted
        _conv("Card?", "Use 4111 1111 1111 1111 for the payment."),  # sensitive: dropped
        _conv("What do you think of ChatGPT?", "Tools such as ChatGPT are popular."),  # not self-identification
    ]
    kept, rep = sft.filter_conversations(convs, ("pii", "selfid", "dedup"), pii_policy={"sensitive": "drop"})
    assert dict(rep.removed) == {"pii": 1, "selfid": 1, "dedup": 1}
    assert rep.redacted["pii"] == 1 and rep.kept == 3 == len(kept)
    assert any("[EMAIL]" in c[-1]["content"] for c in kept)
    assert "I am ChatGPT" in rep.examples["selfid"][0]


def test_toxicity_filter_drops_toxic_replies():
    pytest.importorskip("profanity_check")
    convs = [_conv("Hi", "Hello, how can I help you today?"),
             _conv("Hi", "Shut up you stupid f***ing idiot, you worthless piece of shit.")]
    kept, rep = sft.filter_conversations(convs, ("toxicity",))
    assert rep.removed["toxicity"] == 1 and kept == convs[:1]


def test_heldout_split_is_stable_and_near_its_share():
    ex, _ = sft.encode(TOK, [_conv(f"question {i}", f"answer {i}") for i in range(2000)], 256)
    held = [sft.in_heldout(e.ids, 10.0) for e in ex]
    assert 0.07 < sum(held) / len(held) < 0.13
    assert held[::-1] == [sft.in_heldout(e.ids, 10.0) for e in ex[::-1]]  # order does not matter
    assert not any(sft.in_heldout(e.ids, 0.0) for e in ex)


def test_prepare_reports_everything(tmp_path):
    convs = [_conv(f"q{i}", f"a{i} " * (i % 7 + 1)) for i in range(60)] + [_conv("q1", "a1 a1 ")]
    data = sft.prepare(TOK, convs, 64, skips=prefs.Skips(), filters=("dedup",), heldout_pct=20.0)
    r = data.report
    assert r["filters"]["removed"] == {"dedup": 1}
    assert r["train_examples"] + r["heldout_examples"] == 60 and r["heldout_examples"] > 0
    assert r["supervised_tokens"] == sum(int(np.sum(row.loss_mask)) for row in data.train)
