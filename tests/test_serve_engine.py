"""Tests of the serving engine (opengemma.serve.engine) without HTTP: continuous batching must
give every sequence exactly what it gets alone, while admitting, chunk-prefilling, cancelling
and retiring sequences around it.

Two models: the tiny Gemma 3 preset in float64 (sliding window 8, so chunked prefill and decoding
run past the window; float64 keeps argmax ties out of the comparison) compared token by token
with ``generate_tokens`` alone; and the embedded real model compared text by text with
``Gemma.generate`` alone.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time

import pytest
import torch

from opengemma.generate import GenerationConfig, generate_tokens
from opengemma.serve.engine import Engine, QueueFull, ShuttingDown
from opengemma.serve.metrics import Metrics


class Collector:
    """A sequence's sink: records its events; ``done`` is set by the final one."""

    def __init__(self):
        self.events = []
        self.done = threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.finish_reason is not None:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def tokens(self) -> list[int]:
        return [e.token for e in self.events if e.token is not None]

    @property
    def finish(self):
        return self.events[-1].finish_reason if self.done.is_set() else None


def submit(engine, prompt_ids, **params) -> Collector:
    c = Collector()
    params = {"max_new_tokens": params.pop("max_tokens"), **params} if "max_tokens" in params else params
    engine.submit([engine.new_seq(prompt_ids, GenerationConfig(**{"temperature": 0.0, **params}), c)])
    return c


def wait_all(collectors, timeout=180.0):
    end = time.monotonic() + timeout
    for c in collectors:
        assert c.done.wait(max(0.0, end - time.monotonic())), "sequence did not finish in time"


@pytest.fixture(scope="module")
def tiny():
    import opengemma

    return opengemma.load("tiny-gemma3", dtype=torch.float64, device="cpu", seed=3)


@pytest.fixture
def engine_factory():
    engines = []

    def make(g, **kw):
        e = Engine(g.model, g.tokenizer, **kw).start()
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.stop()


def test_tiny_continuous_batching_equals_alone(tiny, engine_factory):
    # 7 sequences through 3 slots, prompts up to 5x the sliding window, prefilled 5 tokens per step:
    # slots are reused (after longer tenants), prefill runs over runs of rows and mixes with decode
    # steps, and forwards see 64 or 128 of the 160 positions.
    eng = engine_factory(tiny, max_batch=3, max_context=160, prefill_chunk=5)
    gen = torch.Generator().manual_seed(0)
    prompts = [[2] + torch.randint(3, 500, (n,), generator=gen).tolist() for n in (1, 4, 9, 17, 40, 6, 23)]
    budgets = [12, 30, 5, 20, 9, 1, 16]
    got = [submit(eng, p, max_tokens=m) for p, m in zip(prompts, budgets)]
    wait_all(got)
    for p, m, c in zip(prompts, budgets, got):
        alone = [step[0] for step in generate_tokens(tiny.model, [p], GenerationConfig(max_new_tokens=m))]
        assert c.tokens == alone
        assert c.finish == "length" and c.events[-1].completion_tokens == m
    assert eng.live == 0 and eng.running == 0


def test_slot_reuse_forgets_the_previous_tenant(tiny, engine_factory):
    # A long sequence leaves positions up to ~160 in slot 0; the next tenant is short at admission
    # (views of 64 positions) and grows past 64: stale positions must not reappear.
    eng = engine_factory(tiny, max_batch=1, max_context=256)
    gen = torch.Generator().manual_seed(1)
    first = [2] + torch.randint(3, 500, (99,), generator=gen).tolist()
    second = [2, 17, 33, 5, 91]
    a = submit(eng, first, max_tokens=60)
    b = submit(eng, second, max_tokens=90)
    wait_all([a, b])
    alone = [step[0] for step in generate_tokens(tiny.model, [second], GenerationConfig(max_new_tokens=90))]
    assert b.tokens == alone


