"""Tests of opengemma.sampling: greedy, temperature, top-k, top-p, seeding and validation, and
its sort-free paths (inverse CDF, topk candidates, histogram threshold sets, top-p by rejection)
against the definition written plainly with a full sort.

Every random test uses an explicit seeded torch.Generator, so the suite is deterministic.
"""

from __future__ import annotations

import pytest
import torch

from opengemma import sampling
from opengemma.errors import OpenGemmaError
from opengemma.sampling import sample_next_token, sampling_probs


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(b: int = 4, v: int = 50, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, v, generator=_gen(seed)) * 2.0  # [B, V]


def test_greedy_is_argmax_and_consumes_no_randomness():
    x = _logits(8, 100)
    g = _gen(5)
    before = g.get_state().clone()
    out = sample_next_token(x, g, temperature=0.0)
    assert out.dtype == torch.long and out.shape == (8,)
    assert torch.equal(out, x.argmax(-1))
    assert torch.equal(g.get_state(), before)
    # top-k / top-p do not change the argmax.
    assert torch.equal(sample_next_token(x, g, 0.0, top_k=3, top_p=0.5), x.argmax(-1))


def test_per_row_temperature_zero_rows_are_greedy():
    x = _logits(6, 40)
    temp = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 0.7])
    greedy_rows = temp == 0
    for seed in range(20):
        out = sample_next_token(x, _gen(seed), temperature=temp)
        assert torch.equal(out[greedy_rows], x.argmax(-1)[greedy_rows])
    # The sampled rows do vary across seeds (they are not secretly greedy).
    draws = torch.stack([sample_next_token(x, _gen(s), temperature=temp) for s in range(50)])  # [50, B]
    assert all(len(set(draws[:, i].tolist())) > 1 for i in (1, 3, 5))


def test_top_k_never_leaves_the_k_best():
    x = _logits(3, 64)
    k = 5
    best = x.topk(k, dim=-1).indices  # [B, k]
    g = _gen(3)
    for _ in range(300):
        out = sample_next_token(x, g, temperature=5.0, top_k=k)  # high T: all k get drawn
        assert (best == out[:, None]).any(-1).all()
    probs = sampling_probs(x, 1.0, top_k=k)
    assert ((probs > 0).sum(-1) == k).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_top_k_per_row_and_zero_disables():
    x = _logits(3, 30)
    probs = sampling_probs(x, 1.0, top_k=torch.tensor([1, 0, 7]))
    assert (probs > 0).sum(-1).tolist() == [1, 30, 7]
    assert probs[0].argmax() == x[0].argmax()


def test_top_p_keeps_the_smallest_nucleus():
    # Probabilities 0.5, 0.3, 0.15, 0.05 (in a shuffled vocabulary order).
    p = torch.tensor([0.15, 0.5, 0.05, 0.3])
    x = p.log()[None].repeat(5, 1)  # [5, 4]
    top_p = torch.tensor([0.1, 0.5, 0.6, 0.95, 1.0])
    probs = sampling_probs(x, 1.0, top_p=top_p)
    kept = [sorted(torch.nonzero(r).flatten().tolist()) for r in probs]
    # mass 0.5 reaches 0.1 and 0.5; 0.8 reaches 0.6; 0.95 needs 3 tokens (0.5 + 0.3 + 0.15
    # in float may fall a hair short of 0.95, then 4 is the honest answer: accept either).
    assert kept[0] == [1] and kept[1] == [1] and kept[2] == [1, 3]
    assert kept[3] in ([0, 1, 3], [0, 1, 2, 3]) and kept[4] == [0, 1, 2, 3]
    torch.testing.assert_close(probs[2], torch.tensor([0.0, 0.5, 0.0, 0.3]) / 0.8)
    g = _gen(0)
    for _ in range(200):
        out = sample_next_token(x, g, 1.0, top_p=top_p)
        assert out[0] == 1 and out[1] == 1 and out[2] in (1, 3)


def test_top_p_always_keeps_one_token():
    x = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # second row: a three-way tie
    probs = sampling_probs(x, 1.0, top_p=1e-6)
    assert ((probs > 0).sum(-1) == 1).all()
    out = sample_next_token(x, _gen(1), 1.0, top_p=1e-6)
    assert out[0] == 0 and probs[1, out[1]] == 1.0


