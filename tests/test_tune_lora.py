"""LoRA: zero-init adapters change nothing, merge == unmerged, unmerge restores, only adapters get
gradients, the tied embedding is refused as a target and exported once, adapter files round-trip."""

from __future__ import annotations

import pytest
import torch
from test_tune_helpers import ChatByteTokenizer, one_thread  # noqa: F401 (fixture)

from opengemma.chat import format_chat
from opengemma.errors import OpenGemmaError
from opengemma.model import GemmaModel
from opengemma.testing import tiny_model
from opengemma.train import lora
from opengemma.train.losses import next_token_loss

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENS = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))


def _randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("preset", ["tiny-gemma3", "tiny-gemma2"])
def test_zero_init_leaves_outputs_unchanged(preset):
    model = tiny_model(preset)
    before = model(TOKENS)
    names = lora.apply_lora(model, lora.LoRAConfig(rank=4))
    assert len(names) == 7 * model.config.n_layers
    assert torch.equal(model(TOKENS), before)


@pytest.mark.parametrize("preset", ["tiny-gemma3", "tiny-gemma2"])
def test_merged_equals_unmerged_and_unmerge_restores(preset):
    model = tiny_model(preset)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    base_out = model(TOKENS)
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8))
    _randomize_adapters(model)
    unmerged = model(TOKENS)
    assert (unmerged - base_out).abs().max() > 1e-3  # the adapter does something
    lora.merge(model)
    assert (model(TOKENS) - unmerged).abs().max() < 1e-5 * unmerged.abs().max().clamp(min=1)
    with pytest.raises(OpenGemmaError, match="merged"), lora.disabled(model):
        pass
    lora.unmerge(model)
    restored = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert max((restored[k] - base[k]).abs().max().item() for k in base) < 1e-6
    with lora.disabled(model):
        assert torch.allclose(model(TOKENS), base_out, atol=1e-5)


def test_merged_state_dict_is_a_plain_model_with_one_embedding():
    model = tiny_model("tiny-gemma3")
    lora.apply_lora(model, lora.LoRAConfig(rank=2))
    _randomize_adapters(model)
    expected = model(TOKENS)
    sd = lora.merged_state_dict(model)
    plain = GemmaModel(model.config)
    plain.load_state_dict(sd)  # strict: exactly the plain model's names
    assert [k for k in sd if "embed" in k] == ["embed.weight"]
    assert not any("lora" in k or ".base." in k for k in sd)
    assert (plain(TOKENS) - expected).abs().max() < 1e-4
    lora.unwrap(model)
    assert not lora.lora_modules(model) and (model(TOKENS) - expected).abs().max() < 1e-4


def test_only_adapter_parameters_receive_gradients():
    tok = ChatByteTokenizer()
    model = tiny_model("tiny-gemma3").train()
    lora.apply_lora(model, lora.LoRAConfig(rank=4, targets=("q_proj", "v_proj")))
    ct = format_chat(tok, [{"role": "user", "content": "hi"}, {"role": "model", "content": "hello there"}], False)
    ids = torch.tensor([ct.ids])
    out = next_token_loss(model, ids[:, :-1], ids[:, 1:], torch.tensor([ct.mask[1:]], dtype=torch.bool))
    out.loss_sum.backward()
    adapters = {id(p) for p in lora.adapter_parameters(model)}
    assert len(adapters) == 2 * 2 * model.config.n_layers
    for name, p in model.named_parameters():
        if id(p) in adapters:
            assert p.requires_grad
            if name.endswith("lora_A"):
                continue  # B is zero at init, so A's gradient is exactly zero; B's is not
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_embedding_is_not_a_target_and_unmatched_targets_fail():
    with pytest.raises(OpenGemmaError, match="tied embedding"):
        lora.apply_lora(tiny_model(), lora.LoRAConfig(targets=("embed",)))
    with pytest.raises(OpenGemmaError, match="no linear layer"):
        lora.apply_lora(tiny_model(), lora.LoRAConfig(targets=("qproj",)))
    with pytest.raises(OpenGemmaError, match="rank"):
        lora.LoRAConfig(rank=0)
    names = lora.apply_lora(tiny_model(), lora.LoRAConfig(targets=(r"re:layers\.0\..*_proj",)))
    assert len(names) == 7 and all(n.startswith("layers.0.") for n in names)


def test_adapter_files_round_trip_and_check_the_base(tmp_path):
    model = tiny_model("tiny-gemma3")
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=4))
    _randomize_adapters(model)
    expected = model(TOKENS)
    lora.save_adapter(tmp_path / "ad", model, base="tiny-gemma3")
    size = (tmp_path / "ad" / lora.ADAPTER_WEIGHTS).stat().st_size
    assert size < 0.1 * sum(p.numel() * 4 for p in model.parameters())  # the adapter alone, not the model
    fresh = lora.load_adapter(tiny_model("tiny-gemma3"), tmp_path / "ad")  # merged: a plain model
    assert not lora.lora_modules(fresh) and (fresh(TOKENS) - expected).abs().max() < 1e-4
    with pytest.raises(OpenGemmaError, match="another model"):
        lora.load_adapter(tiny_model("tiny-gemma2"), tmp_path / "ad")
    with pytest.raises(OpenGemmaError, match="not a LoRA adapter"):
        lora.load_adapter(tiny_model("tiny-gemma3"), tmp_path)
    (tmp_path / "ad" / lora.ADAPTER_WEIGHTS).write_bytes(b"junk")
    with pytest.raises(OpenGemmaError, match="corrupt"):
        lora.load_adapter(tiny_model("tiny-gemma3"), tmp_path / "ad")


@pytest.mark.parametrize("preset", ["tiny-gemma3", "tiny-gemma2"])
def test_frozen_base_held_in_bf16_equals_autocast_of_the_fp32_base(preset):
    """Under bf16 autocast, the base held in bf16 gives bitwise the loss and adapter gradients of the
    fp32 base (autocast casts the same values at every matmul); the embedding is pre-rounded to bf16
    here, its one lookup that would otherwise differ. Norm weights and adapters stay fp32."""
    tok = ChatByteTokenizer()
    ct = format_chat(tok, [{"role": "user", "content": "hi there"}, {"role": "model", "content": "hello, friend"}], False)
    ids = torch.tensor([ct.ids])
    mask = torch.tensor([ct.mask[1:]], dtype=torch.bool)
    runs = []
    for hold in (False, True):
        model = tiny_model(preset).train()
        with torch.no_grad():
            model.embed.weight.copy_(model.embed.weight.bfloat16().float())
        lora.apply_lora(model, lora.LoRAConfig(rank=4))
        _randomize_adapters(model)
        if hold:
            n = lora.hold_frozen_base(model, torch.bfloat16)
            assert n == 7 * model.config.n_layers + 1  # every adapted linear's base, and the tied embedding
            assert model.embed.weight.dtype == torch.bfloat16 and model.final_norm.weight.dtype == torch.float32
            assert all(p.dtype == torch.float32 for p in lora.adapter_parameters(model))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = next_token_loss(model, ids[:, :-1], ids[:, 1:], mask)
        out.loss_sum.backward()
        runs.append((out.loss_sum.detach(), [p.grad.clone() for p in lora.adapter_parameters(model)]))
    (loss32, g32), (loss16, g16) = runs
    assert torch.equal(loss32, loss16)
    assert all(torch.equal(a, b) for a, b in zip(g32, g16))
    assert any(g.abs().sum() > 0 for g in g16)