def test_cache_row_views_write_into_the_shared_cache(tiny):
    cache = tiny.model.make_cache(4, 32)
    view = cache.rows(1, 3)
    assert view.batch_size == 2 and view.k[0].shape[0] == 2
    tokens = torch.tensor([[5, 6], [7, 8]])  # [2, 2]
    pos = torch.tensor([[0, 1], [0, -1]])  # [2, 2]
    with torch.inference_mode():
        tiny.model(tokens, pos, view)
    assert cache.pos_global[1, :2].tolist() == [0, 1] and cache.pos_global[2, :2].tolist() == [0, -1]
    assert (cache.pos_global[0] == -1).all() and (cache.pos_global[3] == -1).all()
    assert cache.k[0][1].abs().sum() > 0 and cache.k[0][0].abs().sum() == 0
    assert cache.rows(0, 4) is cache
    short = cache.rows(0, 4, length=8)  # global layers: 8 positions + the trash slot
    assert short.max_len == 8 and short.pos_global.shape == (4, 9)
    glob = next(i for i in range(len(cache.k)) if not tiny.config.is_local(i))
    assert short.k[glob].shape[2] == 9 and short.k[glob].data_ptr() == cache.k[glob].data_ptr()
    with torch.inference_mode():
        tiny.model(torch.tensor([[9]] * 4), torch.tensor([[2], [-1], [-1], [-1]]), short)
    assert cache.pos_global[0, :3].tolist() == [-1, -1, 2] and cache.pos_global[0, 8] == -1


def alone(g, prompt, m) -> list[int]:
    return [step[0] for step in generate_tokens(g.model, [prompt], GenerationConfig(max_new_tokens=m))]


VICTIMS = [[2, 10, 11], [2, 5, 6, 7, 8], [2, 300, 301, 302]]  # short prompts, budgets below: positions < 30


@contextlib.contextmanager
def failing_layer(g, when):
    """Make layer 3 of ``g`` raise in every forward for which ``when(tokens, input_pos, failures)``
    is true: the layers before it have run, and written the cache, when it fails. Yields a dict
    whose "failures" counts the raises."""
    real_forward = g.model.forward
    state = {"armed": False, "failures": 0}

    def forward(tokens, input_pos=None, cache=None, **kwargs):
        state["armed"] = when(tokens, input_pos, state["failures"])
        return real_forward(tokens, input_pos, cache, **kwargs)

    def fail(module, args, output):
        if state["armed"]:
            state["armed"], state["failures"] = False, state["failures"] + 1
            raise RuntimeError("simulated failure in layer 3")

    hook = g.model.layers[3].register_forward_hook(fail)
    g.model.forward = forward
    try:
        yield state
    finally:
        del g.model.forward
        hook.remove()


def test_a_transient_step_failure_is_retried(tiny, engine_factory):
    # Two forwards (a prefill or a decode step, whichever runs then) fail once each, half-way
    # through the layers: retried by halves, every sequence still gets exactly its solo tokens.
    eng = engine_factory(tiny, max_batch=3, max_context=64)
    calls = itertools.count(1)
    with failing_layer(tiny, lambda tokens, pos, failures: next(calls) in (2, 6)) as state:
        got = [submit(eng, p, max_tokens=12) for p in VICTIMS]
        wait_all(got)
    assert state["failures"] == 2
    for p, c in zip(VICTIMS, got):
        assert c.finish == "length" and c.tokens == alone(tiny, p, 12)


def test_a_failure_inside_a_prompt_chunk_is_retried_exactly(tiny, engine_factory):
    # The forward of a later prompt chunk fails once after half the layers: those layers have
    # already rewritten their sliding-window rings (window 8, chunks of 5), which the retry must
    # not read as the earlier positions it needs.
    eng = engine_factory(tiny, max_batch=2, max_context=64, prefill_chunk=5)
    prompts = [[2] + list(range(200, 227)), [2] + list(range(300, 331))]  # 28 and 32 tokens
    with failing_layer(tiny, lambda tokens, pos, failures: tokens.shape[1] > 1 and int(pos.max()) >= 20
                       and not failures) as state:
        got = [submit(eng, p, max_tokens=10) for p in prompts]
        wait_all(got)
    assert state["failures"] == 1
    for p, c in zip(prompts, got):
        assert c.finish == "length" and c.tokens == alone(tiny, p, 10)


