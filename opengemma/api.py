"""The Python API: ``opengemma.load()`` and the :class:`Gemma` bundle (model + tokenizer + config).

``load(model=None)`` accepts the embedded default (None), a GGUF file, a Hugging Face or opengemma
directory, a preset name (random weights of that shape: for benchmarks and smoke tests), or a
Hugging Face hub id ("google/gemma-2b", downloaded with ``huggingface_hub`` when that is
installed and the hub is reachable). Every prompt goes through the one chat formatter
(report Tables 3 and 4) when it is a conversation, and through the one generation engine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from . import generate as gen_mod
from .chat import format_chat
from .checkpoints import cache as weight_cache
from .checkpoints import load_weights, reader
from .checkpoints.resolve import Source, load_tokenizer, read_config, resolve
from .config import GemmaConfig
from .errors import OpenGemmaError
from .model import GemmaModel, build_model
from .tokenizer import Tokenizer

__all__ = ["Gemma", "Source", "auto_mode", "load", "load_config", "load_tokenizer", "parse_device", "parse_dtype", "resolve"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None picks fp32 on CPU (fastest and exact there) and bf16 on accelerators."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise OpenGemmaError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise OpenGemmaError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OpenGemmaError(f"device {device!r} was asked for but CUDA is not available")
    return dev


def load_config(model: str | os.PathLike | None) -> GemmaConfig:
    """Only the config (no weights read): for `opengemma info`."""
    return read_config(resolve(model))


class Gemma:
    """A loaded model: ``g.model`` (nn.Module), ``g.tokenizer``, ``g.config``, and generation helpers."""

    def __init__(self, model: GemmaModel, tokenizer: Tokenizer, name: str = "gemma"):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.name = name

    @property
    def device(self) -> torch.device:
        return self.model.final_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.final_norm.weight.dtype

    def __repr__(self) -> str:
        return f"Gemma({self.name!r}, {self.config.name}, dtype={self.dtype}, device={self.device})"

    # -- generation ------------------------------------------------------------------------------
    def _gen_config(self, max_new_tokens, temperature, top_k, top_p, seed, stop, speculate=0,
                    ) -> "gen_mod.GenerationConfig":
        if isinstance(stop, str):
            stop = (stop,)
        return gen_mod.GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                        top_p=top_p, seed=seed, stop=tuple(stop or ()), speculate=speculate)

    def generate(self, prompt: str | list[str], *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: str | list[str] | None = None, speculate: int = 0,
                 stats: "gen_mod.GenerationStats | None" = None) -> str | list[str]:
        """Continue one prompt (returns a str) or a batch of prompts (returns a list), batched in one pass.
        ``speculate`` k > 0: lossless speculative decoding with prompt-lookup drafts, k per forward
        (one prompt; :mod:`opengemma.speculative`). ``stats``: a :class:`GenerationStats` to fill."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise OpenGemmaError("prompt must be a string or a non-empty list of strings")
        ids = [self._checked(self.tokenizer.encode(p, bos=True)) for p in prompts]
        gen = self._gen_config(max_new_tokens, temperature, top_k, top_p, seed, stop, speculate)
        outs = gen_mod.generate(self.model, self.tokenizer, ids, gen, stats=stats)
        texts = [o.text for o in outs]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, **kwargs) -> Iterator[str]:
        """Yield the continuation of one prompt piece by piece, as soon as each piece is final."""
        if not isinstance(prompt, str):
            raise OpenGemmaError("prompt must be a string")
        return self._stream_ids(self._checked(self.tokenizer.encode(prompt, bos=True)), **kwargs)

    def _checked(self, ids: list[int]) -> list[int]:
        """Token ids must exist in the model's embedding (a tokenizer/model mismatch otherwise)."""
        if ids and max(ids) >= self.config.vocab_size:
            raise OpenGemmaError(f"token id {max(ids)} is outside the model's vocabulary of {self.config.vocab_size}: "
                                 "the tokenizer does not match this model")
        return ids

    def _stream_ids(self, ids: list[int], *, max_new_tokens: int = 256, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    stop: str | list[str] | None = None, speculate: int = 0,
                    stats: "gen_mod.GenerationStats | None" = None, drafter=None) -> Iterator[str]:
        gen = self._gen_config(max_new_tokens, temperature, top_k, top_p, seed, stop, speculate)
        return gen_mod.stream_text(self.model, self.tokenizer, ids, gen, stats=stats, drafter=drafter)

    def chat(self, messages: list[dict], *, stream: bool = False, **kwargs) -> str | Iterator[str]:
        """Reply to a conversation (``[{"role": "user", "content": ...}, ...]``) as the model turn."""
        ids = self._checked(format_chat(self.tokenizer, messages, add_generation_prompt=True).ids)
        pieces = self._stream_ids(ids, **kwargs)
        return pieces if stream else "".join(pieces)


KERNELS = ("auto", "native", "torch")  # load(kernels=...): the quantized linears' CPU kernels
FLOAT_GGUF = frozenset({"F32", "F16", "BF16", "F64"})  # GGUF tensor types that are not quantized


