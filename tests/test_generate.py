"""Tests of opengemma.generate: batching, caching, stops, streaming, holdback, errors.

Two kinds of model are used:
* tiny presets (tiny-gemma1/2/3) with seeded random weights, for the numerics: cached batched
  decoding must reproduce a naive loop of full forwards, past the sliding window too;
* a scripted fake model with the same forward signature, whose logits force known tokens, for
  the text logic (stop ids, stop strings across token boundaries, holdback, counts).
A byte-level fake tokenizer stands in for the real one (same interface: encode/decode, eos_id,
end_of_turn_id, pad_id, stop_ids, a stream decoder with push/flush).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from opengemma.config import PRESETS
from opengemma.errors import OpenGemmaError
from opengemma.generate import (CACHE_ROUND, GenerationConfig, GenerationStats, NonFiniteLogitsError, RowState,
                                cache_length, decode_step, generate, generate_tokens, prefill, stream, stream_text)
from opengemma.cache import KVCache
from opengemma.model import GemmaModel
from opengemma.testing import BOS, EOS, EOT, ByteTokenizer, tiny_model

# -- fakes ------------------------------------------------------------------------------------

EXTRA = {300: b"ST", 301: b"OP", 302: b"Hel", 303: b"lo ", 304: "é".encode()}


def FakeTokenizer() -> ByteTokenizer:
    """Byte-level (id = byte + 3), plus a few multi-byte pieces (EXTRA)."""
    return ByteTokenizer(extra=EXTRA)


def ids_of(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]


class ScriptedModel(nn.Module):
    """Same interface as GemmaModel; the logits at position q of row b put all mass on
    ``script[b][q - prompt_len_b]`` (EOS past the script). Records every input_pos it is fed."""

    def __init__(self, scripts: list[list[int]], prompt_lens: list[int], context_length: int = 256):
        super().__init__()
        self.config = PRESETS["tiny-gemma1"].replace(context_length=context_length)
        self.scripts, self.prompt_lens = scripts, prompt_lens
        self.fed: list[torch.Tensor] = []
        self.caches = 0

    def make_cache(self, batch_size, max_len, dtype=None, device=None):
        self.caches += 1
        return KVCache(self.config, batch_size, max_len, dtype=torch.float32)

    def forward(self, tokens, input_pos=None, cache=None, logits_at=None):
        B, T = tokens.shape
        self.fed.append(input_pos.clone())
        pos = input_pos if logits_at is None else input_pos[torch.arange(B), logits_at][:, None]  # [B, T']
        out = torch.zeros(B, pos.shape[1], self.config.vocab_size)
        for b in range(B):
            for t in range(pos.shape[1]):
                k = int(pos[b, t]) - self.prompt_lens[b] + 1
                script = self.scripts[b]
                out[b, t, script[k] if 0 <= k < len(script) else EOS] = 10.0
        return out


def naive_greedy(model: GemmaModel, prompt: list[int], n: int, margins: list[float] | None = None) -> list[int]:
    """Reference: argmax of a full forward (no cache) over the whole sequence, n times.
    Appends each step's top-1 minus top-2 logit to ``margins`` if given."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1]  # [V]
            if margins is not None:
                top = logits.topk(2).values
                margins.append(float(top[0] - top[1]))
            seq.append(int(logits.argmax()))
    return seq[len(prompt):]


# Float32 results of different batch shapes / cached vs uncached paths differ by ~1e-6 here; the
# exact token comparisons below are only meaningful (and never flaky) if no argmax is that close.
MIN_MARGIN = 1e-3


def run_tokens(model, prompts, n, stop_ids=frozenset(), **kw) -> list[list[int]]:
    out = [[] for _ in prompts]
    for step in generate_tokens(model, prompts, GenerationConfig(max_new_tokens=n, **kw), stop_ids):
        for i, t in enumerate(step):
            if t is not None:
                out[i].append(t)
    return out