def test_a_step_failure_is_pinned_on_its_sequence(tiny, engine_factory):
    # Every forward that holds a row past position 40 fails: only the long sequence goes there.
    # It fails alone after its tokens up to there; the others, in the same decode steps, get
    # exactly their solo tokens; the engine keeps serving.
    eng = engine_factory(tiny, max_batch=4, max_context=64, prefill_chunk=8)
    with failing_layer(tiny, lambda tokens, pos, failures: bool((pos >= 40).any())):
        long = submit(eng, [2] + list(range(100, 129)), max_tokens=20)  # 30 prompt tokens: fails at 40
        got = [submit(eng, p, max_tokens=20) for p in VICTIMS]
        wait_all([long, *got])
        again = submit(eng, VICTIMS[0], max_tokens=5)
        wait_all([again])
    assert long.finish == "error" and "simulated failure" in long.events[-1].error
    assert len(long.tokens) == 11  # one from the prefill, ten decoded at positions 30..39; 40 fails
    for p, c in zip(VICTIMS, got):
        assert c.finish == "length" and c.tokens == alone(tiny, p, 20)
    assert again.tokens == alone(tiny, VICTIMS[0], 5) and eng.live == 0


def test_a_prefill_failure_is_pinned_on_its_sequence(tiny, engine_factory):
    # A token that makes every forward holding it fail, in one prompt prefilled with others.
    poison = 77
    eng = engine_factory(tiny, max_batch=4, max_context=64)
    collectors = [Collector() for _ in range(4)]
    prompts = [VICTIMS[0], [2, 40, poison, 41], *VICTIMS[1:]]
    with failing_layer(tiny, lambda tokens, pos, failures: bool(((tokens == poison) & (pos >= 0)).any())):
        eng.submit([eng.new_seq(p, GenerationConfig(max_new_tokens=8, temperature=0.0), c)
                    for p, c in zip(prompts, collectors)])  # one admission: one prefill run of 4 rows
        wait_all(collectors)
    bad = collectors[1]
    assert bad.finish == "error" and "simulated failure" in bad.events[-1].error and not bad.tokens
    for p, c in zip(prompts, collectors):
        if c is not bad:
            assert poison not in alone(tiny, p, 8)  # the victims never feed the poison themselves
            assert c.finish == "length" and c.tokens == alone(tiny, p, 8)


def test_a_sampling_failure_ends_only_its_sequence(tiny, engine_factory, monkeypatch):
    # The reported overflow: a huge top_k that reaches the sampler raises there. Whatever the
    # sampler does with it, a raise must end that sequence alone.
    import opengemma.serve.engine as engine_module

    real_sample = engine_module.sample_next_token

    def overflowing(logits, generator, temperature, top_k, top_p):
        if top_k is not None and top_k > logits.shape[-1]:
            raise RuntimeError("value cannot be converted to type int64 without overflow")
        return real_sample(logits, generator, temperature, top_k, top_p)

    monkeypatch.setattr(engine_module, "sample_next_token", overflowing)
    eng = engine_factory(tiny, max_batch=4, max_context=64)
    got = [submit(eng, p, max_tokens=15) for p in VICTIMS[:2]]
    bad = submit(eng, [2, 9], max_tokens=15, temperature=1.0, top_k=2**31 - 1, seed=1)  # the largest valid k
    got.append(submit(eng, VICTIMS[2], max_tokens=15))
    wait_all([bad, *got])
    assert bad.finish == "error" and "overflow" in bad.events[-1].error
    for p, c in zip(VICTIMS, got):
        assert c.finish == "length" and c.tokens == alone(tiny, p, 15)


