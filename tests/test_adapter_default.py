"""The chat adapter shipped for the embedded model (issue 17, item 7): `--adapter default` names it;
it is small, fits the embedded Gemma 3 270M, carries the Gemma terms notice, and its chat turns
mostly end where the base model's run on to the token cap."""

from __future__ import annotations

import pytest
import torch

from opengemma.cli import main
from opengemma.generate import GenerationStats
from opengemma.train import lora

# General questions of the kind the base model rambles on after (none is in the adapter's data).
# Measured in fp32 at this cap (bench/results/chat-adapter-270m/): the adapter ends 5 of 7 turns
# (the sleep tips and the book recommendation loop), the base model none.
PROMPTS = ["What is the capital of France?", "Give me two tips for sleeping better.",
           "A shop sells pens at 3 dollars each. How much do 7 pens cost?",
           "What is the next letter in the series: A, C, F, J, O, ___?",
           "Can you recommend a good book to read on holiday?", "How do I boil an egg?",
           "Write a haiku about the sea."]
CAP = 128


def test_shipped_adapter_is_small_fits_the_embedded_model_and_carries_the_notice(real_gemma, tmp_path):
    d = lora.adapter_dir("default")
    assert d == lora.SHIPPED_DIR / "default" and lora.adapter_dir(tmp_path) == tmp_path
    assert (d / lora.ADAPTER_WEIGHTS).stat().st_size < 10 * 2**20  # "a few MB"
    notice = (d / "NOTICE").read_text()
    assert "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms" in notice
    cfg, info, tensors = lora.read_adapter("default")
    mine = real_gemma.config.to_dict()
    assert {k: info["base_config"][k] for k in ("d_model", "n_layers", "vocab_size")} == {
        k: mine[k] for k in ("d_model", "n_layers", "vocab_size")}
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    assert any(float(t.abs().max()) > 0 for k, t in tensors.items() if k.endswith("lora_B"))  # trained, not fresh


def test_default_adapter_ends_its_turns_where_the_base_model_runs_on(real_gemma, gguf_path, capsys):
    def ended(g, prompts=PROMPTS) -> list[bool]:
        out = []
        for p in prompts:
            st = GenerationStats()
            g.chat([{"role": "user", "content": p}], max_new_tokens=CAP, stats=st)
            out.append(st.stopped == 1)
        return out

    tuned = lora.load_with_adapter(gguf_path, "default", dtype="float32", device="cpu")
    assert tuned.name.endswith("+adapter-default")
    mine = ended(tuned)
    assert mine.count(True) >= 4, mine  # 5 measured; one spare for a near-tie on another CPU
    assert ended(real_gemma, PROMPTS[:3]) == [False] * 3  # measured: it runs on to the cap
    capsys.readouterr()
    assert main(["generate", "--chat", "--adapter", "default", "-n", "64", PROMPTS[0]]) == 0
    assert "Paris" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["no-such-adapter-dir"])
def test_a_missing_adapter_is_one_line(bad, capsys):
    assert main(["generate", "--adapter", bad, "-n", "2", "hi"]) == 1
    err = capsys.readouterr().err
    assert "not a LoRA adapter directory" in err and "Traceback" not in err
