"""The training loop in one process: the fused chunked loss equals naive cross-entropy (loss and
gradients, soft-capped too), accumulation at a fixed global batch does not change the loss, a
micro-batch (or a whole step) without a supervised token gives no NaN, the schedules, and the
batch geometry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from opengemma.config import PRESETS
from opengemma.errors import OpenGemmaError
from opengemma.model import GemmaModel
from opengemma.train.config import TrainConfig, recipe
from opengemma.train.data import Batch
from opengemma.train.loop import LossOutput, fit
from opengemma.train.losses import next_token_loss
from opengemma.train.metrics import read_records
from opengemma.train.schedule import lr_at


def model_of(name="tiny-gemma3", seed=0, **changes):
    cfg = PRESETS[name].replace(**changes) if changes else PRESETS[name]
    return GemmaModel(cfg).init_weights(torch.Generator().manual_seed(seed), std=0.05)


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
def test_chunked_loss_equals_naive_cross_entropy(name):
    """A logits budget of a few rows: the loss runs over several chunks of rows (the last one
    ragged); tiny-gemma2 soft-caps the logits at 30."""
    model = model_of(name, vocab_size=3000)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 3000, (2, 24), generator=g)
    targets = torch.randint(0, 3000, (2, 24), generator=g)
    mask = torch.rand(2, 24, generator=g) > 0.3
    segs = (torch.arange(24) >= 10).int().expand(2, 24)

    out = next_token_loss(model, tokens, targets, mask, segs, budget=4 * 3000 * 2 * 5)  # 5 rows per chunk
    (out.loss_sum / out.count).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(tokens, segment_ids=segs)  # [2, 24, 3000] fp32, soft-capped as the head does
    if name == "tiny-gemma2":
        assert model.config.final_softcap == 30.0 and logits.abs().max() < 30
    naive = F.cross_entropy(logits[mask], targets[mask])
    naive.backward()
    assert abs(float((out.loss_sum / out.count).detach()) - float(naive.detach())) <= 1e-6
    assert int(out.count) == int(mask.sum())
    for n, p in model.named_parameters():
        assert torch.allclose(fused[n], p.grad, atol=1e-6, rtol=0), n


class Rows:
    """A fixed global stream of rows split like RowBatches: ``per_micro`` rows per micro-batch;
    ``empty`` marks global rows that supervise nothing."""

    def __init__(self, per_micro, global_batch=4, T=16, empty=()):
        self.per_micro, self.global_batch, self.T, self.empty, self.step = per_micro, global_batch, T, set(empty), 0

    def row(self, i):
        g = torch.Generator().manual_seed(i)
        toks = torch.randint(3, 40, (self.T + 1,), generator=g)
        mask = torch.zeros(self.T, dtype=torch.bool) if i in self.empty else torch.ones(self.T, dtype=torch.bool)
        return toks, mask

    def next(self, model, step):
        rows = [self.row(step * self.global_batch + i) for i in range(self.global_batch)]
        out = []
        for i in range(0, self.global_batch, self.per_micro):
            chunk = rows[i:i + self.per_micro]
            t = torch.stack([r[0] for r in chunk])
            m = torch.stack([r[1] for r in chunk])
            out.append(Batch(t[:, :-1], t[:, 1:], m, torch.zeros_like(m, dtype=torch.int32), torch.zeros_like(t[:, 1:])))
        return out

    def state_dict(self):
        return {}

    def load_state_dict(self, d):
        pass


def loss_fn(model, b: Batch) -> LossOutput:
    return next_token_loss(model, b.tokens, b.targets, b.loss_mask, b.segment_ids)


CFG = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1, max_steps=3, global_batch=4, seq_len=16)


def test_accumulation_does_not_change_the_loss(tmp_path):
    runs = {}
    for micro in (4, 1):  # 1 micro-batch of 4 rows vs 4 micro-batches of 1 row
        fit(model_of(), Rows(micro), loss_fn, CFG.replace(micro_batch=micro), tmp_path / str(micro), progress=False)
        runs[micro] = [r["loss"] for r in read_records(tmp_path / str(micro))]
    assert len(runs[1]) == 3 and runs[1][-1] < runs[1][0]
    assert max(abs(a - b) for a, b in zip(runs[1], runs[4])) <= 1e-6


def test_micro_batch_without_supervised_tokens(tmp_path):
    """Rows 1 and 2 of each step supervise nothing (two of four micro-batches are empty); every
    row of the second run's step 2 is empty: loss 0 and zero gradient, never NaN."""
    model = model_of()
    fit(model, Rows(1, empty={1, 2, 5, 6}), loss_fn, CFG.replace(micro_batch=1), tmp_path / "a", progress=False)
    recs = read_records(tmp_path / "a")
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in recs)
    assert [r["count"] for r in recs] == [32, 32, 64]
    assert all(torch.isfinite(p).all() for p in model.parameters())

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, Rows(2, empty=range(4)), loss_fn, CFG.replace(micro_batch=2, max_steps=1, weight_decay=0.0),
        tmp_path / "b", progress=False)
    (rec,) = read_records(tmp_path / "b")
    assert rec["loss"] == 0.0 and rec["grad_norm"] == 0.0 and rec["count"] == 0
    for n, p in model.named_parameters():  # Adam with a zero gradient and no decay moves nothing
        assert torch.equal(p, before[n]), n


def test_schedules():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0) and lr_at(109, **kw) == pytest.approx(0.1)
    assert lr_at(60, **kw) == pytest.approx(0.55, abs=0.01)  # half way down the cosine
    wsd = dict(kw, schedule="wsd", decay_steps=20)
    assert lr_at(89, **wsd) == 1.0 and lr_at(109, **wsd) == pytest.approx(0.1)
    assert lr_at(99, **wsd) == pytest.approx(0.55)
    assert lr_at(50, **dict(kw, schedule="constant")) == 1.0


def test_batch_geometry_and_bad_configs():
    assert TrainConfig(micro_batch=2, global_batch=16).resolved(2).grad_accum == 4
    assert TrainConfig(micro_batch=2, grad_accum=3).resolved(2).global_batch == 12
    with pytest.raises(OpenGemmaError, match="multiple of 6"):
        TrainConfig(micro_batch=3, global_batch=16).resolved(2)
    with pytest.raises(OpenGemmaError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(OpenGemmaError, match="unknown training config"):
        TrainConfig.from_dict({"lr": 1e-3, "nope": 1})
    assert recipe("pretrain-small").global_batch == 16
    assert TrainConfig.from_dict(TrainConfig(betas=(0.8, 0.9)).to_dict()) == TrainConfig(betas=(0.8, 0.9))


def test_assert_tied_catches_a_separate_head():
    from opengemma.train.parallel import assert_tied

    model = model_of(vocab_size=64, d_model=64)  # a [V, D] shape every square projection shares
    assert_tied(model)
    model.lm_head = torch.nn.Linear(64, 64, bias=False)
    with pytest.raises(AssertionError, match="lm_head"):
        assert_tied(model)
    model.lm_head.weight = model.embed.weight  # re-tied
    assert_tied(model)