def test_non_finite_logits_end_only_their_sequence(tiny, engine_factory):
    # Token 77's embedding turns into NaN inside the model (a corrupt row of weights seen only by
    # the prompts that use it): that sequence ends with a clear error, the batch goes on, and the
    # next tenant of its slot is not poisoned by the NaN keys and values it left behind.
    poison = 77
    hook = tiny.model.embed.register_forward_hook(
        lambda module, args, out: out.masked_fill((args[0] == poison)[..., None], float("nan")))
    eng = engine_factory(tiny, max_batch=2, max_context=64)
    reuse = Collector()

    class Bad(Collector):
        def __call__(self, event):  # called on the engine thread, while `a` still holds slot 0
            if event.finish_reason is not None:
                eng.submit([eng.new_seq(VICTIMS[0], GenerationConfig(max_new_tokens=20, temperature=0.0), reuse)])
            super().__call__(event)

    a, bad = Collector(), Bad()
    try:
        eng.submit([eng.new_seq(VICTIMS[1], GenerationConfig(max_new_tokens=50, temperature=0.0), a),
                    eng.new_seq([2, poison] + list(range(100, 130)), GenerationConfig(max_new_tokens=20, temperature=0.0),
                                bad)])  # NaN keys and values at positions 1..31 of slot 1
        wait_all([a, bad, reuse])
    finally:
        hook.remove()
    assert bad.finish == "error" and bad.events[-1].error == "the model produced non-finite logits"
    assert not bad.tokens
    assert a.tokens == alone(tiny, VICTIMS[1], 50) and a.finish == "length"
    assert reuse.tokens == alone(tiny, VICTIMS[0], 20) and reuse.finish == "length"  # in slot 1


def test_queue_bound_drain_and_abort(tiny, engine_factory):
    eng = engine_factory(tiny, max_batch=1, max_context=200, max_queue=1)
    a = submit(eng, [2, 3, 4], max_tokens=150)
    b = submit(eng, [2, 3, 4], max_tokens=150)
    with pytest.raises(QueueFull):
        submit(eng, [2, 3, 4], max_tokens=2)
    eng.drain()
    with pytest.raises(ShuttingDown):
        submit(eng, [2, 3, 4], max_tokens=2)
    eng.abort_all("going away")
    wait_all([a, b])
    assert a.finish == b.finish == "abort" and b.events[-1].error == "going away"
    assert eng.live == 0


def test_cancel_frees_the_slot_at_once(tiny, engine_factory):
    eng = engine_factory(tiny, max_batch=1, max_context=256, max_queue=4)
    long = submit(eng, [2, 3, 4], max_tokens=250)
    while len(long.events) < 3:
        time.sleep(0.005)
    waiting = submit(eng, [2, 5, 6], max_tokens=3)  # no free slot: waits behind the long one
    eng.cancel(next(s for s in eng._slots if s is not None))
    wait_all([waiting])
    assert waiting.finish == "length"
    assert not long.done.is_set() and len(long.events) < 250  # no more events after cancel
    assert eng.live == 0 and eng.running == 0


def test_real_model_concurrent_greedy_equals_alone(real_gemma, engine_factory):
    g = real_gemma
    metrics = Metrics()
    eng = engine_factory(g, max_batch=4, max_context=512, prefill_chunk=32, metrics=metrics)
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are",
               "In 1969, the first humans", "Water boils at", "My favourite recipe for pancakes"]
    budgets = [8, 12, 10, 6, 12, 5, 9]
    got = [submit(eng, g.tokenizer.encode(p), max_tokens=m) for p, m in zip(prompts, budgets)]
    wait_all(got)
    for p, m, c in zip(prompts, budgets, got):
        assert c.text == g.generate(p, max_new_tokens=m), p
    text = metrics.render()
    assert "opengemma_time_to_first_token_seconds_count 7" in text
    assert f"opengemma_generation_tokens_total {sum(budgets)}" in text


