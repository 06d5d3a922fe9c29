"""Corrupt weights never pass silently: the finite-weight check at load, and non-finite logits in
generation and scoring (issue 13, item 3).

The main case is the one reproduced in the issue: the embedded GGUF with an intact header and
2,000 bytes changed in its last 50 MB (seeded), which used to give NaN logits and an empty line
with exit status 0. It is made once per module (a 250 MB copy) and must now be refused with one
line naming the file and the first bad tensor -- by ``opengemma.load`` and by ``opengemma generate``,
on the float path and both quantized paths, with and without the converted-weight cache. Planted
NaN/inf/huge values cover the HF and native loaders; a model whose forward gives NaN (weights
changed after loading, past the check) covers generation, the CLI and the eval scorer.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

import opengemma
from opengemma import cli
from opengemma.checkpoints import cache as weight_cache
from opengemma.checkpoints import MATRIX_LIMIT, check_finite, expected_shapes, weight_limit
from opengemma.checkpoints import gguf as ckpt_gguf
from opengemma.checkpoints import hf as ckpt_hf
from opengemma.checkpoints import native as ckpt_native
from opengemma.config import PRESETS
from opengemma.errors import OpenGemmaError
from opengemma.eval.engine import LoglikRequest, Scorer
from opengemma.eval.memorization import greedy_continuations
from opengemma.generate import NonFiniteLogitsError
from opengemma.quant import Int4Linear
from opengemma.quant.gguf import _group_extent

FLIPS, TAIL = 2_000, 50_000_000
# Any warning (numpy's "invalid value encountered" from a NaN scale) would be a second line on stderr.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


@pytest.fixture(scope="module")
def corrupt_gguf(tmp_path_factory, gguf_path):
    """The embedded GGUF with FLIPS bytes of its last TAIL bytes changed (each XOR a non-zero byte)."""
    path = tmp_path_factory.mktemp("corrupt") / "corrupt.gguf"
    shutil.copyfile(gguf_path, path)
    size = path.stat().st_size
    rng = np.random.default_rng(0)
    where = size - TAIL + rng.choice(TAIL, FLIPS, replace=False)
    data = np.memmap(path, np.uint8, "r+")
    data[where] ^= rng.integers(1, 256, FLIPS, dtype=np.uint8)
    data.flush()
    del data
    return path


def one_line(message: str, *parts: str) -> None:
    assert "\n" not in message and "Traceback" not in message, message
    for part in parts:
        assert part in message, (part, message)


def _values(data: np.ndarray, info) -> np.ndarray:
    """gguf-py's own dequantization of one tensor, in the file's convention (norms still + 1)."""
    rows = data[info.offset:info.offset + info.n_bytes].reshape(-1, info.n_bytes // int(np.prod(info.shape[:-1])))
    with np.errstate(over="ignore", invalid="ignore"):
        return gguf_dequantize(rows, info.qtype).astype(np.float32)


def _bad(values: np.ndarray) -> bool:
    limit = weight_limit(values.shape) + (1 if values.ndim == 1 else 0)  # norms are stored as 1 + w
    return not np.isfinite(values).all() or np.abs(values).max() > limit


def test_load_names_the_first_bad_tensor(corrupt_gguf, monkeypatch):
    monkeypatch.setenv("OPENGEMMA_NO_CACHE", "1")
    with pytest.raises(OpenGemmaError) as e:
        opengemma.load(corrupt_gguf)
    message = str(e.value)
    one_line(message, str(corrupt_gguf), "the file is corrupt")
    named = re.search(r"tensor (\S+) has", message).group(1)
    # Checked independently: the named tensor is bad, and every tensor before it (in file order,
    # the order of loading) that the corruption touched is not.
    header = ckpt_gguf.read_header(corrupt_gguf)
    data = np.memmap(corrupt_gguf, np.uint8, "r")
    start = header.file_size - TAIL
    order = [t.name for t in header.tensors]
    touched = [t for t in header.tensors if t.offset + t.n_bytes > start]
    assert _bad(_values(data, next(t for t in header.tensors if t.name == named)))
    assert not any(_bad(_values(data, t)) for t in touched if order.index(t.name) < order.index(named))


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_cli_generate_refuses_corrupt_gguf(corrupt_gguf, mode, tmp_path, monkeypatch, capsys):
    """Through the converted-weight cache (the default): one line, exit 1, and nothing cached."""
    monkeypatch.setenv("OPENGEMMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OPENGEMMA_NO_CACHE", raising=False)
    argv = ["generate", "The three primary colors are", "-n", "4", "--model", str(corrupt_gguf)]
    rc = cli.main(argv + (["--quantize", mode] if mode else []))
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert err.startswith("opengemma: error: ") and err.count("\n") == 1
    one_line(err.rstrip("\n"), str(corrupt_gguf), "tensor blk.", "the file is corrupt")
    converted = tmp_path / "cache" / "converted"
    entries = [p for p in converted.iterdir() if p.is_dir()] if converted.exists() else []
    assert entries == []


def test_cache_entry_is_trusted_only_when_checked(corrupt_gguf, tokenizer, tmp_path, monkeypatch):
    """A cache entry is keyed by the source's SHA-256 and was checked when it was made, so a start
    from it reads no weights; an entry made before the check existed is converted again."""
    monkeypatch.setenv("OPENGEMMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OPENGEMMA_NO_CACHE", raising=False)
    entry = weight_cache.entry_dir(corrupt_gguf, dtype=str(torch.float32))
    config, state = _tiny_state()  # stands in for a conversion of the file: tells the two loads apart
    weight_cache.write(entry, config, state, tokenizer.model_bytes(), extra={"weights_checked": True})
    g = opengemma.load(corrupt_gguf)  # served from the entry: the corrupt source is not converted
    assert g.config.name == PRESETS["tiny-gemma3"].name
    meta = json.loads((entry / "meta.json").read_text())
    meta["extra"] = {}
    (entry / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(OpenGemmaError) as e:  # unmarked: converted again, and so checked
        opengemma.load(corrupt_gguf)
    one_line(str(e.value), "the file is corrupt")


# -- HF and native loaders: planted values --------------------------------------------------------

def _tiny_state(dtype=torch.float32) -> tuple:
    config = PRESETS["tiny-gemma3"]
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(shape, generator=g) * 0.02).to(dtype) for k, shape in expected_shapes(config).items()}
    return config, state


@pytest.mark.parametrize("fmt", ["native", "hf"])
@pytest.mark.parametrize("name, value, file_dtype, load_dtype, expect", [
    ("layers.1.mlp.down_proj.weight", float("nan"), torch.float32, "float32", "has 1 non-finite value:"),
    ("embed.weight", float("inf"), torch.bfloat16, "float32", "has 1 non-finite value:"),
    ("layers.0.attn.q_proj.weight", 3e4, torch.float32, "bfloat16", "values up to 3e+04"),
    ("layers.0.pre_mlp_norm.weight", 2e6, torch.float32, "float16", "values up to 2e+06"),
])
def test_planted_value_is_refused(tmp_path, fmt, name, value, file_dtype, load_dtype, expect):
    config, state = _tiny_state(file_dtype)
    state[name].view(-1)[7] = value
    module = {"native": ckpt_native, "hf": ckpt_hf}[fmt]
    module.save(tmp_path / "ckpt", config, state)
    with pytest.raises(OpenGemmaError) as e:
        opengemma.load(tmp_path / "ckpt", dtype=load_dtype)
    file_name = name if fmt == "native" else ckpt_hf.to_hf_name(name, gemma1=False)
    one_line(str(e.value), f"tensor {file_name} ", expect, "the file is corrupt")


def test_large_but_plausible_values_load(tmp_path):
    """Norm weights in the thousands are real (the 270M's post_mlp_norm reaches 1,656)."""
    config, state = _tiny_state()
    state["layers.0.post_mlp_norm.weight"][:] = 5e3
    state["layers.1.attn.o_proj.weight"][:] = 500.0  # 2-norm above the limit, every value below it
    ckpt_native.save(tmp_path / "ckpt", config, state)
    g = opengemma.load(tmp_path / "ckpt")
    assert torch.equal(g.model.layers[0].post_mlp_norm.weight, state["layers.0.post_mlp_norm.weight"])


def test_check_finite_counts_and_limits():
    check_finite("w", torch.full((300, 300), 9e3), "f")  # norm 2.7e6 > limit: looked at, accepted
    check_finite("n", torch.full((10,), 9e5), "f")  # 1-D: the norm-weight limit
    w = torch.zeros(64, 64)
    w[3, :5] = float("nan")
    w[4, 0] = float("-inf")
    with pytest.raises(OpenGemmaError, match=r"^f: tensor w has 6 non-finite values: the file is corrupt$"):
        check_finite("w", w, "f")
    with pytest.raises(OpenGemmaError, match=r"values up to 2e\+04"):
        check_finite("w", torch.full((4, 4), -2e4), "f")
    check_finite("ids", torch.full((4,), 2**40), "f")  # integer tensors are not weights


def test_int4_group_extent_bounds_the_weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(192, 256, generator=g) * torch.rand(192, 1, generator=g) * 3
    mod = Int4Linear.from_float(w, act_dtype=torch.float32)
    per_group = mod.dequantize().abs().view(192, 8, 32).amax(-1).t()  # [K/g, N]
    extent = _group_extent(mod)  # [K/g, N]
    assert extent.shape == per_group.shape
    assert (per_group <= extent * (1 + 1e-6)).all() and (extent <= 2 * per_group).all()
    assert float(extent.max()) < MATRIX_LIMIT


# -- non-finite logits: generation, CLI, scoring --------------------------------------------------

def _nan_model() -> opengemma.api.Gemma:
    """The tiny preset with an inf planted in its final norm after loading (past the load check)."""
    g = opengemma.load("tiny-gemma3")
    with torch.no_grad():
        g.model.final_norm.weight[3] = float("inf")
    return g


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_raises_on_nonfinite_logits(temperature):
    g = _nan_model()
    with pytest.raises(NonFiniteLogitsError) as e:
        g.generate("Hi", max_new_tokens=4, temperature=temperature, seed=0)
    one_line(str(e.value), "non-finite logits (NaN/inf) at step 1", "corrupt")


def test_cli_generate_reports_nonfinite_logits(monkeypatch, capsys):
    g = _nan_model()
    monkeypatch.setattr(opengemma.api, "load", lambda *a, **k: g)
    rc = cli.main(["generate", "Hi", "-n", "3"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert err == "opengemma: error: the model produced non-finite logits (NaN/inf) at step 1: " \
                  "the weights are probably corrupt\n"


def test_eval_scoring_and_memorization_raise_on_nonfinite_logits():
    g = _nan_model()
    reqs = [LoglikRequest.make([2], [([5, 6], [7]), ([5], [8, 9])])]
    for score in (Scorer(g.model).score, Scorer(g.model).score_naive):
        with pytest.raises(NonFiniteLogitsError, match="while scoring"):
            score(reqs)
    with pytest.raises(NonFiniteLogitsError, match="at step 1"):
        greedy_continuations(g.model, [[2, 5, 6]], 4)
