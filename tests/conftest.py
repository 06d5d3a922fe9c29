"""Shared test fixtures: the embedded real model, and transformers' own loading of it (once per run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    """The embedded Gemma 3 270M GGUF, assembled by opengemma."""
    from opengemma.embedded import embedded_path

    return embedded_path(progress=False)


@pytest.fixture(scope="session")
def tokenizer(gguf_path):
    from opengemma.tokenizer import Tokenizer

    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(gguf_path):
    """transformers' tokenizer built from the same GGUF (slow: ~15 s)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def hf_gguf_model(hf_gguf_state_dict):
    """transformers' model with its own dequantization of the same GGUF, fp32, eager attention."""
    transformers = pytest.importorskip("transformers")
    config, tensors = hf_gguf_state_dict
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="session")
def real_gemma(gguf_path):
    """The embedded model loaded by opengemma in fp32 on the CPU."""
    import opengemma

    return opengemma.load(gguf_path, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def served_gemma(gguf_path):
    """The embedded model as ``opengemma serve`` loads it by default (``--quantize auto``: mixed with
    bf16 activations, native kernels where the CPU allows)."""
    import opengemma

    return opengemma.load(gguf_path, quantize="auto", device="cpu")


@pytest.fixture(scope="session")
def hf_gguf_state_dict(gguf_path):
    """transformers' own GGUF loading of the embedded file, as (HF config, {HF name: fp32 tensor}).

    The same path ``from_pretrained(..., gguf_file=...)`` takes (``load_gguf_checkpoint`` with the
    model for the name map), minus the accelerate-only device placement; ~30 s.
    """
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed = load_gguf_checkpoint(str(gguf_path))
    config = transformers.AutoConfig.for_model(**parsed["config"])
    with torch.device("meta"):  # only the module tree is needed, for the GGUF -> HF name map
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton,
                                   torch_dtype=torch.float32)["tensors"]
    return config, tensors