def test_real_model_sampling_stops_and_logprobs(real_gemma, engine_factory):
    g = real_gemma
    eng = engine_factory(g, max_batch=4, max_context=512)
    prompt = "Once upon a time"
    ids = g.tokenizer.encode(prompt)
    noise = submit(eng, g.tokenizer.encode("Noise in the same batch:"), max_tokens=40, temperature=1.0, seed=1)
    sampled = submit(eng, ids, max_tokens=20, temperature=0.8, top_k=40, top_p=0.95, seed=7)
    stopped = submit(eng, ids, max_tokens=40, stop=(" girl",))
    lp = submit(eng, ids, max_tokens=5, logprobs=3)
    wait_all([noise, sampled, stopped, lp])
    # A seeded sequence draws from its own generator: the same as alone, whatever runs beside it.
    assert sampled.text == g.generate(prompt, max_new_tokens=20, temperature=0.8, top_k=40, top_p=0.95, seed=7)
    assert stopped.text == g.generate(prompt, max_new_tokens=40, stop=[" girl"]) and stopped.finish == "stop"
    assert " girl" not in stopped.text
    for e in lp.events:
        assert e.logprob.token == e.token and e.logprob.logprob <= 0
        assert e.logprob.top[0][0] == e.token  # greedy: the best token is the chosen one
        assert e.logprob.top[0][1] >= e.logprob.top[1][1] >= e.logprob.top[2][1]


def test_long_prompt_prefill_does_not_freeze_streams(real_gemma, engine_factory):
    g = real_gemma
    eng = engine_factory(g, max_batch=2, max_context=1024, prefill_chunk=32)
    stream = submit(eng, g.tokenizer.encode("Count with me: one, two, three,"), max_tokens=30)
    while len(stream.events) < 2:
        time.sleep(0.005)
    long_prompt = "The history of the lighthouse is the history of coastal trade. " * 24
    long_ids = g.tokenizer.encode(long_prompt)
    assert len(long_ids) > 8 * 32
    before = len(stream.events)
    long = submit(eng, long_ids, max_tokens=4)
    while not long.events and not stream.done.is_set():
        time.sleep(0.001)
    # The long prompt took >= 8 prefill chunks; the stream got a token after (nearly) each one.
    assert len(stream.events) - before >= 7 or stream.done.is_set()
    wait_all([stream, long])
    assert long.text == g.generate(long_prompt, max_new_tokens=4)
    assert stream.text == g.generate("Count with me: one, two, three,", max_new_tokens=30)


def test_end_of_turn_ends_a_reply(tiny, engine_factory):
    # The tiny model is scripted to emit <end_of_turn> once a row reaches position 6: the reply
    # stops there ("stop"), the token counts, and its text never shows up.
    eot = tiny.tokenizer.end_of_turn_id
    real_forward = tiny.model.forward

    def scripted(tokens, input_pos=None, cache=None, logits_at=None):
        out = real_forward(tokens, input_pos, cache, logits_at=logits_at)  # [B, 1, V]
        last = input_pos.max(dim=1).values  # [B]
        out[:, -1, eot] = torch.where(last >= 6, torch.tensor(1e9, dtype=out.dtype), out[:, -1, eot])
        return out

    eng = engine_factory(tiny, max_batch=2, max_context=64)
    tiny.model.forward = scripted
    try:
        c = submit(eng, [2, 10, 11, 12], max_tokens=50)
        # ignore_eos (vLLM's load-test option): the same script runs on to max_tokens.
        c_ignore = submit(eng, [2, 10, 11, 12], max_tokens=12, ignore_eos=True)
        wait_all([c, c_ignore])
    finally:
        del tiny.model.forward
    assert c.finish == "stop" and c.tokens[-1] == eot and len(c.tokens) == 4
    assert c.events[-1].completion_tokens == 4 and "<end_of_turn>" not in c.text
    assert c_ignore.finish == "length" and len(c_ignore.tokens) == 12 and c_ignore.tokens[3:] == [eot] * 9


