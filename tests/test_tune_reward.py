"""Reward model: the Bradley-Terry loss against a reference formula and TRL's RewardTrainer, a tiny
model learning a planted preference, pair readers and their counted skips, RM files and scoring."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_tune_helpers import ChatByteTokenizer, one_thread  # noqa: F401 (fixture)

from opengemma.errors import OpenGemmaError
from opengemma.testing import tiny_model
from opengemma.train import prefs, reward
from opengemma.train.config import TrainConfig
from opengemma.train.loop import fit

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(rc, rr, margin, center):
    """-log(sigmoid(rc - rr - m)) + c (rc + rr)^2 in float64, written out from the definition."""
    rc, rr = np.asarray(rc, np.float64), np.asarray(rr, np.float64)
    d = rc - rr - (np.asarray(margin, np.float64) if margin is not None else 0.0)
    return np.log1p(np.exp(-d)) + center * (rc + rr) ** 2


@pytest.mark.parametrize("margin", [None, "random"])
@pytest.mark.parametrize("center", [0.0, 0.01])
def test_bradley_terry_matches_reference_formula(margin, center):
    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(64, generator=g) * 3, torch.randn(64, generator=g) * 3
    m = torch.rand(64, generator=g) if margin else None
    ours = reward.bradley_terry(rc, rr, m, center)
    ref = _reference(rc.numpy(), rr.numpy(), None if m is None else m.numpy(), center)
    assert np.abs(ours.double().numpy() - ref).max() < 1e-6


class _HFOutput(SimpleNamespace):
    pass


class _AsHF(torch.nn.Module):
    """Our RewardModel behind the call signature TRL's compute_loss uses."""

    def __init__(self, rm):
        super().__init__()
        self.rm = rm

    def forward(self, input_ids, attention_mask, use_cache=False, **_):
        return _HFOutput(logits=self.rm(input_ids, attention_mask.sum(1))[:, None])


@pytest.mark.parametrize("center", [None, 0.01])
@pytest.mark.parametrize("with_margin", [False, True])
def test_loss_equals_trl_reward_trainer_compute_loss(center, with_margin):
    trl = pytest.importorskip("trl")
    tok = ChatByteTokenizer()
    rm = reward.RewardModel(tiny_model("tiny-gemma3"), generator=torch.Generator().manual_seed(3)).eval()
    pairs = [prefs.Pair([{"role": "user", "content": f"q{i}"}, {"role": "model", "content": "yes" * (i + 1)}],
                        [{"role": "user", "content": f"q{i}"}, {"role": "model", "content": "no"}],
                        0.5 * i if with_margin else None) for i in range(4)]
    enc = reward.encode_pairs(tok, pairs, 256, prefs.Skips())
    batch = reward.collate_pairs(enc)
    ours = reward.rm_loss(center or 0.0)(rm, batch)
    ours_mean = ours.loss_sum / ours.count
    T = batch.tokens.shape[1]
    attn = (torch.arange(T)[None] < batch.lengths[:, None]).long()
    inputs = {"input_ids": batch.tokens, "attention_mask": attn}
    if with_margin:
        inputs["margin"] = batch.margin
    fake = SimpleNamespace(model=SimpleNamespace(training=False),
                           args=SimpleNamespace(center_rewards_coefficient=center),
                           accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    theirs = trl.RewardTrainer.compute_loss(fake, _AsHF(rm), inputs)
    assert abs(float(ours_mean.detach()) - float(theirs.detach())) < 1e-6


def _keyword_pairs(n: int, seed: int):
    """Pairs whose replies differ by one keyword: 'good' (chosen) vs 'poor' (rejected, the same length), at a random
    place in random filler, after a random question."""
    rng = random.Random(seed)
    words = ["red", "blue", "cat", "tree", "sun", "river", "stone", "milk", "door", "song"]
    out = []
    for _ in range(n):
        filler = [rng.choice(words) for _ in range(rng.randint(2, 5))]
        k = rng.randint(0, len(filler))
        q = [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(3)) + "?"}]
        ch = " ".join(filler[:k] + ["good"] + filler[k:])
        rj = " ".join(filler[:k] + ["poor"] + filler[k:])
        out.append(prefs.Pair(q + [{"role": "model", "content": ch}], q + [{"role": "model", "content": rj}]))
    return out


def test_tiny_reward_model_learns_planted_preference(tmp_path):
    """One keyword decides the preference; after 60 steps of 8 pairs the held-out accuracy is >= 95%
    (it starts near chance: asserted too, so the test can fail)."""
    torch.manual_seed(0)
    tok = ChatByteTokenizer()
    skips = prefs.Skips()
    train = reward.encode_pairs(tok, _keyword_pairs(256, 1), 128, skips)
    held = reward.encode_pairs(tok, _keyword_pairs(200, 2), 128, skips)
    assert skips.total == 0
    rm = reward.RewardModel(tiny_model("tiny-gemma3", std=0.02), generator=torch.Generator().manual_seed(0))
    before = reward.accuracy(*reward.pair_rewards(rm.eval(), held))
    cfg = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=5, max_steps=60, micro_batch=8, seq_len=128,
                      weight_decay=0.0, seed=0)
    src = reward.PairBatches(train, global_batch=8, micro_batch=8, seed=0)
    res = fit(rm.train(), src, reward.rm_loss(), cfg, tmp_path / "run", progress=False)
    after = reward.accuracy(*reward.pair_rewards(rm.eval(), held))
    assert before < 0.8
    assert after >= 0.95, (before, after, res.record)
    # the baselines cannot see the keyword: same length, and near chance for an untrained LM
    assert reward.length_baseline(held) == 0.5