def test_top_k_then_top_p_compose():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    x = p.log()[None]
    # top_k=3 renormalises to 4/9, 3/9, 2/9; top_p=0.7 then needs 4/9 + 3/9 = 0.78 >= 0.7.
    probs = sampling_probs(x, 1.0, top_k=3, top_p=0.7)
    torch.testing.assert_close(probs[0], torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_empirical_distribution_matches_softmax(temperature):
    # 20000 draws from 10 categories: the standard error of a frequency is at most
    # sqrt(0.25 / 20000) = 0.0035, so 0.015 (> 4 sigma) is a safe, still meaningful tolerance;
    # a chi-square statistic with 9 degrees of freedom must stay below 27.9 (p = 0.001).
    v, n = 10, 20000
    x = torch.randn(1, v, generator=_gen(7))
    expected = torch.softmax(x[0] / temperature, -1)
    torch.testing.assert_close(sampling_probs(x, temperature)[0], expected)
    draws = sample_next_token(x.expand(n, v), _gen(11), temperature=temperature)  # [n]
    freq = torch.bincount(draws, minlength=v).double() / n
    assert (freq - expected.double()).abs().max() < 0.015
    chi2 = ((freq - expected.double()) ** 2 / expected.double()).sum() * n
    assert chi2 < 27.9


def test_low_temperature_concentrates_high_temperature_flattens():
    x = torch.tensor([[2.0, 1.0, 0.0]])
    cold, hot = sampling_probs(x, 0.1)[0], sampling_probs(x, 10.0)[0]
    assert cold[0] > 0.99 and hot.max() - hot.min() < 0.1


def test_same_seed_same_samples_different_seed_differs():
    x = _logits(16, 200)
    a = sample_next_token(x, _gen(42), 1.0, top_k=50, top_p=0.9)
    b = sample_next_token(x, _gen(42), 1.0, top_k=50, top_p=0.9)
    c = sample_next_token(x, _gen(43), 1.0, top_k=50, top_p=0.9)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_does_not_touch_global_rng():
    x = _logits()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    sample_next_token(x, _gen(1), 1.0)
    sample_next_token(x, None, 1.0)
    assert torch.equal(torch.get_rng_state(), state)


def test_half_precision_logits():
    x = _logits().to(torch.bfloat16)
    out = sample_next_token(x, _gen(0), 0.8, top_k=10)
    assert out.dtype == torch.long and out.shape == (4,)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.1),
    dict(temperature=float("nan")),
    dict(temperature=torch.tensor([1.0, -1.0, 1.0, 1.0])),
    dict(top_k=-1),
    dict(top_k=2.5),
    dict(top_k=torch.tensor([1, 2, -3, 4])),
    dict(top_p=0.0),
    dict(top_p=1.5),
    dict(top_p=-0.2),
    dict(top_p=torch.tensor([0.5, 0.5, 0.0, 0.5])),
    dict(temperature=torch.tensor([1.0, 1.0])),  # wrong batch size
])
def test_invalid_arguments_raise(kwargs):
    args = dict(temperature=1.0) | kwargs
    with pytest.raises(OpenGemmaError):
        sample_next_token(_logits(), _gen(0), **args)


def test_logits_must_be_2d():
    with pytest.raises(OpenGemmaError):
        sample_next_token(torch.zeros(2, 1, 5), _gen(0), 1.0)


# -- the candidate implementation against the definition ----------------------------------------

