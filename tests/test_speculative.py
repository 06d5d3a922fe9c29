"""Tests of opengemma.speculative: drafts, the acceptance rule, rollback, and the decode loop.

* The prompt-lookup drafter against a brute-force scan of the context.
* Greedy: speculative tokens equal plain decoding's on tiny random models (exactly: their argmax
  margins dwarf float noise) and on the embedded 270M (up to counted near-ties), with drafts that
  are partly rejected, past the sliding window.
* Rollback: after a speculative run with rejections, the KV cache holds, position by position,
  the keys and values plain decoding holds, and no rejected position.
* Sampling: the emitted tokens follow the target distribution, by chi-square tests over seeded
  draws (deterministic, so they cannot flake), on the rule alone and end to end on a tiny model;
  a test of the naive rule (draw from p on rejection, x included) shows the tests can fail.
* Text: stop tokens, stop strings, budgets and streamed pieces are those of plain decoding.
"""

from __future__ import annotations

import pytest
import torch
from test_generate import MIN_MARGIN, FakeTokenizer, PoisonedModel, ids_of, naive_greedy, prompt, scripted

from opengemma.errors import OpenGemmaError
from opengemma.generate import (GenerationConfig, GenerationStats, NonFiniteLogitsError, RowState, decode_step,
                                generate, generate_tokens, prefill, stream)
from opengemma.sampling import sampling_probs
from opengemma.speculative import Drafter, PromptLookupDrafter, run_speculative, verify
from opengemma.testing import BOS, EOT, tiny_model

P_THRESHOLD = 1e-3  # chi-square tests fail below this p-value (seeded: a given outcome, not a flake)


# -- helpers ----------------------------------------------------------------------------------

class OracleDrafter:
    """Proposes the true continuation (``truth``: the whole expected sequence) with one token
    spoiled on most calls: call c spoils draft c % (k + 1) (none when that is k), so runs see
    full acceptances, rejections at every offset, and rollbacks. Records what it was asked."""

    def __init__(self, truth: list[int], vocab: int):
        self.truth, self.vocab, self.calls, self.asked = truth, vocab, 0, []

    def propose(self, context_ids, k):
        self.asked.append((len(context_ids), k))
        assert list(context_ids) == self.truth[:len(context_ids)]  # the drafter sees the real context
        out = self.truth[len(context_ids):len(context_ids) + k]
        bad = self.calls % (k + 1)
        self.calls += 1
        if bad < len(out):
            out = list(out)
            out[bad] = (out[bad] + 1 + self.calls) % self.vocab
        return out


def spec_tokens(model, p: list[int], n: int, drafter: Drafter | None = None, stop_ids=frozenset(),
                stats: GenerationStats | None = None, **kw) -> list[int]:
    gen = GenerationConfig(max_new_tokens=n, **kw)
    return [t[0] for t in generate_tokens(model, [p], gen, stop_ids, drafter=drafter, stats=stats)]


def chi_square_p(counts: dict, probs: dict, min_expected: float = 5.0) -> float:
    """Pearson's chi-square goodness of fit p-value of observed ``counts`` {outcome: n} against
    ``probs`` {outcome: p}; outcomes expected fewer than ``min_expected`` times are pooled into
    one cell (the usual validity condition). An observed outcome of probability 0 gives p = 0."""
    n = sum(counts.values())
    if any(probs.get(o, 0.0) <= 0 for o in counts):
        return 0.0
    cells, pooled_obs, pooled_exp = [], 0.0, 0.0
    for o, p in probs.items():
        if n * p >= min_expected:
            cells.append((counts.get(o, 0), n * p))
        else:
            pooled_obs, pooled_exp = pooled_obs + counts.get(o, 0), pooled_exp + n * p
    if pooled_exp > 0:
        cells.append((pooled_obs, pooled_exp))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    # The chi-square survival function: the regularized upper incomplete gamma Q(df/2, stat/2).
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


# -- the prompt-lookup drafter -------------------------------------------------------------------