def auto_mode(src: Source, device: torch.device) -> tuple[str | None, str | None]:
    """(quantize, dtype) of ``quantize="auto"``, the commands' default: a quantized GGUF file on the
    CPU runs in ``mixed`` mode with bf16 activations (every weight at no less than its file's
    precision; on the embedded 270M perplexity within 1% of llama.cpp's on the same file, decode
    about 1.9x and prefill 1.8x fp32's: ``bench/results/cpu-draft-chat-xeon.md``); anything else
    (float checkpoints, presets, GPUs) runs unquantized in the usual default dtype."""
    if device.type != "cpu" or src.kind != "gguf":
        return None, None

    def probe() -> bool:
        from .checkpoints import gguf

        with gguf._Mapped(src.path) as m:
            return any(t.qtype.name not in FLOAT_GGUF for t in m.header.tensors)

    # Remembered with the weight cache: parsing the header (and importing gguf-py) cost ~0.1 s of
    # every start.
    quantized = weight_cache.remember(src.path, "gguf_quantized", probe) if weight_cache.enabled() else probe()
    return ("mixed", "bfloat16") if quantized else (None, None)


def _check_kernels(kernels: str) -> None:
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")


def use_kernels(net, kernels: str = "auto") -> int:
    """Route a quantized model's decode-sized CPU calls through opengemma's native kernels
    (:mod:`opengemma.quant.native`) as ``load(kernels=...)`` asks; returns how many layers use them."""
    from . import quant

    _check_kernels(kernels)
    quantized = isinstance(getattr(net, "embed", None), quant.QuantizedEmbedding)
    if kernels == "native" and not quantized:
        raise OpenGemmaError("kernels='native' needs a quantized model (quantize='int8', 'int4', 'mixed', or 'auto' on a "
                         "quantized GGUF file)")
    if not quantized:
        return 0
    from .quant import native

    n = native.use_native(net, kernels != "torch")
    if n == 0 and kernels == "native":
        raise OpenGemmaError(f"opengemma's native kernels are unavailable: {native.unavailable_reason() or 'no layer fits'}")
    return n


def load(model: str | os.PathLike | None = None, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None, seed: int = 0, quantize: str | None = None,
         compile: bool = False, kernels: str = "auto") -> Gemma:
    """Load a model (None = the embedded Gemma 3 270M) ready for generation.

    ``seed`` only matters for presets, whose weights are random (:meth:`GemmaModel.init_weights`).
    ``quantize``: None/"none", "auto" (:func:`auto_mode`), "int8", "int4" or "mixed" weight-only quantization
    (:mod:`opengemma.quant`); GGUF weights go straight into quantized modules, without a float
    copy of the model. "mixed" keeps int8's weights (a GGUF's 4-bit tensors as int4, the rest
    int8) and reads the 8-bit output head through a 4-bit screen when decoding: the top
    candidates carry exact 8-bit logits (:mod:`opengemma.quant.head`).
    ``kernels`` (quantized models on the CPU): "auto" (default) runs decode-sized calls (at most 16
    rows) through opengemma's own int8 x int8 kernels where the CPU and a C compiler allow
    (:mod:`opengemma.quant.native`: activations rounded to 8 bits per block of 32, as llama.cpp
    does; the exact 8-bit head values stay on PyTorch's kernel), else PyTorch's; "native" insists on
    them (ValueError naming what is missing); "torch" keeps PyTorch's weight-only kernels (bf16
    activations).
    ``compile``: run the decode step through ``torch.compile`` (:mod:`opengemma.compiled`; CUDA
    graphs on GPU), falling back to eager with a one-line warning where compiling fails.

    A library call: the interpreter is left as it was (the command line's process settings,
    :mod:`opengemma.process`, are the CLI's to apply).
    """
    from . import quant

    _check_kernels(kernels)
    quantize = None if quantize in (None, "none") else quantize
    if quantize is not None and quantize != "auto":
        quant.check_mode(quantize)
    dev = parse_device(device)
    src = resolve(model)
    if quantize == "auto":
        quantize, auto_dtype = auto_mode(src, dev)
        dtype = dtype if dtype is not None else auto_dtype
    dt = parse_dtype(dtype, dev)
    if src.kind == "preset":
        net = build_model(read_config(src), device=dev, dtype=dt)
        net.init_weights(torch.Generator(device=dev).manual_seed(seed)).eval()
        tokenizer = load_tokenizer(src, net.config)
    elif src.kind == "gguf" and weight_cache.enabled() and (dev.type == "cpu" or not quantize):
        net, tokenizer = weight_cache.load_gguf(src.path, dtype=dt, device=dev, quantize=quantize)
    elif quantize and src.kind == "gguf":  # straight into quantized modules, no float model
        from .quant import gguf as quant_gguf

        _, net = quant_gguf.quantized_from_gguf(src.path, quantize, dtype=dt, device=dev)
        tokenizer = load_tokenizer(src, net.config)
    else:
        config, state_dict = reader(src.kind).load(src.path, dtype=dt)
        net = load_weights(config, state_dict, dtype=dt, device=dev)
        tokenizer = load_tokenizer(src, net.config)
    if quantize and not isinstance(net.embed, quant.QuantizedEmbedding):
        quant.quantize_model(net, quantize)
    use_kernels(net, kernels)
    if compile:
        from . import compiled

        compiled.enable(net)
    return Gemma(net, tokenizer, src.name)
