"""The screened output head of ``quantize="mixed"`` (opengemma.quant.head): exact candidate values,
greedy top-1 equal to the full 8-bit head's (planted close calls on a synthetic head; a few hundred
positions of the embedded model, counted), the fallback, storage, and the mode end to end.

"Exact" here means bitwise: the candidates are re-scored with the same packed int8 kernel as the
full head, and that kernel computes each output as its own dot product.
"""

from __future__ import annotations

import json

import pytest
import torch

import opengemma
from opengemma.quant import head as qhead
from opengemma.quant import linear as quant
from opengemma.quant import store
from opengemma.quant.head import ScreenedEmbedding, decode_weight_bytes, exact_head
from opengemma.quant.rewrite import quantize_model


def _int8(N: int, K: int, seed: int, act=torch.float32) -> quant.Int8Linear:
    g = torch.Generator().manual_seed(seed)
    return quant.Int8Linear.from_float((torch.randn(N, K, generator=g) * 0.05).to(act))


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
def test_columns_equal_the_full_product_bitwise(act):
    m = _int8(1000, 128, 0, act)
    g = torch.Generator().manual_seed(1)
    for M in (1, 3):
        x = torch.randn(M, 128, generator=g).to(act)
        idx = torch.randint(0, 1000, (M, 40), generator=g)
        idx[:, 1] = idx[:, 0]  # a repeated index, and rows sharing indices (the union is read once)
        full = m(x)
        assert torch.equal(m.columns(x, idx), full.gather(1, idx))
    # the dense fallback (no packed kernel): the same weights, to the activation dtype's rounding
    m.packed_ok = False
    x = torch.randn(3, 128, generator=g).to(act)
    idx = torch.randint(0, 1000, (3, 40), generator=g)
    torch.testing.assert_close(m.columns(x, idx), m(x).gather(1, idx))