def brute_force_lookup(ids: list[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """The drafter's definition, by scanning: latest earlier occurrence of the last n tokens,
    n from max_ngram down; its continuation copied (over its own start past the end)."""
    L = len(ids)
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        for j in range(L - n - 1, -1, -1):
            if ids[j:j + n] == ids[L - n:]:
                out, start = [], j + n
                for i in range(start, start + k):
                    out.append(ids[i] if i < L else out[i - L])
                return out
    return []


def test_prompt_lookup_proposes_the_latest_continuation():
    d = PromptLookupDrafter(max_ngram=3, min_ngram=1)
    ctx = [1, 2, 3, 9, 1, 2, 3, 8, 5, 1, 2, 3]
    # (1, 2, 3) last occurred before at 4..6: its continuation 8 5 1 2 3, then copied on: 8 5.
    assert d.propose(ctx, 7) == [8, 5, 1, 2, 3, 8, 5]
    assert d.propose(ctx, 2) == [8, 5]
    assert d.propose(ctx, 0) == []
    # The longest n-gram wins over a more recent shorter one: (4, 5) -> 6, not (5,) -> 7.
    assert d.propose([4, 5, 6, 0, 5, 7, 4, 5], 1) == [6]
    assert d.propose([1, 2, 3], 4) == []  # nothing repeats
    assert PromptLookupDrafter(max_ngram=3, min_ngram=2).propose([7, 1, 8, 2, 1], 3) == []  # one token is not enough
    assert d.propose([7, 7, 7], 5) == [7, 7, 7, 7, 7]  # a period-1 loop yields k tokens
    with pytest.raises(ValueError):
        PromptLookupDrafter(max_ngram=1, min_ngram=2)


@pytest.mark.parametrize("max_ngram, min_ngram", [(3, 1), (4, 2)])
def test_prompt_lookup_index_matches_a_scan(max_ngram, min_ngram):
    # The incremental index gives the scan's proposal at every length of a growing sequence
    # (a small alphabet: many matches of every length), and a context that is not an extension
    # of the last one is indexed afresh.
    seq = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    d = PromptLookupDrafter(max_ngram, min_ngram)
    for L in range(1, len(seq) + 1):
        assert d.propose(seq[:L], 6) == brute_force_lookup(seq[:L], 6, max_ngram, min_ngram), L
    other = seq[::-1][:50]
    assert d.propose(other, 6) == brute_force_lookup(other, 6, max_ngram, min_ngram)
    assert d.propose(tuple(seq[:80]), 6) == brute_force_lookup(seq[:80], 6, max_ngram, min_ngram)


# -- greedy: the same tokens ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-gemma1", "tiny-gemma2", "tiny-gemma3"])
def test_greedy_speculation_equals_plain_decoding(name):
    # Window 8 (tiny-gemma2/3): 40 tokens after a 7-token prompt wrap the ring several times,
    # with drafts rejected at every offset.
    model = tiny_model(name)
    p = prompt(21, 7)
    margins: list[float] = []
    plain = naive_greedy(model, p, 40, margins)
    assert min(margins) > MIN_MARGIN  # exact comparison is meaningful: no near-tie
    for k, drafter in ((4, OracleDrafter(p + plain, 512)), (3, None), (1, OracleDrafter(p + plain, 512))):
        stats = GenerationStats()
        assert spec_tokens(model, p, 40, drafter, speculate=k, stats=stats) == plain
        assert stats.generated_tokens == 40 and stats.speculate == k
        if drafter is not None:
            assert 0 < stats.accepted < stats.drafted  # some drafts kept, some rolled back
            assert stats.forwards < 39  # fewer forwards than tokens
            assert stats.tokens_per_forward == pytest.approx(39 / stats.forwards)


class ModelProxy:
    """A model seen through a hook on every forward: what generation reads of a model (config,
    final_norm for the device, make_cache) and a call that runs ``seen(pos, cache, logits)``."""

    def __init__(self, model):
        self.model, self.config, self.final_norm = model, model.config, model.final_norm

    def make_cache(self, *a, **kw):
        return self.model.make_cache(*a, **kw)

    def __call__(self, tokens, pos, cache, logits_at=None):
        self.before(pos, cache)
        logits = self.model(tokens, pos, cache, logits_at=logits_at)
        self.after(logits)
        return logits

    def before(self, pos, cache):
        pass

    def after(self, logits):
        pass


class CacheChecked(ModelProxy):
    """Checks before every forward that the cache holds exactly the positions before the
    forward's first one (no rejected draft left) and, in the sliding-window ring, at least the
    window before it."""

    checked = 0

    def before(self, pos, cache):
        start, window = int(pos[0, 0]), self.config.sliding_window
        if start > 0:
            assert set(cache.pos_global[0].tolist()) - {-1} == set(range(start)), start
            ring = set(cache.pos_local[0].tolist()) - {-1}
            assert ring <= set(range(start)) and set(range(max(0, start - window), start)) <= ring, start
            self.checked += 1


class GapRecorder(ModelProxy):
    """Records, for each forward, the top-2 logit gap of its last row: in plain decoding, the
    margin of each sampled token."""

    def __init__(self, model):
        super().__init__(model)
        self.gaps: list[float] = []

    def after(self, logits):
        top = logits[0, -1].topk(2).values
        self.gaps.append(float(top[0] - top[1]))


def test_rollback_leaves_the_cache_as_plain_decoding():
    # tiny-gemma3 (window 8) in fp32, 40 speculative tokens with rejections: before every forward
    # the cache holds exactly the positions fed so far (CacheChecked), and at the end at every
    # position a plain run has written the same key and value, even though its ring has window + k
    # slots (compared by position, not by slot).
    model, k, n = tiny_model("tiny-gemma3"), 4, 40
    p = prompt(22, 5)
    plain = naive_greedy(model, p, n)
    drafter = OracleDrafter(p + plain, 512)
    with torch.inference_mode():
        spec_cache = model.make_cache(1, 64, spare=k)
    row, stats, checked = RowState(p, n), GenerationStats(), CacheChecked(model)
    out = [ev.tokens[0] for ev in run_speculative(checked, row, GenerationConfig(max_new_tokens=n, speculate=k),
                                                  drafter=drafter, stats=stats, cache=spec_cache)]
    assert out == plain and 0 < stats.accepted < stats.drafted and checked.checked == stats.forwards
    end = len(p) + n - 1  # positions 0..end-1 were fed; the last token never is
    with torch.inference_mode():
        plain_cache = model.make_cache(1, 64)
        prefill(model, plain_cache, [p])
        for i, t in enumerate(plain[:-1]):
            decode_step(model, torch.tensor([[t]]), torch.tensor([[len(p) + i]]), plain_cache)
    assert spec_cache.ring == 8 + k and plain_cache.ring == 8
    window = model.config.sliding_window
    for layer in range(model.config.n_layers):
        local = model.config.is_local(layer)
        kept = range(end - window + 1, end) if local else range(end)  # what the next query may see
        caches = []
        for c in (spec_cache, plain_cache):
            pos = (c.pos_local if local else c.pos_global)[0, :-1]  # [slots], the trash slot left out
            slots = {int(q): s for s, q in enumerate(pos.tolist()) if q >= 0}
            assert max(slots) == end - 1  # nothing rejected is left, nothing beyond
            assert set(kept) <= set(slots)
            idx = torch.tensor([slots[q] for q in kept])
            caches.append((c.k[layer][0][:, idx], c.v[layer][0][:, idx]))
        # Keys/values computed in a multi-token forward vs one token at a time: the same math in
        # another order, equal to fp32 rounding.
        torch.testing.assert_close(caches[0], caches[1], atol=1e-5, rtol=1e-5)


def test_embedded_model_greedy_speculation_matches_plain(real_gemma):
    # Prompt lookup on the embedded 270M (fp32): 4 prompts x 48 tokens, one of them repetitive.
    # A verification forward computes logits in another order than single steps (max |diff|
    # measured ~5e-5); tokens may then differ only where plain decoding's top-2 logit gap is
    # below NEAR_TIE, and such steps are counted and bounded.
    NEAR_TIE = 1e-3
    g = real_gemma
    prompts = ["Days of the week: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.\n"
               "Days of the week: Monday, Tuesday,",
               "The capital of France is Paris. The capital of Germany is Berlin. The capital of",
               "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
               "Once upon a time, in a small village by the sea, there lived"]
    near_ties = accepted = 0
    for text in prompts:
        ids = g.tokenizer.encode(text, bos=True)
        rec = GapRecorder(g.model)
        plain = spec_tokens(rec, ids, 48)
        stats = GenerationStats()
        spec = spec_tokens(g.model, ids, 48, speculate=8, stats=stats)
        accepted += stats.accepted
        near_ties += sum(gap < NEAR_TIE for gap in rec.gaps[:len(plain)])
        if spec != plain:
            first = next(i for i, (a, b) in enumerate(zip(spec, plain)) if a != b)
            assert rec.gaps[first] < NEAR_TIE, (text, first, rec.gaps[first])
    assert near_ties <= 4  # of 192 steps
    assert accepted >= 20  # prompt lookup did hit (the repetitive prompts)


def test_quantized_greedy_speculation_matches_plain(gguf_path):
    # mixed mode (int8 weights, the screened head), bf16 activations: the packed kernels score each
    # row of a verification forward as they score it alone (tests/test_quant.py), so tokens equal
    # plain greedy decoding's except where attention's other summation order meets a near-tie.
    import opengemma

    g = opengemma.load(gguf_path, quantize="mixed", dtype="bfloat16", device="cpu")
    ids = g.tokenizer.encode("Days of the week: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, "
                             "Sunday.\nDays of the week: Monday,", bos=True)
    rec = GapRecorder(g.model)
    plain = spec_tokens(rec, ids, 12)
    stats = GenerationStats()
    spec = spec_tokens(g.model, ids, 12, speculate=8, stats=stats)
    if spec != plain:
        first = next(i for i, (a, b) in enumerate(zip(spec, plain)) if a != b)
        assert rec.gaps[first] < 0.25, (first, rec.gaps[first])  # two bf16 spacings at the top logits
    assert stats.accepted >= 4 and stats.forwards < 11  # 11 tokens after the prefill's


# -- sampling: the same distribution ------------------------------------------------------------

def _spread_logits(T: int, V: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, V, generator=g) * 2.0  # [T, V]: a few likely tokens, a long tail


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=6),
                                dict(temperature=1.3, top_p=0.8)], ids=["plain", "top_k", "top_p"])
