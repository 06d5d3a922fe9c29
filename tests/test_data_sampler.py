"""Packing and the staged mixture sampler (issue 15, item 6).

Every token in the synthetic shards encodes where it comes from (source * 10**8 + document * 1000
+ offset), so the tests check provenance, document boundaries and token shares from the rows
themselves, not from the sampler's own counters."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opengemma.data.packing import Packer, pack
from opengemma.data.sampler import MixtureSampler, Schedule, check_stages
from opengemma.data.shards import build_shard_set
from opengemma.errors import OpenGemmaError

SOURCES = ["web", "wiki", "code"]
HELD = 50_000  # held-out documents are numbered from here


def _encode(source: int, doc: int, length: int) -> np.ndarray:
    return source * 10**8 + doc * 1000 + np.arange(length)


def _decode(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tokens = np.asarray(tokens, dtype=np.int64)
    return tokens // 10**8, (tokens // 1000) % 10**5, tokens % 1000


# -- packing -----------------------------------------------------------------------------------
def test_pack_small_example():
    rows = list(pack([[10, 11, 12], [20, 21], [30, 31, 32, 33, 34, 35, 36]], seq_len=4))
    assert [r.tokens.tolist() for r in rows] == [[10, 11, 12, 20, 21], [30, 31, 32, 33, 34], [35, 36, 0, 0, 0]]
    assert [r.segment_ids.tolist() for r in rows] == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0, 0, -1, -1, -1]]
    # targets: 11 12 | 20(new doc) 21 ; 31..34 ; 36 | pad pad pad
    assert [r.loss_mask.tolist() for r in rows] == [[True, True, False, True], [True] * 4,
                                                   [True, False, False, False]]
    assert rows[0].inputs.tolist() == [10, 11, 12, 20] and rows[0].targets.tolist() == [11, 12, 20, 21]
    assert rows[2].num_tokens == 2 and rows[0].tokens.dtype == np.int64 and rows[0].segment_ids.dtype == np.int32
    assert list(pack([[1, 2, 3]], 4, drop_last=True)) == []


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(1, 16), st.booleans())
def test_pack_keeps_documents_apart(lengths, seq_len, split):
    docs = [_encode(0, i, n) for i, n in enumerate(lengths)]
    rows = list(pack(docs, seq_len, split_across_rows=split, pad_id=7))
    assert all(len(r.tokens) == seq_len + 1 and len(r.loss_mask) == seq_len for r in rows)
    real = [r.tokens[r.segment_ids >= 0] for r in rows]
    assert np.concatenate(real).tolist() == np.concatenate(docs).tolist()  # every token once, in order
    for k, r in enumerate(rows):
        pad = r.segment_ids < 0
        assert (r.tokens[pad] == 7).all()
        if k < len(rows) - 1 and split:
            assert not pad.any()  # only the last row is padded when documents may be split
        _, doc, off = _decode(r.tokens)
        same_doc_next = (~pad[1:]) & (~pad[:-1]) & (doc[1:] == doc[:-1]) & (off[1:] == off[:-1] + 1)
        assert (r.loss_mask == same_doc_next).all()  # every within-document target, nothing across
        segs = r.segment_ids[~pad]
        assert (np.diff(segs) >= 0).all() and segs[0] == 0 and len(set(segs.tolist())) == segs.max() + 1
        for s in np.unique(segs):  # a segment is one run of one document
            assert len(set(doc[r.segment_ids == s].tolist())) == 1
    if not split:  # documents that fit a row are never cut
        for i, n in enumerate(lengths):
            if n <= seq_len + 1:
                holders = [k for k, r in enumerate(rows) if ((_decode(r.tokens)[1] == i) & (r.segment_ids >= 0)).any()]
                assert len(holders) == 1


def test_long_document_splits_into_segments_of_their_own():
    packer = Packer(4)
    rows = packer.add(np.arange(12))
    assert [r.tokens.tolist() for r in rows] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert packer.flush().segment_ids.tolist() == [0, 0, -1, -1, -1]
    assert packer.flush() is None
    with pytest.raises(OpenGemmaError):
        Packer(0)


# -- the sampler -------------------------------------------------------------------------------
def _build(root, stages, *, heldout=True, lengths=((30, 900), (200, 999), (5, 120)), docs=(300, 40, 400)):
    rng = np.random.default_rng(0)
    sources, held = {}, {}
    for s, (name, (lo, hi), n) in enumerate(zip(SOURCES, lengths, docs)):
        sources[name] = [_encode(s, i, int(rng.integers(lo, hi))) for i in range(n)]
        if heldout and name != "code":
            held[name] = [_encode(s, HELD + i, int(rng.integers(lo, hi))) for i in range(8)]
    return build_shard_set(root, sources, heldout=held, stages=stages, shard_tokens=20_000)


MAIN = {"name": "main", "tokens": 300_000, "weights": {"web": 0.6, "wiki": 0.25, "code": 0.15}}
ANNEAL = {"name": "anneal", "tokens": 200_000, "weights": {"web": 0.2, "wiki": 0.5, "code": 0.3},
          "ramp_tokens": 100_000}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("mix"), [MAIN, ANNEAL])


def _cumulative_targets(tokens: int) -> np.ndarray:
    """float64 [tokens, 3]: the schedule's token targets after 1..tokens tokens, integrated
    numerically token by token (independently of the sampler's closed form)."""
    a, b = np.array([0.6, 0.25, 0.15]), np.array([0.2, 0.5, 0.3])
    t = np.arange(tokens) + 0.5
    x = np.clip((t - 300_000) / 100_000, 0, 1)[:, None]
    w = np.where((t < 300_000)[:, None], a, a + (b - a) * x)
    return np.cumsum(w, axis=0)


def test_shares_track_the_schedule_at_every_step(data):
    s = MixtureSampler(data, seq_len=255, seed=1)
    targets = _cumulative_targets(2200 * 256)
    counts = np.zeros(3)
    worst = 0.0
    for step in range(1, 2200):  # 563k tokens: both stages, the ramp and past the end
        row = next(s)
        src, _, _ = _decode(row.tokens)
        counts += np.bincount(src, minlength=3)
        assert (np.array(row.source)[row.segment_ids] == np.array(SOURCES)[src]).all()  # provenance
        if step >= 100:  # every step is a logged step
            total = step * 256
            target = targets[total - 1] / total
            worst = max(worst, np.abs(counts / total - target).max())
            assert s.realised_tokens() == dict(zip(SOURCES, counts.astype(int).tolist()))
    assert worst <= 0.01, worst
    assert s.stage == "anneal" and s.tokens_seen == 2199 * 256
    assert s.weights() == pytest.approx({"web": 0.2, "wiki": 0.5, "code": 0.3})  # past the end: last stage


def test_ramp_moves_weights_gradually(data):
    sched = Schedule(check_stages([MAIN, ANNEAL], SOURCES))
    assert sched.weights(299_999).tolist() == [0.6, 0.25, 0.15]
    assert sched.weights(350_000) == pytest.approx([0.4, 0.375, 0.225])
    assert sched.weights(10**9).tolist() == [0.2, 0.5, 0.3]
    assert sched.target(450_000) == pytest.approx(_cumulative_targets(450_000)[-1], rel=1e-6)
    s = MixtureSampler(data, seq_len=511, seed=0)
    for _ in range(300_000 // 512):
        next(s)
    wiki = []
    for _ in range(5):  # windows of 20,480 tokens through the 100k-token ramp
        before = s.realised_tokens()["wiki"]
        for _ in range(40):
            next(s)
        wiki.append((s.realised_tokens()["wiki"] - before) / (40 * 512))
    assert all(b > a for a, b in zip(wiki, wiki[1:])) and 0.25 < wiki[0] < wiki[-1] < 0.5


def test_same_seed_same_rows_other_seed_other_order(data):
    a, b, c = (MixtureSampler(data, seq_len=127, seed=k) for k in (5, 5, 6))
    rows_a = [next(a).tokens for _ in range(50)]
    assert all((x == next(b).tokens).all() for x in rows_a)
    assert any((x != next(c).tokens).any() for x in rows_a)


@pytest.mark.parametrize("skip", [37, 1180, 1600])  # mid-stage, in the ramp, past the end
def test_state_dict_restores_exactly(data, skip):
    s = MixtureSampler(data, seq_len=255, seed=3)
    for _ in range(skip):
        next(s)
    state = json.loads(json.dumps(s.state_dict()))  # JSON round trip, as a checkpoint stores it
    expected = [next(s) for _ in range(60)]
    r = MixtureSampler(data, seq_len=255, seed=3)
    r.load_state_dict(state)
    assert r.tokens_seen == skip * 256 and r.stage == ("main" if skip < 1100 else "anneal")
    for row in expected:
        got = next(r)
        assert (got.tokens == row.tokens).all() and (got.segment_ids == row.segment_ids).all()
        assert got.source == row.source
    assert r.realised_shares() == s.realised_shares()


def test_bad_state_is_refused_and_changes_nothing(data):
    s = MixtureSampler(data, seq_len=255, seed=3)
    next(s)
    good = s.state_dict()
    fresh = MixtureSampler(data, seq_len=255, seed=3)
    for bad, message in [({**good, "seq_len": 511}, "seq_len=511"), ({**good, "seed": 4}, "seed=4"),
                         ({**good, "rows": 5}, "do not match"), ({"version": 1}, "malformed"),
                         ({**good, "sources": {**good["sources"], "web": {**good["sources"]["web"], "pos": 10**6}}},
                          "outside source 'web'")]:
        with pytest.raises(OpenGemmaError, match=message):
            fresh.load_state_dict(bad)
        assert fresh.rows == 0 and fresh.state_dict()["sources"]["web"]["pos"] == 0
    heldout = MixtureSampler(data, seq_len=255, seed=3, split="heldout")
    with pytest.raises(OpenGemmaError, match="split"):
        heldout.load_state_dict(good)


def test_epochs_cover_every_document_once_in_a_new_order(tmp_path):
    root = _build(tmp_path, [{"name": "only", "tokens": 10**6, "weights": {"code": 1.0}}], heldout=False)
    s = MixtureSampler(root, seq_len=63, seed=0)
    from opengemma.data.shards import ShardSet

    total = ShardSet.open(root).source("code").num_tokens
    epochs = [[], []]
    drawn = 0
    while drawn < 2 * total:
        row = next(s)
        take = row.tokens[: min(64, 2 * total - drawn)]
        for tok in take.tolist():
            epochs[drawn // total].append(tok)
            drawn += 1
    ref = sorted(np.concatenate(list(ShardSet.open(root).source("code").iter_docs())).tolist())
    assert sorted(epochs[0]) == ref and sorted(epochs[1]) == ref  # each document whole, once per epoch
    order = [list(dict.fromkeys(_decode(np.array(e))[1].tolist())) for e in epochs]
    assert sorted(order[0]) == sorted(order[1]) and order[0] != order[1]
    assert s.epochs()["code"] == pytest.approx(2.0, abs=0.01)


def test_heldout_split_reads_only_heldout_documents(data):
    s = MixtureSampler(data, seq_len=255, seed=0, split="heldout")
    assert s.weights()["code"] == 0  # no held-out code: dropped, the rest renormalized
    assert s.weights()["web"] == pytest.approx(0.6 / 0.85)
    for _ in range(30):
        src, doc, _ = _decode(next(s).tokens)
        assert (doc >= HELD).all() and (src != 2).all()
    again = MixtureSampler(data, seq_len=255, seed=0, split="heldout")
    first = MixtureSampler(data, seq_len=255, seed=0, split="heldout")
    assert all((next(again).tokens == next(first).tokens).all() for _ in range(10))


def test_manifest_without_stages_mixes_by_size(tmp_path):
    root = _build(tmp_path, [])
    s = MixtureSampler(root, seq_len=255)
    from opengemma.data.shards import ShardSet

    sizes = np.array([ShardSet.open(root).source(n).num_tokens for n in SOURCES], dtype=float)
    assert list(s.weights().values()) == pytest.approx((sizes / sizes.sum()).tolist())
    assert s.stage == "natural" and s.target_shares() == s.weights()


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "tokens": 10, "weights": {"web": 0.5, "news": 0.5}}], "unknown source 'news'"),
    ([{"name": "a", "tokens": 10, "weights": {"web": 0.5, "wiki": 0.4}}], "sum to 0.9, not 1"),
    ([{"name": "a", "weights": {"web": 1.0}}], "tokens .* must be a whole number > 0"),
    ([{"name": "a", "tokens": 0, "weights": {"web": 1.0}}], "must be a whole number > 0"),
    ([{"name": "a", "tokens": 10, "weights": {"web": -1.0, "wiki": 2.0}}], "finite number >= 0"),
    ([{"name": "a", "tokens": 10, "weights": {"web": 1.0}, "ramp_tokens": 5}], "needs a previous stage"),
    ([MAIN, {**ANNEAL, "ramp_tokens": 10**7}], "exceeds the stage"),
    ([MAIN, {**MAIN}], "unique"),
    ([], "no stages"),
])
def test_malformed_stages_fail_with_one_line(data, stages, message):
    with pytest.raises(OpenGemmaError, match=message):
        MixtureSampler(data, seq_len=64, stages=stages)


def test_weight_on_a_source_without_documents(tmp_path):
    root = _build(tmp_path, [], docs=(10, 10, 0))
    with pytest.raises(OpenGemmaError, match="without training documents: code"):
        MixtureSampler(root, seq_len=64, stages=[{"name": "a", "tokens": 10, "weights": {"web": 0.5, "code": 0.5}}])
    with pytest.raises(OpenGemmaError, match="split must be"):
        MixtureSampler(root, seq_len=64, split="valid")