def _near_duplicate_head(V: int = 4096, K: int = 64, seed: int = 0) -> quant.Int8Linear:
    """A head whose rows come in near-identical pairs: many close calls the 4-bit screen alone gets
    wrong (its error, ~1/16 of a weight's range per weight, exceeds the pairs' differences)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(V // 2, K, generator=g)
    rows = torch.cat([base, base + 0.01 * torch.randn(V // 2, K, generator=g)])  # [V, K]
    return quant.Int8Linear.from_float(rows)


@pytest.mark.parametrize("V", [4096, 16384])  # 16384: wide enough for top_candidates' two passes
def test_planted_close_calls_keep_the_exact_top1(V):
    inner = _near_duplicate_head(V)
    emb = ScreenedEmbedding(inner, qhead.build_screen(inner), candidates=16)
    h = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    flipped = 0
    for i in range(0, 256, 32):
        x = h[i:i + 32]
        exact, approx = inner(x), emb.screen(x)
        out = emb.attend(x)
        flipped += int((approx.argmax(-1) != exact.argmax(-1)).sum())
        assert torch.equal(out.argmax(-1), exact.argmax(-1))
        idx = qhead.top_candidates(approx, 16)[1]  # (which of tied 4-bit scores is a candidate: its choice)
        assert torch.equal(out.gather(1, idx), exact.gather(1, idx))  # candidates: exact values
        rest = torch.ones_like(out, dtype=torch.bool).scatter_(1, idx, False)
        assert torch.equal(out[rest], approx[rest])  # the others: the screen's values
    assert flipped >= 10  # the screen alone really is wrong here, so the check above means something
    assert emb.stats.rows == 256 and emb.stats.fallbacks == 0


def test_top_candidates_equal_topk():
    """The two-pass selection returns torch.topk's values (bitwise, largest first) at indices
    holding them, on random rows, rows whose top values share one chunk, rows of ties, and in the
    activation dtypes; too narrow a row takes torch.topk itself."""
    g = torch.Generator().manual_seed(8)
    V, C, chunk = 128 * 64, 16, 128
    rows = torch.randn(6, V, generator=g)
    rows[1, 256:256 + C + 5] += 50  # the whole top C in one chunk
    rows[2] = torch.randint(0, 3, (V,), generator=g).float()  # thousands of ties
    rows[3, ::chunk] = 9.0  # ties across chunks: every chunk's maximum equal
    rows[4] = -rows[4].abs()  # all negative
    for dt in (torch.float32, torch.bfloat16):
        x = rows.to(dt)
        values, idx = qhead.top_candidates(x, C, chunk)
        ref = x.topk(C, dim=-1).values
        assert torch.equal(values, ref) and torch.equal(x.gather(1, idx), values)
        assert all(len(set(r)) == C for r in idx.tolist())  # C distinct positions
    narrow = rows[:, :C * chunk]  # fewer than 4 * C chunks: torch.topk
    assert all(torch.equal(a, b) for a, b in zip(qhead.top_candidates(narrow, C, chunk), narrow.topk(C, dim=-1)))


def test_screened_rows_are_scored_as_alone():
    """A 9-row call (a verification forward) gives each row bitwise what a 1-row call gives it."""
    inner = _near_duplicate_head(16384)
    emb = ScreenedEmbedding(inner, qhead.build_screen(inner), candidates=16)
    for act in (torch.float32, torch.bfloat16):
        x = torch.randn(9, 64, generator=torch.Generator().manual_seed(9)).to(act)
        nine = emb.attend(x)
        assert all(torch.equal(nine[i], emb.attend(x[i:i + 1])[0]) for i in range(9))


def test_fallback_rows_get_the_full_exact_head():
    inner = _int8(2048, 64, 2)
    screen = qhead.build_screen(inner)
    screen.scales_and_zeros.neg_()  # a screen scoring -w: its top candidates are the worst rows
    emb = ScreenedEmbedding(inner, screen, candidates=8)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(emb.attend(x), inner(x))
    assert emb.stats.fallbacks == 5


def test_exact_path_for_many_rows_and_inside_exact_head():
    inner = _int8(1024, 64, 4)
    emb = ScreenedEmbedding(inner, qhead.build_screen(inner), candidates=8, max_rows=4)
    model = torch.nn.Module()
    model.embed = emb
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(5))  # 6 rows > max_rows
    assert torch.equal(emb.attend(x), inner(x)) and emb.stats.rows == 0
    few = x[:1, :2]
    assert not torch.equal(emb.attend(few), inner(few)) and emb.stats.rows == 2
    with exact_head(model):
        assert torch.equal(emb.attend(few), inner(few))
    assert emb.screening and emb.stats.rows == 2
    with pytest.raises(ValueError):
        ScreenedEmbedding(inner, qhead.build_screen(_int8(512, 64, 0)))


def test_mixed_on_a_float_model_greedy_and_storage():
    from opengemma.config import PRESETS
    from opengemma.generate import decode_step, prefill
    from opengemma.testing import tiny_model

    cfg = PRESETS["tiny-gemma3"].replace(d_model=64, ffn_dim=128, head_dim=64)
    model = quantize_model(tiny_model(cfg, seed=0), "mixed")
    assert isinstance(model.embed, ScreenedEmbedding) and model.embed.candidates < cfg.vocab_size
    assert isinstance(model.layers[0].mlp.gate_up_proj, quant.Int8Linear)
    tensors, plan = store.to_flat(model)
    again = store.from_flat(cfg, tensors, plan)
    assert isinstance(again.embed, ScreenedEmbedding) and again.embed.candidates == model.embed.candidates

    def greedy(m, n=12):
        with torch.inference_mode():
            cache = m.make_cache(2, 32)
            logits = prefill(m, cache, [[2, 5, 9, 4], [2, 7]])
            out = [logits]
            pos = torch.tensor([[4], [2]])
            for _ in range(n):
                logits = decode_step(m, logits.argmax(-1)[:, None], pos, cache)
                out.append(logits)
                pos = pos + 1
        return torch.stack(out)  # [n + 1, 2, V]

    screened = greedy(model)
    assert torch.equal(screened, greedy(again))  # the stored model computes the same
    with exact_head(model):
        exact = greedy(model)
    assert torch.equal(screened.argmax(-1), exact.argmax(-1))
    assert model.embed.stats.rows == 2 * 13  # prefill + 12 steps, two rows; not again's, nor the exact run
    # bytes per decoded token: the screen and C rows replace the 8-bit matrix
    full = sum(t.numel() * t.element_size() for t in tensors.values())
    inner = model.embed.inner
    screen_bytes = sum(t.numel() * t.element_size() for t in model.embed.screen.state_dict().values())
    row = inner.in_features + inner.scales.element_size()
    expected = full - inner.qweight.nbytes - inner.scales.nbytes + (model.embed.candidates + 1) * row
    assert decode_weight_bytes(model) == expected and screen_bytes < inner.qweight.nbytes


# -- the embedded model ----------------------------------------------------------------------------
TEXT = (
    "The lighthouse keeper climbed the narrow stairs every evening to trim the wick and polish the "
    "great lens. Ships depended on the beam to find the harbour entrance through fog and storms, and "
    "a single missed night could mean a wrecked hull and a lost cargo. In the logbook he recorded the "
    "weather, every passing vessel and each repair. "
    "Bread follows a similar rhythm of small, careful steps. Flour, water, salt and yeast are mixed "
    "into a rough dough, kneaded until smooth, and left to rise while the yeast ferments the sugars. "
    "The baker shapes the loaf, scores the top with a sharp blade and bakes it in a hot oven. "
    "A processor fetches an instruction, decodes it, executes it and writes back the result, billions "
    "of times per second. Caches keep recently used data close to the cores, because main memory is "
    "far slower than an addition, so fast software arranges its data to be found exactly when needed. "
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    "Paris is the capital of France; Berlin is the capital of Germany; Madrid is the capital of Spain.")
PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Once upon a time", "1, 2, 3, 4, 5,",
           "Question: What is 12 plus 7?\nAnswer:"]
NEAR_TIE = 0.25  # as tests/test_quant.py: two bf16 spacings at the model's top logits


@pytest.fixture(scope="module")
def mixed(gguf_path):
    """The embedded model in mixed mode, through ``opengemma.load`` (not the converted-weight cache:
    the store round trip is checked in memory)."""
    import opengemma

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENGEMMA_NO_CACHE", "1")
        return opengemma.load(gguf_path, quantize="mixed", device="cpu")


def test_embedded_mixed_is_int8_plus_a_screen(mixed, gguf_path):
    from opengemma.quant.gguf import quantized_from_gguf

    assert isinstance(mixed.model.embed, ScreenedEmbedding)
    _, int8 = quantized_from_gguf(gguf_path, "int8")
    ours = {k: v for k, v in mixed.model.state_dict().items() if not k.startswith("embed.screen.")}
    theirs = int8.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # bytes of weights per decoded token: int8's minus the 8-bit head plus its 4-bit screen
    saved = decode_weight_bytes(int8) - decode_weight_bytes(mixed.model)
    print(f"\nweights read per decoded token: int8 {decode_weight_bytes(int8) / 1e6:.1f} MB, "
          f"mixed {decode_weight_bytes(mixed.model) / 1e6:.1f} MB")
    assert saved > 0.3 * 262144 * 640


def test_embedded_top1_equals_int8_head(mixed):
    """A few hundred positions: the screened head's top-1 vs the full 8-bit head's, counted (and
    the perplexity both give on the text, from the same hidden states)."""
    model, emb = mixed.model, mixed.model.embed
    ids = mixed.tokenizer.encode(TEXT, bos=True)
    assert len(ids) >= 250
    emb.stats = qhead.ScreenStats()
    with torch.inference_mode():
        hidden = model.trunk(torch.tensor([ids]))[0, :-1]  # [T - 1, D]: the positions with a next token
        differ, nll = 0, {"mixed": 0.0, "int8": 0.0}
        targets = torch.tensor(ids[1:])
        for i in range(0, len(ids) - 1, emb.max_rows):  # decode-sized calls: both heads on the packed kernels
            x, t = hidden[i:i + emb.max_rows], targets[i:i + emb.max_rows]
            for name, logits in (("mixed", emb.attend(x)), ("int8", emb.inner(x))):
                nll[name] -= float(torch.log_softmax(logits.float(), -1).gather(1, t[:, None]).sum())
                if name == "mixed":
                    screened = logits.argmax(-1)
            differ += int((screened != logits.argmax(-1)).sum())
    n = len(ids) - 1
    ppl = {k: float(torch.tensor(v / n).exp()) for k, v in nll.items()}
    print(f"\n{n} positions: top-1 differs from the 8-bit head at {differ}, fallbacks {emb.stats.fallbacks}; "
          f"perplexity mixed {ppl['mixed']:.4f}, int8 {ppl['int8']:.4f}")
    assert differ == 0 and emb.stats.rows == n
    assert abs(ppl["mixed"] / ppl["int8"] - 1) < 0.01


def test_embedded_greedy_and_perplexity_match_int8(mixed):
    from opengemma.generate import decode_step, prefill
    from opengemma.logprobs import perplexity

    model = mixed.model

    def run(ids, n=12):
        with torch.inference_mode():
            cache = model.make_cache(1, 64)
            logits = prefill(model, cache, [ids])
            toks, gaps = [], []
            for i in range(n):
                top2 = logits[0].float().topk(2).values
                gaps.append(float(top2[0] - top2[1]))
                toks.append(int(logits[0].argmax()))
                logits = decode_step(model, torch.tensor([[toks[-1]]]), torch.tensor([[len(ids) + i]]), cache)
        return toks, gaps

    near_ties = 0
    for p in PROMPTS:
        ids = mixed.tokenizer.encode(p, bos=True)
        toks, _ = run(ids)
        with exact_head(model):  # the same weights: int8 mode exactly
            ref, gaps = run(ids)
        # free-running: the same tokens up to the first int8 near-tie (after which texts may part)
        first_tie = next((i for i, g in enumerate(gaps) if g < NEAR_TIE), len(gaps))
        near_ties += first_tie < len(gaps)
        assert toks[:first_tie + 1] == ref[:first_tie + 1], (p, toks, ref)
    assert near_ties < len(PROMPTS)  # most prompts were compared all the way
    # bulk scoring (perplexity's token_logprobs rows) is the 8-bit head's either way
    ids = mixed.tokenizer.encode(TEXT, bos=True)[:120]
    with exact_head(model):
        ref = perplexity(model, ids)
    assert abs(perplexity(model, ids) / ref - 1) < 0.01


def test_cli_accepts_mixed():
    from opengemma.cli import build_parser

    args = build_parser().parse_args(["generate", "--quantize", "mixed", "hi"])
    assert args.quantize == "mixed"
    from opengemma.serve.cli import QUANTIZE

    assert "mixed" in QUANTIZE and set(QUANTIZE) == {"auto", "none", *quant.MODES}


def test_auto_default_is_mixed_bf16_for_a_quantized_gguf_on_the_cpu_only(tmp_path):
    """generate/chat default to --quantize auto: the embedded Q4_K_M file on the CPU runs mixed with
    bf16 activations; a float checkpoint, a preset or a GPU keep the unquantized default."""
    from opengemma.api import auto_mode, resolve
    from opengemma.checkpoints import native
    from opengemma.cli import build_parser
    from opengemma.testing import tiny_model

    assert build_parser().parse_args(["generate", "hi"]).quantize == "auto"
    assert build_parser().parse_args(["chat"]).quantize == "auto"
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert auto_mode(resolve(None), cpu) == ("mixed", "bfloat16")
    assert auto_mode(resolve(None), gpu) == (None, None)
    assert auto_mode(resolve("tiny-gemma3"), cpu) == (None, None)
    model = tiny_model("tiny-gemma3")
    native.save(tmp_path / "m", model.config, model.state_dict())
    assert auto_mode(resolve(str(tmp_path / "m")), cpu) == (None, None)
    g = opengemma.load("tiny-gemma3", quantize="auto")  # a float model: loaded as with quantize=None
    assert g.model.final_norm.weight.dtype == torch.float32 and not isinstance(g.model.embed, ScreenedEmbedding)


def test_auto_mode_parses_a_gguf_header_once_per_file_version(tmp_path, monkeypatch, gguf_path):
    """auto_mode's answer is remembered with the weight cache (the header parse and the gguf-py
    import cost ~0.1 s of every start); a changed file is parsed again; without a cache it parses."""
    import os
    import shutil

    from opengemma.api import auto_mode, resolve
    from opengemma.checkpoints import cache as weight_cache
    from opengemma.checkpoints import gguf

    monkeypatch.setenv("OPENGEMMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OPENGEMMA_NO_CACHE", raising=False)
    path = tmp_path / "model.gguf"
    shutil.copyfile(gguf_path, path)
    parses = []
    real = gguf._Mapped

    def counted(*args, **kwargs):
        parses.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf, "_Mapped", counted)
    cpu = torch.device("cpu")
    assert auto_mode(resolve(str(path)), cpu) == ("mixed", "bfloat16") and len(parses) == 1
    assert auto_mode(resolve(str(path)), cpu) == ("mixed", "bfloat16") and len(parses) == 1
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new version of the file
    assert auto_mode(resolve(str(path)), cpu) == ("mixed", "bfloat16") and len(parses) == 2
    monkeypatch.setenv("OPENGEMMA_NO_CACHE", "1")
    assert auto_mode(resolve(str(path)), cpu) == ("mixed", "bfloat16") and len(parses) == 3
    monkeypatch.delenv("OPENGEMMA_NO_CACHE")

    def read_only(*_):
        raise PermissionError("read-only cache")

    monkeypatch.setattr(weight_cache, "_write_index", read_only)  # a read-only cache still answers
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert auto_mode(resolve(str(path)), cpu) == ("mixed", "bfloat16") and len(parses) == 4
    assert auto_mode(resolve(str(path)), cpu) == ("mixed", "bfloat16") and len(parses) == 5  # not kept


def test_cache_entries_are_aligned_for_the_packed_kernels(tmp_path):
    """The converted-weight cache memory-maps its tensors; torch's packed int8 kernel faults on a
    weight that is not 64-byte aligned (seen with mixed mode's entry), so entries align every tensor."""
    from safetensors.torch import load_file, save_file

    from opengemma.checkpoints import cache as weight_cache

    g = torch.Generator().manual_seed(0)
    state = {"a.qweight": torch.randint(-127, 127, (3, 5), dtype=torch.int8, generator=g),
             "a.scales": torch.rand(3, generator=g).bfloat16(), "b.weight": torch.randn(2, 3, generator=g),
             "c.flag": torch.tensor([True, False, True]), "d.empty": torch.zeros(0, 4)}
    path = tmp_path / "model.safetensors"
    weight_cache._save_aligned(state, path)
    back = weight_cache.load_mmap_safetensors(path)
    assert back.keys() == state.keys()
    for name, t in state.items():
        assert torch.equal(back[name], t) and back[name].dtype == t.dtype
        assert back[name].data_ptr() % weight_cache.ALIGN == 0 or t.numel() == 0
    theirs = load_file(str(path))  # still a valid safetensors file (pads are ordinary tensors)
    assert all(torch.equal(theirs[n], t) for n, t in state.items())
    assert any(n.startswith(weight_cache.PAD_PREFIX) for n in theirs)
    # a file aligned to 8 bytes only (safetensors' own writer): misaligned views are copied
    save_file({"q": state["a.qweight"], "x": torch.zeros(1, dtype=torch.int8)}, str(path))
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        starts = [8 + n + v["data_offsets"][0] for k, v in json.loads(f.read(n)).items() if k != "__metadata__"]
    assert any(s % weight_cache.ALIGN for s in starts)  # the case really arises in this file
    back = weight_cache.load_mmap_safetensors(path)
    assert all(t.data_ptr() % weight_cache.ALIGN == 0 for t in back.values())
    assert torch.equal(back["q"], state["a.qweight"])