def test_verify_sampling_follows_the_target_distribution(kw):
    # Drafts: row 0's most likely token (kept often) and row 1's 4th most likely (kept seldom).
    # Over N seeded verifications the first emitted token must follow row 0's distribution, and
    # the second, after a kept first draft, row 1's.
    T, V, N = 3, 24, 4000
    logits = _spread_logits(T, V, seed=5)
    probs = sampling_probs(logits, kw["temperature"], kw.get("top_k"), kw.get("top_p"))  # [T, V]
    drafts = [int(probs[0].argmax()), int(probs[1].argsort(descending=True)[3])]
    assert 0.1 < probs[0, drafts[0]] < 0.9 and probs[1, drafts[1]] < 0.2
    gen, g = GenerationConfig(speculate=2, **kw), torch.Generator().manual_seed(1234)
    first = verified_counts(logits, probs, lambda: (drafts, None), gen, g, N)
    p0 = {i: float(x) for i, x in enumerate(probs[0])}
    # The naive rule (on rejection draw from p, the draft included) gives x probability
    # p + (1 - p) p: the same counts must fail against that, or this test could not fail.
    px = p0[drafts[0]]
    naive = {i: (p + (1 - px) * px if i == drafts[0] else (1 - px) * p) for i, p in p0.items()}
    assert chi_square_p(first, naive) < P_THRESHOLD


