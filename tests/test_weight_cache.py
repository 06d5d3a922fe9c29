"""The converted-weight cache behind fast cold starts: hits, content keys, damage, and opt-out."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import opengemma
from opengemma.checkpoints import cache as weight_cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENGEMMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OPENGEMMA_NO_CACHE", raising=False)
    return tmp_path / "cache" / "converted"


def _entries(cache_dir):
    return sorted(p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


@torch.no_grad()
def test_hit_equals_fresh_conversion_and_is_memory_mapped(cache_dir, gguf_path):
    tokens = torch.tensor([[2, 818, 5279, 529, 7001, 563]])
    first = opengemma.load(gguf_path)
    assert len(_entries(cache_dir)) == 1
    second = opengemma.load(gguf_path)
    assert torch.equal(first.model(tokens), second.model(tokens))
    assert second.tokenizer.encode("Hello <start_of_turn>") == first.tokenizer.encode("Hello <start_of_turn>")
    mapped = weight_cache.load_mmap_safetensors(_entries(cache_dir)[0] / "model.safetensors")
    assert torch.equal(mapped["embed.weight"][:4], first.model.embed.weight[:4])
    vocab = weight_cache.read_vocab(_entries(cache_dir)[0])  # the tokenizer's arrays: a fast start
    assert vocab is not None and len(vocab["types"]) == second.tokenizer.vocab_size
    assert second.tokenizer._pieces == first.tokenizer._pieces


def test_key_follows_content_and_options(cache_dir, gguf_path, tmp_path):
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(gguf_path, copy)
    a = weight_cache.entry_dir(copy, dtype="torch.float32")
    assert a == weight_cache.entry_dir(gguf_path, dtype="torch.float32")  # same bytes, same entry
    assert a != weight_cache.entry_dir(copy, dtype="torch.bfloat16")
    with open(copy, "r+b") as f:  # one byte of tensor data changes: a new key
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert weight_cache.entry_dir(copy, dtype="torch.float32") != a


@torch.no_grad()
def test_damaged_entry_is_rebuilt(cache_dir, gguf_path):
    g = opengemma.load(gguf_path)
    entry = _entries(cache_dir)[0]
    (entry / "model.safetensors").write_bytes(b"\x00" * 100)
    assert weight_cache.read(entry) is None
    again = opengemma.load(gguf_path)  # converts again and replaces the damaged entry
    tokens = torch.tensor([[2, 818, 5279]])
    assert torch.equal(g.model(tokens), again.model(tokens))
    assert weight_cache.read(entry) is not None


def test_opt_out(cache_dir, gguf_path, monkeypatch):
    monkeypatch.setenv("OPENGEMMA_NO_CACHE", "1")
    opengemma.load(gguf_path)
    assert not cache_dir.exists() or not _entries(cache_dir)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["int8", "int4", "mixed"])
def test_quantized_hit_equals_fresh_conversion(cache_dir, gguf_path, mode):
    from opengemma.generate import decode_step, prefill
    from opengemma.quant import QuantizedEmbedding

    first = opengemma.load(gguf_path, quantize=mode)  # converts the GGUF, stores the packed model
    assert len(_entries(cache_dir)) == 1
    second = opengemma.load(gguf_path, quantize=mode)  # memory-maps it
    assert isinstance(second.model.embed, QuantizedEmbedding) and second.model.layers[0].attn.qkv_proj is not None
    prompt = [2, 818, 5279, 529, 7001, 563]
    steps = []
    for g in (first, second):
        cache = g.model.make_cache(1, 16)
        logits = prefill(g.model, cache, [prompt])  # short: the packed kernels, as in decoding
        steps.append(torch.stack([logits, decode_step(g.model, torch.tensor([[9]]), torch.tensor([[6]]), cache)]))
    assert torch.equal(steps[0], steps[1])
    # A plan that no longer fits its tensors is a damaged entry: converted again, not an error.
    entry = _entries(cache_dir)[0]
    meta = json.loads((entry / "meta.json").read_text())
    meta["extra"]["plan"].pop("embed")
    (entry / "meta.json").write_text(json.dumps(meta))
    third = opengemma.load(gguf_path, quantize=mode)
    assert isinstance(third.model.embed, QuantizedEmbedding)
    assert "embed" in json.loads((entry / "meta.json").read_text())["extra"]["plan"]  # entry replaced