def prompt(seed: int, n: int) -> list[int]:
    return [BOS] + torch.randint(3, 512, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


# -- numerics with real tiny models ---------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-gemma1", "tiny-gemma2", "tiny-gemma3"])
def test_greedy_equals_naive_full_forward_past_the_window(name):
    # Window 8 for tiny-gemma2/3: 40 new tokens after a 13-token prompt wrap the ring many times.
    model = tiny_model(name)
    p = prompt(1, 13)
    margins: list[float] = []
    assert run_tokens(model, [p], 40) == [naive_greedy(model, p, 40, margins)]
    assert min(margins) > MIN_MARGIN


@pytest.mark.parametrize("name", ["tiny-gemma1", "tiny-gemma2", "tiny-gemma3"])
def test_batched_equals_one_by_one(name):
    # Ragged prompts (shorter and longer than the window) in one batch must give each row the
    # tokens it gets alone, and the naive uncached loop agrees with both.
    model = tiny_model(name)
    prompts = [prompt(2, 3), prompt(3, 17), prompt(4, 1), prompt(5, 9)]
    batched = run_tokens(model, prompts, 24)
    single = [run_tokens(model, [p], 24)[0] for p in prompts]
    assert batched == single
    margins: list[float] = []
    assert single == [naive_greedy(model, p, 24, margins) for p in prompts]
    assert min(margins) > MIN_MARGIN


def test_batched_logits_match_single_logits():
    # The same claim at the logit level, independent of argmax margins: teacher-force one row's
    # tokens through a batched cache and a single-row cache and compare every step's logits.
    model = tiny_model("tiny-gemma3")
    prompts = [prompt(13, 11), prompt(14, 4), prompt(15, 20)]
    cont = torch.randint(3, 512, (3, 16), generator=torch.Generator().manual_seed(16))  # [3, 16]
    with torch.no_grad():
        cb = model.make_cache(3, 64)
        batched = [prefill(model, cb, prompts)]
        for t in range(16):
            pos = torch.tensor([[len(p) + t] for p in prompts])  # [3, 1]
            batched.append(decode_step(model, cont[:, t:t + 1], pos, cb))
        for i, p in enumerate(prompts):
            cs = model.make_cache(1, 64)
            single = [prefill(model, cs, [p])]
            for t in range(16):
                single.append(decode_step(model, cont[i:i + 1, t:t + 1], torch.tensor([[len(p) + t]]), cs))
            for b, s in zip(batched, single):
                torch.testing.assert_close(b[i], s[0], atol=1e-4, rtol=1e-4)


def test_batched_equals_one_by_one_float32_with_stop_ids():
    # Rows finish at different steps (a frequent token is made a stop id): finished rows are fed
    # position -1 and must not disturb the others.
    model = tiny_model("tiny-gemma3")
    prompts = [prompt(6, 5), prompt(7, 12), prompt(8, 2)]
    free = [run_tokens(model, [p], 20)[0] for p in prompts]
    stop = {t for t in free[1] if t != free[1][0]}  # row 1 stops at its first change of token
    expect = [f[:next((j + 1 for j, t in enumerate(f) if t in stop), len(f))] for f in free]
    assert len({len(e) for e in expect}) > 1  # rows really do finish at different steps
    batched = run_tokens(model, prompts, 20, stop)
    assert batched == expect  # the stop id is yielded, then the row is done
    assert batched == [run_tokens(model, [p], 20, stop)[0] for p in prompts]


def test_chunked_prefill_matches_one_forward():
    model = tiny_model("tiny-gemma3")
    prompts = [prompt(9, 30), prompt(10, 7), None]
    c1, c2 = model.make_cache(3, 64), model.make_cache(3, 64)
    with torch.no_grad():
        full = prefill(model, c1, prompts, chunk_size=512)
        chunked = prefill(model, c2, prompts, chunk_size=4)
        torch.testing.assert_close(chunked[:2], full[:2])
        ref = model(torch.tensor([prompts[0]]))[0, -1]
        torch.testing.assert_close(full[0], ref)
        # The caches then decode identically.
        tok = full.argmax(-1)[:, None]  # [3, 1]
        pos = torch.tensor([[30], [7], [-1]])
        torch.testing.assert_close(decode_step(model, tok, pos, c2)[:2], decode_step(model, tok, pos, c1)[:2])
    assert (c1.pos_global[2] == -1).all()  # the None row was not written


def test_sampling_is_seeded_and_reproducible():
    model = tiny_model("tiny-gemma2")
    p = [prompt(11, 6), prompt(12, 4)]
    kw = dict(temperature=1.0, top_k=50, top_p=0.95)
    a = run_tokens(model, p, 16, seed=123, **kw)
    b = run_tokens(model, p, 16, seed=123, **kw)
    c = run_tokens(model, p, 16, seed=124, **kw)
    assert a == b and a != c
    state = torch.get_rng_state()
    run_tokens(model, p, 4, **kw)  # seed None: os.urandom, global RNG untouched
    assert torch.equal(state, torch.get_rng_state())


def test_streaming_pieces_concatenate_to_the_text():
    model = tiny_model("tiny-gemma1")
    tok = FakeTokenizer()
    prompts = [tok.encode("hi"), tok.encode("a longer prompt")]
    gen = GenerationConfig(max_new_tokens=30, stop=("zz",))
    done = generate(model, tok, prompts, gen)
    pieces = [[], []]
    for texts in stream(model, tok, prompts, gen):
        assert not torch.is_inference_mode_enabled()  # the mode does not leak out of the generator
        for i, t in enumerate(texts):
            if t is not None:
                pieces[i].append(t)
    for c, ps in zip(done, pieces):
        assert "".join(ps) == c.text
        assert c.prompt_tokens in (3, 16) and 1 <= c.completion_tokens <= 30
    assert "".join(stream_text(model, tok, prompts[0], gen)) == done[0].text


# -- text logic with a scripted model --------------------------------------------------------

def scripted(texts_or_ids: list, prompt_lens: list[int], **kw) -> ScriptedModel:
    scripts = [s if isinstance(s, list) else ids_of(s) for s in texts_or_ids]
    return ScriptedModel(scripts, prompt_lens, **kw)


def test_stop_token_ends_and_is_not_text():
    model = scripted([ids_of("abc") + [EOT] + ids_of("zzz")], [2])
    [c] = generate(model, FakeTokenizer(), [[BOS, 10]], GenerationConfig(max_new_tokens=10))
    assert (c.text, c.finish_reason) == ("abc", "stop")
    assert c.token_ids == ids_of("abc") and c.completion_tokens == 4 and c.prompt_tokens == 2


def test_length_finish_and_counts():
    model = scripted(["abcdefgh"], [1])
    [c] = generate(model, FakeTokenizer(), [[BOS]], GenerationConfig(max_new_tokens=5))
    assert (c.text, c.finish_reason, c.completion_tokens, c.token_ids) == ("abcde", "length", 5, ids_of("abcde"))


def test_stop_token_on_the_last_allowed_step_is_a_stop():
    model = scripted([ids_of("ab") + [EOS]], [1])
    [c] = generate(model, FakeTokenizer(), [[BOS]], GenerationConfig(max_new_tokens=3))
    assert (c.text, c.finish_reason, c.completion_tokens) == ("ab", "stop", 3)


def test_stop_string_spanning_tokens():
    # "STOP" arrives as the pieces "ST" + "OP" (ids 300, 301), and as single bytes.
    for script in (ids_of("Hello, wor") + [300, 301] + ids_of("more"), ids_of("Hello, worSTOPmore")):
        model = scripted([script], [1])
        gen = GenerationConfig(max_new_tokens=30, stop=("STOP",))
        [c] = generate(model, FakeTokenizer(), [[BOS]], gen)
        assert (c.text, c.finish_reason) == ("Hello, wor", "stop")
        # Token ids are not cut: they run up to the token that completed the stop string.
        completed_at = script.index(301) if 301 in script else len("Hello, worSTOP") - 1
        assert c.token_ids == script[:completed_at + 1] and c.completion_tokens == completed_at + 1


def test_stop_string_inside_a_token_and_earliest_of_several():
    model = scripted([[302, 303] + ids_of("xxENDyySTOP")], [1])  # "Hel" "lo " ...
    gen = GenerationConfig(max_new_tokens=30, stop=("STOP", "END", "lo x"))
    [c] = generate(model, FakeTokenizer(), [[BOS]], gen)
    assert (c.text, c.finish_reason) == ("Hel", "stop")  # "lo x" starts first, mid-token


def test_holdback_released_once_it_cannot_be_a_stop():
    model = scripted(["xSTbcST"], [1])
    gen = GenerationConfig(max_new_tokens=7, stop=("STOP",))
    pieces = [t[0] for t in stream(model, FakeTokenizer(), [[BOS]], gen)]
    # "S", "T" are held; "b" proves "STb" is no stop; the final "ST" is released at the length end.
    assert pieces == ["x", "", "", "STb", "c", "", "ST"]


def test_holdback_released_at_a_stop_token():
    model = scripted([ids_of("abS") + [EOS]], [1])
    gen = GenerationConfig(max_new_tokens=10, stop=("STOP",))
    pieces = list(stream_text(model, FakeTokenizer(), [BOS], gen))
    assert pieces == ["a", "b", "S"]


def test_holdback_with_self_overlapping_stop():
    model = scripted(["aaab!"], [1])
    gen = GenerationConfig(max_new_tokens=10, stop=("aab",))
    pieces = [t[0] for t in stream(model, FakeTokenizer(), [[BOS]], gen)]
    assert pieces == ["", "", "a", ""]


def test_split_utf8_is_held_until_complete():
    e = "é".encode()
    model = scripted([ids_of("a") + [e[0] + 3, e[1] + 3] + [304] + ids_of("!")], [1])
    pieces = [t[0] for t in stream(model, FakeTokenizer(), [[BOS]], GenerationConfig(max_new_tokens=5))]
    assert pieces == ["a", "", "é", "é", "!"]


def test_rows_finish_independently_and_are_fed_position_minus_one():
    model = scripted([ids_of("ab") + [EOS], ids_of("abcdef")], [1, 3])
    prompts = [[BOS], [BOS, 5, 6]]
    done = generate(model, FakeTokenizer(), prompts, GenerationConfig(max_new_tokens=6))
    assert [(c.text, c.finish_reason, c.completion_tokens) for c in done] == [
        ("ab", "stop", 3), ("abcdef", "length", 6)]
    assert model.caches == 1  # one preallocated cache for the whole generation
    prefill_pos, steps = model.fed[0], model.fed[1:]
    assert prefill_pos.tolist() == [[0, -1, -1], [0, 1, 2]]  # right padding at position -1
    assert [s.tolist() for s in steps] == [[[1], [3]], [[2], [4]], [[-1], [5]], [[-1], [6]], [[-1], [7]]]


def test_stats_count_tokens_forwards_and_time():
    model = scripted([ids_of("abc") + [EOS], ids_of("abcdef")], [1, 3])
    stats = GenerationStats()
    generate(model, FakeTokenizer(), [[BOS], [BOS, 5, 6]], GenerationConfig(max_new_tokens=6), stats=stats)
    # 4 + 6 sampled tokens (EOS included), 6 steps: one prefill, 5 decode forwards.
    assert (stats.prompt_tokens, stats.generated_tokens, stats.rows, stats.forwards) == (4, 10, 2, 5)
    assert stats.stopped == 1  # the first row ended on EOS, the second ran out of tokens
    assert stats.decode_tokens == 8 and stats.speculate == 0 and stats.acceptance is None
    assert stats.prefill_s > 0 and stats.decode_s > 0
    assert "decode: 8 tokens in" in stats.summary() and "speculation" not in stats.summary()
    stats = GenerationStats()  # a stream closed early still reports what it did
    pieces = stream(scripted(["abcdef"], [1]), FakeTokenizer(), [[BOS]], GenerationConfig(max_new_tokens=6), stats=stats)
    next(pieces), next(pieces)
    pieces.close()
    assert (stats.generated_tokens, stats.forwards) == (2, 1)


def test_prompt_longer_than_context_is_clamped_or_rejected():
    model = scripted(["x" * 300], [250])  # context 256
    [c] = generate(model, FakeTokenizer(), [[BOS] * 250], GenerationConfig(max_new_tokens=100))
    assert (c.finish_reason, c.completion_tokens) == ("length", 6)
    model = scripted(["x"], [255])
    [c] = generate(model, FakeTokenizer(), [[BOS] * 255], GenerationConfig(max_new_tokens=100))
    assert c.completion_tokens == 1
    with pytest.raises(OpenGemmaError, match="prompt has 256 tokens, the model's context is 256"):
        generate(model, FakeTokenizer(), [[BOS] * 256], GenerationConfig(max_new_tokens=1))


@pytest.mark.parametrize("make", [
    lambda: GenerationConfig(max_new_tokens=0),
    lambda: GenerationConfig(max_new_tokens=-3),
    lambda: GenerationConfig(temperature=-1.0),
    lambda: GenerationConfig(top_k=-1),
    lambda: GenerationConfig(top_p=0.0),
    lambda: GenerationConfig(top_p=2.0),
    lambda: GenerationConfig(stop=("",)),
])
def test_invalid_config_raises(make):
    with pytest.raises(OpenGemmaError):
        make()


def test_request_errors():
    model = scripted(["x"], [1])
    tok = FakeTokenizer()
    with pytest.raises(OpenGemmaError, match="no prompts"):
        generate(model, tok, [], GenerationConfig())
    with pytest.raises(OpenGemmaError, match="empty"):
        generate(model, tok, [[]], GenerationConfig())
    with pytest.raises(OpenGemmaError, match="context"):
        generate(model, tok, [[BOS]], GenerationConfig(max_new_tokens=257))
    with pytest.raises(OpenGemmaError, match="tokenizer"):
        next(generate_tokens(model, [[BOS]], GenerationConfig(stop=("x",))))
    with pytest.raises(TypeError):
        generate(model, tok, [BOS, 5], GenerationConfig())  # one flat prompt, not a list of them


def test_config_normalises_stop():
    assert GenerationConfig(stop="END").stop == ("END",)
    assert GenerationConfig(stop=["a", "b"]).stop == ("a", "b")


def test_cache_length_rounding():
    rows = [RowState([BOS] * 10, 20), RowState([BOS] * 3, 5)]
    assert cache_length(rows, 8192) == CACHE_ROUND
    assert cache_length([RowState([BOS] * 100, 100)], 8192) == 256
    assert cache_length([RowState([BOS] * 100, 100)], 210) == 210  # never beyond the context


# -- non-finite logits -----------------------------------------------------------------------

class PoisonedModel(ScriptedModel):
    """A ScriptedModel whose logits for row b are ``value`` everywhere from forward call
    ``poison[b][0]`` on (call 1 is the prefill, whose logits give step 1), finished row or not."""

    def __init__(self, scripts, prompt_lens, poison: dict[int, tuple[int, float]]):
        super().__init__(scripts, prompt_lens)
        self.poison, self.calls = poison, 0

    def forward(self, tokens, input_pos=None, cache=None, logits_at=None):
        out = super().forward(tokens, input_pos, cache, logits_at)
        self.calls += 1
        for b, (call, value) in self.poison.items():
            if self.calls >= call:
                out[b] = value
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nonfinite_logits_raise_at_their_step(value, temperature):
    model = PoisonedModel([ids_of("abcdef")] * 2, [1, 1], {1: (3, value)})
    gen = GenerationConfig(max_new_tokens=6, temperature=temperature, seed=0)
    seen = []
    with pytest.raises(NonFiniteLogitsError, match=r"^the model produced non-finite logits \(NaN/inf\) at step 3: "):
        for texts in stream(model, FakeTokenizer(), [[BOS], [BOS]], gen):
            seen.append(texts)
    assert len(seen) == 2  # the steps before it were delivered (greedy: exactly the script)
    if temperature == 0.0:
        assert seen == [["a", "a"], ["b", "b"]]


def test_nonfinite_logits_of_a_finished_row_are_ignored():
    # Row 0 ends with EOS at step 3; from call 4 on its (idle) row is NaN, which is no one's output.
    model = PoisonedModel([ids_of("ab") + [EOS], ids_of("abcdef")], [1, 1], {0: (4, float("nan"))})
    done = generate(model, FakeTokenizer(), [[BOS], [BOS]], GenerationConfig(max_new_tokens=6))
    assert [(c.text, c.finish_reason) for c in done] == [("ab", "stop"), ("abcdef", "length")]


def test_sampler_errors_on_nan_become_the_nonfinite_error(monkeypatch):
    """A sampler that refuses NaN itself (torch.multinomial does) still gives the one clear error;
    its errors on finite logits are not disguised as one."""
    import opengemma.generate as gen_mod

    def multinomial_sampler(logits, generator, *args):
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]

    monkeypatch.setattr(gen_mod, "sample_next_token", multinomial_sampler)
    model = PoisonedModel([ids_of("abc")], [1], {0: (2, float("nan"))})
    with pytest.raises(NonFiniteLogitsError, match="at step 2"):
        generate(model, FakeTokenizer(), [[BOS]], GenerationConfig(max_new_tokens=3))

    def broken_sampler(logits, generator, *args):
        raise RuntimeError("sampler bug")

    monkeypatch.setattr(gen_mod, "sample_next_token", broken_sampler)
    with pytest.raises(RuntimeError, match="sampler bug"):
        generate(scripted(["abc"], [1]), FakeTokenizer(), [[BOS]], GenerationConfig(max_new_tokens=3))


def test_generation_under_bf16_autocast_samples_from_fp32_weights():
    # A bf16 training run samples (eval replies, RL rollouts) from its fp32 master weights inside
    # torch.autocast: the projections then give bf16 values (and keys in fp32 past their norm and
    # RoPE) that the fp32 cache takes; the tokens are those of a bf16 model, near enough.
    model = tiny_model("tiny-gemma3")
    p = prompt(3, 9)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_tokens(model, [p], 8)
    assert len(out[0]) == 8 and all(0 <= t < model.config.vocab_size for t in out[0])
