"""Presets and parameter counts: Table 1's shapes must give Table 2's counts to the unit."""

from __future__ import annotations

import pytest
import torch

from opengemma.config import GLOBAL, LOCAL, PRESETS, GemmaConfig, layer_pattern, preset
from opengemma.errors import OpenGemmaError
from opengemma.model import build_model

TABLE_2 = {"gemma-2b": (524_550_144, 1_981_884_416), "gemma-7b": (786_825_216, 7_751_248_896)}


@pytest.mark.parametrize("name", list(TABLE_2))
def test_table2_counts_on_meta_device(name):
    model = build_model(PRESETS[name], device="meta")
    embedding = model.embed.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    assert (embedding, total - embedding) == TABLE_2[name]
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_counts_match_the_built_model(name):
    cfg = PRESETS[name]
    model = build_model(cfg, device="meta")
    total = sum(p.numel() for p in model.parameters())
    assert cfg.embedding_params == model.embed.weight.numel()
    assert cfg.non_embedding_params == total - cfg.embedding_params


def test_table1_shapes():
    two, seven = PRESETS["gemma-2b"], PRESETS["gemma-7b"]
    assert (two.d_model, two.n_layers, 2 * two.ffn_dim, two.n_heads, two.n_kv_heads, two.head_dim) == (
        2048, 18, 32768, 8, 1, 256)
    assert (seven.d_model, seven.n_layers, 2 * seven.ffn_dim, seven.n_heads, seven.n_kv_heads, seven.head_dim) == (
        3072, 28, 49152, 16, 16, 256)
    assert two.vocab_size == seven.vocab_size == 256_128 and two.context_length == 8192


def test_layer_patterns():
    assert layer_pattern(4, 1) == (LOCAL, GLOBAL, LOCAL, GLOBAL)  # Gemma 2: layer 0 is local
    assert layer_pattern(12, 5) == (LOCAL,) * 5 + (GLOBAL,) + (LOCAL,) * 5 + (GLOBAL,)  # Gemma 3
    g3 = PRESETS["gemma3-270m"]
    assert [g3.is_local(i) for i in range(6)] == [True] * 5 + [False]
    assert not PRESETS["gemma-2b"].is_local(0)


def test_json_round_trip():
    for cfg in PRESETS.values():
        assert GemmaConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("changes, message", [
    (dict(n_heads=3), "multiple of n_kv_heads"),
    (dict(d_model=0), "d_model"),
    (dict(layer_types=(LOCAL,)), "layer_types"),
    (dict(sliding_window=None), "sliding_window"),
])
def test_invalid_configs_are_one_clear_error(changes, message):
    with pytest.raises(OpenGemmaError, match=message):
        PRESETS["tiny-gemma3"].replace(**changes)


def test_unknown_preset_and_fields():
    with pytest.raises(OpenGemmaError, match="unknown preset"):
        preset("gemma-3b")
    with pytest.raises(OpenGemmaError, match="unknown config field"):
        GemmaConfig.from_dict({**PRESETS["tiny-gemma1"].to_dict(), "bogus": 1})


def test_frozen():
    with pytest.raises(Exception):
        PRESETS["gemma-2b"].d_model = 1  # type: ignore[misc]
    assert torch.is_tensor(torch.zeros(1))