def verified_counts(logits, probs, drafts_of, gen, g, n: int) -> dict:
    """Over ``n`` verifications of ``drafts_of() -> (two drafts, their q or None)``, checks that
    the first emitted token follows ``probs[0]`` and the second, after a kept first draft,
    ``probs[1]`` (chi-square); returns the first tokens' counts."""
    first: dict = {}
    second: dict = {}
    for _ in range(n):
        drafts, q = drafts_of()
        out = verify(logits, drafts, gen, g, q)
        assert out.complete and len(out.tokens) == out.accepted + 1
        first[out.tokens[0]] = first.get(out.tokens[0], 0) + 1
        if out.accepted >= 1:
            second[out.tokens[1]] = second.get(out.tokens[1], 0) + 1
    for counts, row in ((first, probs[0]), (second, probs[1])):
        assert chi_square_p(counts, {i: float(x) for i, x in enumerate(row)}) > P_THRESHOLD
    return first


def test_verify_handles_impossible_and_certain_drafts():
    logits = _spread_logits(3, 24, seed=6)
    gen, g = GenerationConfig(temperature=1.0, top_k=3, speculate=2), torch.Generator().manual_seed(0)
    probs = sampling_probs(logits, 1.0, 3)
    outside = int(probs[0].argmin())  # probability 0 after top-k: always rejected
    for _ in range(50):
        out = verify(logits, [outside, 0], gen, g)
        assert out.accepted == 0 and probs[0, out.tokens[0]] > 0 and out.tokens[0] != outside
    one = GenerationConfig(temperature=1.0, top_k=1, speculate=2)  # a one-hot target: always kept
    best = logits.argmax(dim=-1).tolist()
    assert verify(logits, best[:2], one, g).tokens == best


