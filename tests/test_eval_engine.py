"""Log-likelihood engine, task prompts and the runner (report section "Evaluation", Table 6): prefix
reuse gives exactly the numbers of scoring every choice alone, and a mock model with known
log-likelihoods fixes every scorer's answer (acc vs acc_norm, WinoGrande partial scoring)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from opengemma.errors import OpenGemmaError
from opengemma.eval import runner
from opengemma.eval.engine import LoglikRequest, Scorer, generate_texts
from opengemma.eval.tasks import TASKS, get_task
from opengemma.eval.tasks.base import DataSource, MCItem
from opengemma.eval.testing import BigramModel, ByteTokenizer, tiny_gemma

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def tiny():
    return tiny_gemma("tiny-gemma3", seed=1)


def _random_requests(rnd, prefix_len, n, vocab=500):
    ids = lambda k: [rnd.randrange(3, vocab) for _ in range(k)]
    prefix = [2] + ids(prefix_len)
    reqs = []
    for k in range(n):
        ctx = ids(rnd.randrange(0, 12))
        pairs = [(ctx, ids(rnd.randrange(1, 6))) for _ in range(rnd.randrange(2, 5))]
        if k % 3 == 1:  # WinoGrande-like: one context per choice, shared continuation
            cont = ids(4)
            pairs = [(ids(5), cont), (ids(7), cont)]
        reqs.append(LoglikRequest.make(prefix, pairs))
    return reqs


@pytest.mark.parametrize("prefix_len", [0, 20])  # 20 > the sliding window (8): ring buffers copied
def test_prefix_reuse_equals_scoring_each_choice_alone(tiny, prefix_len):
    reqs = _random_requests(random.Random(prefix_len), prefix_len, 9)
    scorer = Scorer(tiny.model, batch_size=5, max_tokens=7)
    fast, slow = scorer.score(reqs), scorer.score_naive(reqs)
    for a, b in zip(fast, slow):
        for (la, ga), (lb, gb) in zip(a, b):
            assert la == pytest.approx(lb, abs=1e-4)
            assert ga == gb


def test_engine_matches_closed_form_bigram_logliks():
    torch.manual_seed(0)
    model = BigramModel(torch.randn(40, 40) * 2)
    rnd = random.Random(3)
    reqs = _random_requests(rnd, 5, 6, vocab=40)
    got = Scorer(model, batch_size=3).score(reqs)
    for r, res in zip(reqs, got):
        for (ctx, cont), (ll, greedy) in zip(r.pairs, res):
            assert ll == pytest.approx(model.loglik(list(r.prefix) + list(ctx), list(cont)), abs=1e-4)
            lsm = torch.log_softmax(model.table, -1)
            seq = list(r.prefix) + list(ctx) + list(cont)
            want = all(int(lsm[seq[i - 1]].argmax()) == seq[i] for i in range(len(seq) - len(cont), len(seq)))
            assert greedy == want


def _scripted_bigram(pref: dict[tuple[int, int], float], vocab=260):
    """Bigram table: every transition -8 except the given (prev, next) log-odds."""
    table = torch.full((vocab, vocab), -8.0)
    for (a, b), v in pref.items():
        table[a, b] = v
    return BigramModel(table)


def test_acc_vs_acc_norm_through_the_runner():
    tok = ByteTokenizer()
    # " a" (2 bytes) vs " bcdefghijk" (11 bytes): the long choice loses on raw sum, wins per character
    short, long = " a", " bcdefghijk"
    pref = {(tok.encode_plain(" ")[0], tok.encode_plain("a")[0]): 8.0}  # " a": one near-certain step
    seq = tok.encode_plain(long)
    for x, y in zip(seq, seq[1:]):
        pref[(x, y)] = -4.0  # each step of the long choice: p ~ 0.17
    model = _scripted_bigram(pref)
    item = MCItem.simple("Q:", ["a", "bcdefghijk"], gold=1)
    reqs, items = [LoglikRequest.make([tok.bos_id], [(tok.encode_plain(c), tok.encode_plain(t))
                                                      for c, t in item.pairs])], [item]
    res = Scorer(model).score(reqs)
    lls = [ll for ll, _ in res[0]]
    assert lls[0] > lls[1]  # raw: the short choice
    assert lls[0] / len("a") < lls[1] / len("bcdefghijk")  # per character: the long one
    scores = runner.score_mc(items, res)
    assert scores["acc"] == 0.0 and scores["acc_norm"] == 1.0
    assert len(short) == 2


def test_winogrande_partial_scoring_uses_only_the_continuation():
    tok = ByteTokenizer()
    doc = {"sentence": "Jo beat Al so _ won.", "option1": "Jo", "option2": "Al", "answer": "2"}
    item = get_task("winogrande").to_mc(doc)
    # Make "l" -> " " likely: context 2 ends in "Al", so " won." is likelier after it; option tokens unscored.
    model = _scripted_bigram({(tok.encode_plain("l")[0], tok.encode_plain(" ")[0]): 6.0})
    req = LoglikRequest.make([tok.bos_id], [(tok.encode_plain(c), tok.encode_plain(t)) for c, t in item.pairs])
    (l1, _), (l2, _) = Scorer(model).score([req])[0]
    assert l2 > l1
    assert runner.score_mc([item], [[(l1, False), (l2, False)]])["acc"] == 1.0
    # exactly the continuation's log-probability after each context
    assert l1 == pytest.approx(model.loglik(req.prefix and list(req.prefix) + list(req.pairs[0][0]),
                                            list(req.pairs[0][1])), abs=1e-4)


def test_wrong_tokenizer_is_one_clear_error(tiny):
    req = LoglikRequest.make([2], [([5000], [7])])
    with pytest.raises(OpenGemmaError, match="vocabulary"):
        Scorer(tiny.model).score([req])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_reads_its_fixture_and_builds_prompts(name):
    task = get_task(name)
    docs, pool, _ = task.load(DataSource(FIXTURES))
    assert docs
    doc = docs[0]
    shots = runner.select_shots(task, doc, pool, min(task.SHOTS, 2) if name != "mmlu" else 5)
    assert all(s is not doc for s in shots)
    if task.KIND == "mc":
        item = task.to_mc(doc)
        assert 0 <= item.gold < len(item.pairs) == len(item.choices)
        assert task.shot_text(doc)
    else:
        assert isinstance(task.prompt(doc, shots), str) and task.STOP and task.MAX_TOKENS > 0


def test_prompt_formats_match_the_protocols():
    src = DataSource(FIXTURES)
    piqa = get_task("piqa")
    doc = piqa.load(src)[0][0]
    assert piqa.to_mc(doc).pairs[0] == (f"Question: {doc['goal']}\nAnswer:", " " + doc["sol1"])
    mmlu = get_task("mmlu")
    docs, pool, _ = mmlu.load(src)
    prefix = runner.fewshot_prefix(mmlu, docs[0], pool, 5)
    assert prefix.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert prefix.count("\nAnswer: ") == 5 and prefix.endswith("\n\n")
    boolq = get_task("boolq")
    d = boolq.load(src)[0][0]
    assert boolq.to_mc(d).pairs[1][1] == " yes" and boolq.to_mc(d).gold == int(d["answer"])
    nq = get_task("natural_questions")
    d, pool, _ = nq.load(src)
    p = nq.prompt(d[0], runner.select_shots(nq, d[0], pool, 5))
    assert p.startswith("Answer these questions:\n\nQ: ") and p.endswith(f"Q: {d[0]['question']}?\nA:")


def test_runner_end_to_end_on_fixtures(tiny):
    src = DataSource(FIXTURES)
    r = runner.run_task(tiny, get_task("hellaswag"), src, shots=2, limit=3, batch_size=4)
    assert r["n"] == 3 and r["shots"] == 2 and 0 <= r["value"] <= 1 and "acc_norm" in r["metrics"]
    assert r["prompt_example"]
    g = runner.run_task(tiny, get_task("natural_questions"), src, shots=1, limit=2, batch_size=2)
    assert set(g["metrics"]) >= {"exact_match", "f1"}
    k = runner.run_task(tiny, get_task("natural_questions"), src, shots=0, limit=1, batch_size=2, samples=2)
    assert k["samples"] == 2 and set(k["metrics"]) >= {"exact_match", "f1"}  # mean over the samples


def test_generation_stops_at_stop_strings(tiny):
    tok = tiny.tokenizer
    texts = generate_texts(tiny.model, tok, [tok.encode("abc"), tok.encode("xyz")], max_new_tokens=12,
                           stop=["\n"], batch_size=2)
    assert len(texts) == 2 and all("\n" not in t for t in texts)