def _oracle(logits: torch.Tensor, temperature, top_k=None, top_p=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition written plainly, row by row, with one full stable sort of the vocabulary (as
    the implementation did before it took candidates from topk): [B, V] probabilities, and [B, V]
    True for tokens whose mass before them is within rounding (1e-6) of top_p, where either
    answer is right."""
    B, V = logits.shape

    def row(value, r):
        return value[r].item() if isinstance(value, torch.Tensor) else value

    out, edge = torch.zeros(B, V), torch.zeros(B, V, dtype=torch.bool)
    for r in range(B):
        t, k, p = row(temperature, r), row(top_k, r), row(top_p, r)
        if t == 0:
            out[r, logits[r].argmax()] = 1.0
            continue
        # float64 throughout: torch.softmax in fp32 may be off by ~1e-6 in total, which moves the
        # edge of a p = 0.999 nucleus by several tokens; the implementation is held to ~1e-7.
        x, order = (logits[r].double() / t).sort(descending=True, stable=True)  # ties: lower id first
        if k:
            x[k:] = float("-inf")
        probs = torch.softmax(x, dim=-1)
        if p is not None and p < 1:
            before = torch.cat([torch.zeros(1, dtype=torch.float64), probs.cumsum(-1)[:-1]])  # mass strictly before
            probs = probs * (before < p)
            probs = probs / probs.sum()
            edge[r, order] = (before - p).abs() < 1e-6
        out[r, order] = probs.float()
    return out, edge


def _assert_same(got: torch.Tensor, want: tuple[torch.Tensor, torch.Tensor]) -> None:
    want, edge = want
    underflow = (got < 1e-30) & (want < 1e-30)  # fp32 vs float64 underflow: nothing kept or lost
    assert not (((got > 0) != (want > 0)) & ~edge & ~underflow).any(), "different tokens kept"
    close = (got - want).abs() <= 1e-6 + 1e-4 * want.abs()  # [B, V]
    assert (close | edge).all(), f"largest difference {float(((got - want).abs() * ~edge).max()):.3g}"


CASES = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.3, top_k=1),
    dict(temperature=1.0, top_k=40),
    dict(temperature=1.0, top_p=0.5),
    dict(temperature=1.0, top_p=0.95),
    dict(temperature=0.8, top_p=0.999),
    dict(temperature=1.0, top_k=300, top_p=0.9),
    dict(temperature=1.0, top_k=7, top_p=0.6),
    dict(temperature=1.0, top_p=1.0),
    dict(temperature=1.0, top_k=0, top_p=1.0),
    dict(temperature=1.0, top_k=16384),  # k >= V: no limit
    dict(temperature=1.0, top_k=9223372036854775808, top_p=0.9),  # 2**63: beyond int64
    dict(temperature=1.0, top_k=10**30),
    dict(temperature=torch.tensor([0.0, 1.0, 0.5, 2.0, 1.0, 0.9]),
         top_k=torch.tensor([5, 0, 2**62, 3, 2999, 64]),  # 2999: k = V for the small vocabulary
         top_p=torch.tensor([0.9, 0.8, 1.0, 0.5, 0.97, 1.0])),
]


@pytest.mark.parametrize("first", [256, 4])  # 4: top-p rows go through the histogram bound
@pytest.mark.parametrize("scale", [0.5, 3.0, 10.0])  # flat .. peaked rows
@pytest.mark.parametrize("vocab", [2999, 16384])  # 16384: topk through block maxima, two-level draws
@pytest.mark.parametrize("case", range(len(CASES)))
def test_distribution_equals_the_sort_definition(case, vocab, scale, first, monkeypatch):
    monkeypatch.setattr(sampling, "FIRST_CANDIDATES", first)
    x = torch.randn(6, vocab, generator=_gen(case * 10 + int(scale))) * scale  # [6, V]
    kw = CASES[case]
    _assert_same(sampling_probs(x, **kw), _oracle(x, **kw))


def _topk_highest_id_first(self, k, dim=-1, largest=True, sorted=True):
    """torch.topk with ties returned highest id first: as legal as any order (topk promises none)."""
    vals, ids = _REAL_TOPK(self, k, dim=dim, largest=largest, sorted=sorted)
    ids, by_id = ids.sort(dim=-1, descending=True)
    vals, order = vals.gather(-1, by_id).sort(dim=-1, descending=largest, stable=True)
    return torch.return_types.topk((vals, ids.gather(-1, order)))


_REAL_TOPK = torch.Tensor.topk


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(top_k=40), dict(top_p=0.3), dict(top_p=0.9),
                                dict(top_k=30, top_p=0.55)])
@pytest.mark.parametrize("topk_ties", ["torch", "highest id first"])
def test_ties_are_broken_by_token_id(kw, topk_ties, monkeypatch):
    if topk_ties != "torch":  # the result must not depend on the order topk gives ties
        monkeypatch.setattr(torch.Tensor, "topk", _topk_highest_id_first)
    # Integer logits: thousands of exact ties, several straddling the top-k / top-p boundaries.
    x = torch.randint(-6, 3, (5, 4096), generator=_gen(3)).float()  # [5, V]
    probs = sampling_probs(x, 1.0, **kw)
    _assert_same(probs, _oracle(x, 1.0, **kw))
    # One row at a time too: in a batch, tie groups of different rows widen each other's
    # candidates, often up to the full-sort fallback; alone, each row keeps to topk candidates.
    _assert_same(torch.cat([sampling_probs(x[r:r + 1], 1.0, **kw) for r in range(5)]), (probs, probs < 0))
    if "top_p" not in kw:
        assert ((probs > 0).sum(-1) == kw["top_k"]).all()  # exactly k survive


def test_huge_top_k_as_tensor_means_no_limit():
    x = _logits(3, 500)
    want = sampling_probs(x, 1.0)
    for k in (torch.tensor([2**63 - 1] * 3), torch.tensor([500, 501, 0])):
        torch.testing.assert_close(sampling_probs(x, 1.0, top_k=k), want)
        assert sample_next_token(x, _gen(0), 1.0, top_k=k).shape == (3,)
    if hasattr(torch, "uint64"):
        k = torch.tensor([2**63, 2**64 - 1, 7], dtype=torch.uint64)
        assert ((sampling_probs(x, 1.0, top_k=k) > 0).sum(-1) == torch.tensor([500, 500, 7])).all()


def test_no_full_vocabulary_sort(monkeypatch):
    # Rows of Gemma's vocabulary size: no filter, top-k, top-p (by rejection, by the first
    # candidates and by the histogram's threshold sets) must all work without sorting them.
    V, FIRST = 262144, sampling.FIRST_CANDIDATES
    x = torch.randn(2, V, generator=_gen(4)) * 4.0  # [2, V]
    sizes = []
    real_sort = torch.Tensor.sort

    def spy(self, *args, **kwargs):
        sizes.append(self.shape[-1])
        return real_sort(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "sort", spy)
    for kw in (dict(), dict(top_k=50), dict(top_p=0.9), dict(top_k=50, top_p=0.9), dict(top_p=0.999),
               dict(top_p=0.3)):
        sample_next_token(x, _gen(0), 1.0, **kw)
    for p in (0.9, 0.999):  # sampling_probs: top-p alone through candidates and the histogram
        assert ((sampling_probs(x, 1.0, top_p=p) > 0).sum(-1) > FIRST).all()
    assert sizes and max(sizes) < V // 2


@pytest.mark.parametrize("kw", [dict(top_k=6), dict(top_p=0.8), dict(top_k=8, top_p=0.9)])
def test_candidate_draws_follow_their_distribution(kw, monkeypatch):
    # Chi-square of 20000 draws against sampling_probs (itself checked against the definition
    # above); a vocabulary of 600 keeps the candidate path (no sort) in use.
    monkeypatch.setattr(sampling, "FIRST_CANDIDATES", 2)  # top-p: the histogram path
    x = torch.randn(1, 600, generator=_gen(8)) * 0.3 - 6.0  # a long, light tail ...
    x[0, :8] = torch.tensor([4.0, 3.5, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0])  # ... few likely tokens, a tie
    n = 20000
    expected = sampling_probs(x, 1.0, **kw)[0].double()
    kept = expected > 0
    assert 2 <= int(kept.sum()) <= 40
    draws = sample_next_token(x.expand(n, -1), _gen(21), 1.0, **kw)  # [n]
    freq = torch.bincount(draws, minlength=x.shape[1]).double() / n
    assert (freq[~kept] == 0).all()
    chi2 = float(((freq - expected)[kept] ** 2 / expected[kept]).sum() * n)
    dof = int(kept.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5 + 10  # far beyond p = 0.001 for these dof


@pytest.mark.parametrize("kw", [dict(), dict(top_k=20), dict(top_p=0.9), dict(top_k=40, top_p=0.7)])
def test_seeded_draws_are_reproducible_on_every_path(kw):
    x = torch.randn(8, 5000, generator=_gen(9)) * 3.0
    a = [sample_next_token(x, _gen(5), 1.0, **kw) for _ in range(2)]
    c = sample_next_token(x, _gen(6), 1.0, **kw)
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], c)


def test_extreme_inputs_stay_safe():
    x = _logits(3, 300)
    # A tiny temperature is greedy in effect, not NaN.
    assert torch.equal(sample_next_token(x, _gen(0), 1e-45, top_p=0.9), x.argmax(-1))
    torch.testing.assert_close(sampling_probs(x, 1e-45), sampling_probs(x, 0.0))
    # Non-finite logits (caught elsewhere) still give ids in range, never an exception here.
    bad = x.clone()
    bad[0, 5], bad[1] = float("nan"), float("-inf")
    for kw in (dict(), dict(top_k=5), dict(top_p=0.5)):
        ids = sample_next_token(bad, _gen(0), 1.0, **kw)
        assert ((ids >= 0) & (ids < 300)).all()
    assert sample_next_token(torch.zeros(0, 10), _gen(0), 1.0).shape == (0,)


@pytest.mark.parametrize("kwargs", [dict(temperature=float("inf")), dict(temperature=10**400),
                                    dict(top_k=True), dict(top_k=torch.tensor([1.0] * 4)),
                                    dict(top_k=torch.tensor([True] * 4)), dict(top_p=float("nan")),
                                    dict(top_p=10**400), dict(temperature="1")])
def test_more_invalid_arguments_raise(kwargs):
    with pytest.raises(OpenGemmaError):
        sample_next_token(_logits(), _gen(0), **(dict(temperature=1.0) | kwargs))


def test_long_rows_draw_in_two_levels_without_bias():
    # V = 5000 is past one DRAW_BLOCK level and not a multiple of the block (padding); heavy
    # tokens sit at block starts and ends, zero weights right after them must never be drawn.
    V, n = 5000, 40000
    w = torch.full((V,), 1e-3)
    heavy = torch.tensor([0, 1022, 1024, 2047, 4094, 4096, 4999])  # +1: zeros, two at block ends
    w[heavy] = torch.tensor([3.0, 1.0, 2.0, 0.5, 1.5, 1.0, 2.5])
    w[heavy[:-1] + 1] = 0.0
    g = _gen(13)
    draws = torch.cat([sampling._draw(w.expand(n // 10, V), g) for _ in range(10)])  # [n], 40 MB at a time
    freq = torch.bincount(draws, minlength=V).double() / n
    expected = w.double() / w.double().sum()
    assert (freq[w == 0] == 0).all()
    light = (w > 0) & (w < 0.01)
    cats = torch.cat([freq[heavy], freq[light].sum()[None]])  # the heavy tokens and the light rest
    want = torch.cat([expected[heavy], expected[light].sum()[None]])
    chi2 = float(((cats - want) ** 2 / want).sum() * n)
    assert chi2 < 26.1  # 7 degrees of freedom, p = 0.0005
    # Zero weights at the very end of a row (the padding's neighbours) are never drawn either.
    w2 = torch.zeros(V)
    w2[V - 3] = 1.0
    assert (sampling._draw(w2.expand(100, V), _gen(2)) == V - 3).all()


def test_search_never_lands_on_a_zero_weight():
    # Weights 0, 0.5, 0.5, 0, 0: a variate rounded up to the total must still land on token 2.
    cdf = torch.tensor([[0.0, 0.5, 1.0, 1.0, 1.0]], dtype=torch.float64)
    for u, want in ((0.0, 1), (0.4999, 1), (0.5, 2), (0.9999, 2), (1.0, 2)):
        assert sampling._search(cdf, torch.tensor([[u]], dtype=torch.float64)).tolist() == [want]


@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 64])
def test_topk_through_block_maxima_equals_topk(n):
    x = torch.randn(3, 64 * sampling.TOP_BLOCK, generator=_gen(n)) * 2.0  # [3, V]: 64 blocks
    x[0, :3 * sampling.TOP_BLOCK] += 5.0  # row 0: the best entries crowd into a few blocks
    vals, ids = sampling._topk(x, n)
    want = x.topk(n, dim=-1)
    assert torch.equal(vals, want.values) and torch.equal(x.gather(1, ids), vals)


@pytest.mark.parametrize("tries", [8, 1, 0])  # 1 and 0: rows the rejection misses take candidates
def test_nucleus_by_rejection_draws_the_nucleus(tries, monkeypatch):
    # Top-p alone with p >= REJECTION_MIN_P draws from the whole row and rejects draws outside
    # the nucleus. Probabilities 0.3, 0.2, 0.2, 0.2, 0.1 and p = 0.6: the nucleus is tokens 0, 1, 2
    # (equal tokens 1, 2, 3 by id), renormalised to 3/7, 2/7, 2/7; token 3 ties but is left out.
    monkeypatch.setattr(sampling, "REJECTION_TRIES", tries)
    p = torch.tensor([0.3, 0.2, 0.2, 0.2, 0.1])
    x = torch.cat([p.log(), torch.full((95,), -30.0)])[None]  # [1, 100]: a negligible tail
    n = 20000
    draws = sample_next_token(x.expand(n, -1), _gen(17), 1.0, top_p=0.6)  # [n]
    freq = torch.bincount(draws, minlength=100).double() / n
    want = torch.zeros(100, dtype=torch.float64)
    want[:3] = torch.tensor([3.0, 2.0, 2.0]) / 7
    torch.testing.assert_close(sampling_probs(x, 1.0, top_p=0.6)[0].double(), want, atol=1e-6, rtol=1e-5)
    assert (freq[3:] == 0).all()
    chi2 = float(((freq[:3] - want[:3]) ** 2 / want[:3]).sum() * n)
    assert chi2 < 15.2  # 2 degrees of freedom, p = 0.0005


def test_mixed_batch_rows_each_follow_their_own_path():
    # One call, four rows, four ways to draw: greedy, top-p by rejection (p >= 0.5), top-k
    # candidates, top-p candidates (p < 0.5). Every draw must lie in its row's distribution.
    x = torch.randn(4, 300, generator=_gen(23)) * 2.0
    kw = dict(temperature=torch.tensor([0.0, 1.0, 1.0, 2.0]), top_k=torch.tensor([0, 0, 5, 0]),
              top_p=torch.tensor([1.0, 0.9, 1.0, 0.3]))
    probs = sampling_probs(x, **kw)  # [4, V]
    assert ((probs[1:] > 0).sum(-1) > 1).all()
    g = _gen(0)
    draws = torch.stack([sample_next_token(x, g, **kw) for _ in range(300)])  # [300, 4]
    assert (probs.gather(1, draws.T) > 0).all()
    assert (draws[:, 0] == x[0].argmax()).all()
    for r in (1, 2, 3):  # the sampled rows are not secretly greedy: several tokens come up
        assert len(set(draws[:, r].tolist())) > 1


def test_chunked_argmax_equals_torch_argmax_with_ties_and_nan():
    gen = torch.Generator().manual_seed(0)
    V = 64 * sampling.ARGMAX_CHUNK * 2
    x = torch.randn(5, V, generator=gen)
    x[1, [7, 3000, V - 1]] = 50.0  # ties: the first index wins
    x[2, 9000] = float("nan")  # NaN counts as the maximum
    x[3] = 0.0  # every value tied
    x[4, V - 1] = 99.0
    for dt in (torch.float32, torch.bfloat16):
        y = x.to(dt)
        assert torch.equal(sampling.argmax(y), y.argmax(dim=-1))
        assert torch.equal(sampling.argmax(y[0]), y[0].argmax(dim=-1))  # one row, [V]
    small = torch.randn(2, 1000, generator=gen)  # not a multiple of the chunk: torch's argmax
    assert torch.equal(sampling.argmax(small), small.argmax(dim=-1))
    assert torch.equal(sample_next_token(x, temperature=0.0), x.argmax(dim=-1))