def test_speculative_sampling_end_to_end_follows_the_model():
    # tiny-gemma1, temperature 1, top-k 4: the first three tokens of N seeded generations, with a
    # drafter proposing the model's most likely next token and then its 4th most likely, against
    # the model's own joint distribution p(t1) p(t2 | t1) p(t3 | t1, t2) from full forwards.
    model, N = tiny_model("tiny-gemma1"), 1200
    p = prompt(23, 6)
    kw = dict(temperature=1.0, top_k=4)
    dist = model_dist(model, **kw)

    class Forced:
        def propose(self, context_ids, k):
            a = int(dist(tuple(context_ids)).argmax())
            b = int(dist(tuple(context_ids) + (a,)).argsort(descending=True)[3])
            return [a, b][:k]

    counts: dict = {}
    for seed in range(N):
        out = spec_tokens(model, p, 4, Forced(), speculate=2, seed=seed, **kw)
        counts[tuple(out[:3])] = counts.get(tuple(out[:3]), 0) + 1
    assert chi_square_p(counts, joint_of_three(dist, tuple(p))) > P_THRESHOLD


def model_dist(model, **kw):
    """``dist(context tuple) -> [V]``: the model's sampling distribution (``kw``: temperature,
    top_k, top_p) after a context, from a full forward, memoized."""
    memo: dict = {}

    def dist(ctx: tuple) -> torch.Tensor:
        if ctx not in memo:
            with torch.no_grad():
                memo[ctx] = sampling_probs(model(torch.tensor([list(ctx)]))[0, -1:], **kw)[0]  # [V]
        return memo[ctx]

    return dist


def joint_of_three(dist, prefix: tuple) -> dict:
    """{(t1, t2, t3): p(t1) p(t2 | t1) p(t3 | t1, t2)} after ``prefix``, ``dist(context) -> [V]``."""
    expected = {}
    p1 = dist(prefix)
    for t1 in torch.nonzero(p1).squeeze(1).tolist():
        p2 = dist(prefix + (t1,))
        for t2 in torch.nonzero(p2).squeeze(1).tolist():
            p3 = dist(prefix + (t1, t2))
            for t3 in torch.nonzero(p3).squeeze(1).tolist():
                expected[(t1, t2, t3)] = float(p1[t1] * p2[t2] * p3[t3])
    return expected


# -- text, stops, budgets, errors ----------------------------------------------------------------

class ScriptDrafter:
    """Proposes the model's script (so drafts run into stop tokens and past them), spoiling the
    second draft of every third call."""

    def __init__(self, script: list[int], prompt_len: int):
        self.script, self.prompt_len, self.calls = script, prompt_len, 0

    def propose(self, context_ids, k):
        done = len(context_ids) - self.prompt_len
        out = list(self.script[done:done + k])
        self.calls += 1
        if self.calls % 3 == 0 and len(out) > 1:
            out[1] = 3
        return out