def test_quantized_model_is_served_like_alone(engine_factory):
    import inspect

    import opengemma
    from opengemma.api import load

    if "quantize" not in inspect.signature(load).parameters:
        pytest.skip("this opengemma has no quantization")
    g = opengemma.load("tiny-gemma3", dtype=torch.float32, device="cpu", seed=5, quantize="int8")
    eng = engine_factory(g, max_batch=2, max_context=64, prefill_chunk=4)
    prompts = [[2, 40, 41, 42, 43, 44, 45], [2, 7], [2, 300, 301]]
    got = [submit(eng, p, max_tokens=6) for p in prompts]
    wait_all(got)
    for p, c in zip(prompts, got):
        assert c.tokens == [s[0] for s in generate_tokens(g.model, [p], GenerationConfig(max_new_tokens=6))]


# -- speculative decoding (a greedy sequence decoding alone) -------------------------------------

SPEC_PROMPTS = [[2] + [40, 41, 42, 43] * 5, [2, 10, 11], [2] + list(range(300, 320))]


def solo(eng, prompt, **params) -> Collector:
    c = submit(eng, prompt, **params)
    wait_all([c])
    return c


def assert_plain_tokens(eng, g, prompt, c, m):
    """``c`` got plain greedy decoding's tokens: all ``m``, or up to a stop token."""
    ref = alone(g, prompt, m)
    assert c.tokens == ref[:len(c.tokens)]
    if c.finish == "stop":
        assert c.tokens[-1] in eng.stop_ids
    else:
        assert c.finish == "length" and len(c.tokens) == m


def test_speculation_alone_gives_the_plain_tokens(tiny, engine_factory):
    # Sequences one at a time, 60 tokens past the sliding window (8, with 3 spare ring slots): the
    # drafts are verified and some are kept, fewer forwards than tokens, and the tokens are the
    # plain ones. Budgets of 1 and 2 get exactly that many tokens (drafts never reach past them).
    metrics = Metrics()
    eng = engine_factory(tiny, max_batch=2, max_context=160, speculate=3, metrics=metrics)
    assert eng.cache.ring == tiny.config.sliding_window + 3
    tokens = forwards = 0
    for p in SPEC_PROMPTS:
        before = eng.steps
        c = solo(eng, p, max_tokens=60)
        assert_plain_tokens(eng, tiny, p, c, 60)
        tokens, forwards = tokens + len(c.tokens), forwards + eng.steps - before
    assert eng.accepted > 0 and eng.drafted > eng.accepted
    assert forwards == tokens - len(SPEC_PROMPTS) - eng.accepted  # first tokens come from the prefill
    text = metrics.render()
    assert f"opengemma_speculative_draft_tokens_total {float(eng.drafted)}" in text
    assert f"opengemma_speculative_accepted_tokens_total {float(eng.accepted)}" in text
    for m in (1, 2):
        c = solo(eng, SPEC_PROMPTS[0], max_tokens=m)
        assert c.tokens == alone(tiny, SPEC_PROMPTS[0], m) and c.finish == "length"


def test_speculation_stops_at_a_stop_among_the_kept_drafts(tiny, engine_factory, monkeypatch):
    # An oracle drafter proposes the plain continuation, so every draft is kept and tokens come
    # four per forward. Each token that first appears at step j of the plain text is made the stop
    # token in turn: the sequence ends right there, and the kept drafts after it are not sent.
    import opengemma.serve.engine as engine_module
    from opengemma.serve.engine import Seq

    prompt = SPEC_PROMPTS[2]
    ref = alone(tiny, prompt, 40)

    class Oracle:
        def propose(self, context, k):
            done = len(context) - len(prompt)
            return ref[done:done + k]

    verified = []
    real_step = engine_module.speculative_step

    def step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        verified.append(out.tokens)
        return out

    monkeypatch.setattr(engine_module, "PromptLookupDrafter", Oracle)
    monkeypatch.setattr(engine_module, "speculative_step", step)
    eng = engine_factory(tiny, max_batch=1, max_context=160, speculate=3)
    cut_inside = 0
    for j in range(1, 40):
        if ref[j] in ref[:j]:
            continue
        verified.clear()
        c = Collector()
        eng.submit([Seq(prompt, GenerationConfig(max_new_tokens=40, temperature=0.0), c, tokenizer=tiny.tokenizer,
                        stop_ids=frozenset({ref[j]}))])
        wait_all([c])
        assert c.finish == "stop" and c.tokens == ref[:j + 1], j
        assert all(len(v) == 4 for v in verified[:-1])  # every draft kept (the last step: the budget)
        cut_inside += ref[j] in verified[-1][:-1]
    assert cut_inside > 0 and eng.live == 0