def test_pair_readers_and_counted_skips(tmp_path):
    f = tmp_path / "pairs.jsonl"
    same = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    recs = [
        {"chosen": same, "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]},
        {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}], "margin": 1.5},
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
        {"chosen": "\n\nHuman: hey\n\nAssistant: hi there", "rejected": "\n\nHuman: hey\n\nAssistant: no"},
        {"chosen": same, "rejected": same},  # identical sides
        {"chosen": [{"role": "robot", "content": "x"}], "rejected": same},  # unknown role
        {"chosen": "\n\nHuman: hey\n\nAssistant: ", "rejected": "\n\nHuman: hey\n\nAssistant: no"},  # empty turn
    ]
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n{not json\n")
    pairs, skips = prefs.read_pairs(f)
    assert len(pairs) == 4
    assert pairs[1].margin == 1.5 and pairs[1].chosen[0] == {"role": "user", "content": "2+2?"}
    assert pairs[2].chosen == [{"role": "user", "content": "Capital of France?"}, {"role": "model", "content": "Paris"}]
    assert pairs[3].rejected[-1] == {"role": "model", "content": "no"}
    assert dict(skips.counts) == {"identical_sides": 1, "unknown_role": 1, "empty_turn": 1, "bad_json": 1}


def test_oasst_ranked_siblings_become_pairs():
    tree = {"message_tree_id": "t", "prompt": {"role": "prompter", "text": "Q?", "replies": [
        {"role": "assistant", "text": "best", "rank": 0, "replies": []},
        {"role": "assistant", "text": "worst", "rank": 2, "replies": []},
        {"role": "assistant", "text": "middle", "rank": 1, "replies": []},
        {"role": "assistant", "text": "synthetic", "rank": 3, "synthetic": True, "replies": []}]}}
    pairs = prefs.oasst_pairs(tree, prefs.Skips(), "x")
    got = {(p.chosen[-1]["content"], p.rejected[-1]["content"]) for p in pairs}
    assert got == {("best", "middle"), ("best", "worst"), ("middle", "worst")}


def test_reward_model_files_and_scoring(tmp_path, tokenizer):
    from opengemma.config import PRESETS

    cfg = PRESETS["tiny-gemma3"].replace(vocab_size=tokenizer.vocab_size, name="tiny-rm")
    rm = reward.RewardModel(tiny_model(cfg), generator=torch.Generator().manual_seed(0))
    convs = [[{"role": "user", "content": "hi"}, {"role": "model", "content": "hello"}],
             [{"role": "user", "content": "hi"}, {"role": "model", "content": "go away, I am busy"}]]
    expected = reward.score(rm, tokenizer, convs)
    reward.save(tmp_path / "rm", rm, tokenizer.model_bytes(), center=0.01)
    loaded, tok = reward.load(tmp_path / "rm")
    assert reward.score(loaded, tok, convs) == pytest.approx(expected, abs=1e-6)
    assert len(set(expected)) == 2 and all(math.isfinite(x) for x in expected)
    with pytest.raises(OpenGemmaError, match="not a reward model"):
        reward.load(tmp_path)
    (tmp_path / "rm" / reward.HEAD_FILE).write_bytes(b"garbage")
    with pytest.raises(OpenGemmaError, match="corrupt"):
        reward.load(tmp_path / "rm")


def test_rm_reward_refuses_another_vocabulary(tmp_path, tokenizer):
    from opengemma.config import PRESETS
    from opengemma.train.rl import RMReward

    cfg = PRESETS["tiny-gemma3"].replace(vocab_size=tokenizer.vocab_size, name="tiny-rm")
    reward.save(tmp_path / "rm", reward.RewardModel(tiny_model(cfg)), tokenizer.model_bytes())
    with pytest.raises(OpenGemmaError, match="vocabulary"):
        RMReward(tmp_path / "rm", PRESETS["tiny-gemma3"], ChatByteTokenizer())


def test_reward_model_as_side_by_side_judge(tmp_path, tokenizer):
    """`eval --sxs --judge RM`: the higher reward wins in both orders; rewards closer than the tie
    margin tie; the records carry (test, baseline) rewards equal to `opengemma reward`'s."""
    from opengemma.config import PRESETS
    from opengemma.eval import sxs

    cfg = PRESETS["tiny-gemma3"].replace(vocab_size=tokenizer.vocab_size, name="tiny-rm")
    reward.save(tmp_path / "rm", reward.RewardModel(tiny_model(cfg), generator=torch.Generator().manual_seed(1)),
                tokenizer.model_bytes())
    judge = sxs.RewardJudge(tmp_path / "rm")
    prompts, test, base = ["hi", "what is 2+2?", "tell me a joke"], ["hello", "4", "no"], ["go away", "5", "a pun"]
    res = sxs.side_by_side(prompts, test, base, judge, seed=3)
    for p, t, b, rec in zip(prompts, test, base, res["records"], strict=True):
        rt, rb = judge.rewards(p, [t, b])
        assert rec["rewards"] == pytest.approx([rt, rb], abs=1e-6)
        assert rec["outcome"] == ("win" if rt > rb else "loss")  # an order-blind judge never ties by position
    assert res["win"] + res["loss"] == 3
    wide = sxs.RewardJudge(tmp_path / "rm", tie_margin=1e9)
    assert sxs.side_by_side(prompts, test, base, wide)["tie"] == 3