@pytest.mark.parametrize("script, stop, n", [
    (ids_of("abc") + [EOT] + ids_of("zzz"), (), 10),  # a stop token among the drafts
    (ids_of("Hello, wor") + [300, 301] + ids_of("more"), ("STOP",), 30),  # a stop string across tokens
    (ids_of("xSTbcST"), ("STOP",), 7),  # held-back text, released at the budget
    (ids_of("abcdefghijklmnop"), (), 9),  # the budget ends a run of accepted drafts
])
def test_stops_budgets_and_streaming_match_plain(script, stop, n):
    tok = FakeTokenizer()
    gen = GenerationConfig(max_new_tokens=n, stop=stop)
    plain_model = scripted([script], [1])
    plain = list(stream(plain_model, tok, [[BOS]], gen))
    spec_model = scripted([script], [1])
    spec = list(stream(spec_model, tok, [[BOS]], GenerationConfig(max_new_tokens=n, stop=stop, speculate=4),
                       drafter=ScriptDrafter(script, 1)))
    assert spec == plain  # the same pieces, step by step
    done = generate(scripted([script], [1]), tok, [[BOS]], GenerationConfig(max_new_tokens=n, stop=stop, speculate=4),
                    drafter=ScriptDrafter(script, 1))
    assert done == generate(scripted([script], [1]), tok, [[BOS]], gen)
    assert len(spec_model.fed) < len(plain_model.fed)  # fewer forwards
    assert max(int(f.max()) for f in spec_model.fed) <= n - 1  # never a position past the budget


def test_several_prompts_decode_plainly_with_the_same_result():
    model = tiny_model("tiny-gemma3")
    prompts = [prompt(24, 5), prompt(25, 9)]

    class Never:
        def propose(self, context_ids, k):
            raise AssertionError("no drafts for a batch")

    stats = GenerationStats()
    gen = GenerationConfig(max_new_tokens=12, speculate=4)
    batched = list(generate_tokens(model, prompts, gen, drafter=Never(), stats=stats))
    assert batched == list(generate_tokens(model, prompts, GenerationConfig(max_new_tokens=12)))
    assert stats.speculate == 0 and stats.generated_tokens == 24 and stats.forwards == 11


@pytest.mark.parametrize("temperature", [0.0, 0.05])
def test_nonfinite_logits_in_a_verification_raise_at_their_step(temperature):
    # Call 1 is the prefill (token 1), call 2 verifies two good drafts (tokens 2-4), call 3 is NaN.
    # (Temperature 0.05 makes the scripted token certain, so the sampling path takes it too.)
    script = ids_of("abcdefgh")
    model = PoisonedModel([script], [1], {0: (3, float("nan"))})
    seen = []
    gen = GenerationConfig(max_new_tokens=8, temperature=temperature, seed=0, speculate=2)
    with pytest.raises(NonFiniteLogitsError, match=r"at step 5: "):
        for ev in generate_tokens(model, [[BOS]], gen, drafter=ScriptDrafter(script, 1)):
            seen.append(ev[0])
    assert seen == script[:4]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_verify_stops_before_a_nonfinite_row(temperature):
    logits = torch.zeros(3, 16)
    logits[0, 5] = logits[1, 7] = 30.0
    logits[2] = float("nan")
    gen, g = GenerationConfig(temperature=temperature, speculate=2), torch.Generator().manual_seed(0)
    out = verify(logits, [5, 7], gen, g)  # both drafts kept (p ~ 1); the bonus row is NaN
    assert (out.tokens, out.accepted, out.complete) == ([5, 7], 2, False)
    out = verify(logits, [5, 9], gen, g)  # the second draft is rejected: its row is finite
    assert (out.tokens, out.accepted, out.complete) == ([5, 7], 1, True)


def test_bad_speculation_settings_and_drafts():
    for bad in (-1, 65, 1.5, True, "4"):
        with pytest.raises(OpenGemmaError, match="speculate"):
            GenerationConfig(speculate=bad)
    model = tiny_model("tiny-gemma1")

    class Wild:
        def propose(self, context_ids, k):
            return [600]  # outside the 512-token vocabulary

    with pytest.raises(ValueError, match="outside the vocabulary of 512"):
        spec_tokens(model, [BOS, 5], 6, Wild(), speculate=3)

    class Greedy:
        def __init__(self):
            self.asked = []

        def propose(self, context_ids, k):
            self.asked.append(k)
            return [7] * 50  # far more than asked: cut to k

    d = Greedy()
    stats = GenerationStats()
    assert len(spec_tokens(model, [BOS, 5], 6, d, speculate=3, stats=stats)) == 6
    assert max(d.asked) <= 3 and stats.drafted <= sum(d.asked)