def test_speculation_steps_aside_for_sampling_logprobs_and_batches(tiny, engine_factory):
    # A sampled sequence decodes plainly (its seed gives the text it gets without speculation),
    # so does one asking for logprobs; sequences decoding together get their plain tokens.
    spec = engine_factory(tiny, max_batch=3, max_context=160, speculate=3)
    plain = engine_factory(tiny, max_batch=3, max_context=160)
    sampled = {"max_tokens": 40, "temperature": 0.9, "top_k": 50, "seed": 11}
    a, b = solo(spec, SPEC_PROMPTS[0], **sampled), solo(plain, SPEC_PROMPTS[0], **sampled)
    assert a.tokens == b.tokens and len(a.tokens) > 0
    lp = solo(spec, SPEC_PROMPTS[2], max_tokens=30, logprobs=2)
    assert all(e.logprob is not None for e in lp.events) and spec.drafted == 0
    got = [submit(spec, p, max_tokens=40) for p in SPEC_PROMPTS]
    wait_all(got)
    for p, c in zip(SPEC_PROMPTS, got):
        assert_plain_tokens(spec, tiny, p, c, 40)


def test_a_failed_speculative_step_is_retried_exactly(tiny, engine_factory):
    # The first verification forward fails half-way through the layers (after they wrote the
    # drafts' keys); the retry gives exactly the plain tokens. Then verification forwards that
    # reach position 40 always fail: that sequence ends alone with its tokens up to there.
    eng = engine_factory(tiny, max_batch=2, max_context=160, speculate=3)
    prompt = SPEC_PROMPTS[2]
    with failing_layer(tiny, lambda tokens, pos, failures: tokens.shape[1] > 1 and int(pos.min()) >= len(prompt)
                       and not failures) as state:
        c = solo(eng, prompt, max_tokens=60)
    assert state["failures"] == 1 and eng.drafted > 0
    assert_plain_tokens(eng, tiny, prompt, c, 60)
    with failing_layer(tiny, lambda tokens, pos, failures: tokens.shape[1] > 1 and int(pos.max()) >= 40
                       and int(pos.min()) >= len(prompt)):
        bad = solo(eng, prompt, max_tokens=60)
        after = solo(eng, SPEC_PROMPTS[1], max_tokens=10)
    assert bad.finish == "error" and "simulated failure" in bad.events[-1].error
    assert bad.tokens == alone(tiny, prompt, 60)[:len(bad.tokens)] and len(bad.tokens) < 40 - len(prompt) + 2
    assert after.tokens == alone(tiny, SPEC_PROMPTS[1], 10) and eng.live == 0


def test_real_model_speculation_alone_equals_plain(served_gemma, engine_factory):
    # The server's default mode (mixed + bf16, native blocks) with prompt lookup: the same text as
    # plain decoding, with drafts kept.
    g = served_gemma
    eng = engine_factory(g, max_batch=2, max_context=512, speculate=4)
    prompt = "List the days of the week: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. Again:"
    c = solo(eng, g.tokenizer.encode(prompt), max_tokens=40)
    assert c.text == g.generate(prompt, max_new_tokens=40) and eng.accepted > 0
