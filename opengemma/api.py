"""The Python API: ``opengemma.load()`` and the :class:`Gemma` bundle (model + tokenizer + config).

``load(model=None)`` accepts the embedded default (None), a GGUF file, a Hugging Face or opengemma
directory, a preset name (random weights of that shape: for benchmarks and smoke tests), or a
Hugging Face hub id ("google/gemma-2b", downloaded with ``huggingface_hub`` when that is
installed and the hub is reachable). Every prompt goes through the one chat formatter
(report Tables 3 and 4) when it is a conversation, and through the one generation engine.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import generate as gen_mod
from .chat import format_chat
from .checkpoints import hf as hf_ckpt
from .checkpoints import native as native_ckpt
from .config import PRESETS, GemmaConfig
from .embedded import NAME as EMBEDDED_NAME
from .embedded import embedded_path
from .errors import OpenGemmaError
from .checkpoints import load_weights
from .model import GemmaModel, build_model
from .sp_vocab import NORMAL, UNUSED, _fields, _len_field, _parse_pieces
from .tokenizer import Tokenizer
from . import process, weight_cache

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


@dataclass(frozen=True)
class Source:
    """Where a model comes from: kind is 'gguf', 'hf', 'native' or 'preset'."""

    kind: str
    path: Path | None
    name: str


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def resolve(model: str | os.PathLike | None) -> Source:
    """Turn a --model argument into a :class:`Source`; the config itself always comes from the file."""
    if model is None:
        path = embedded_path()
        return Source("gguf", path, EMBEDDED_NAME)
    text = str(model)
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~name" of no known user: not a path then
        path = Path(text)
    if path.is_file():
        if path.suffix == ".gguf" or _is_gguf(path):
            return Source("gguf", path, path.name)
        if path.name == "config.json":
            path = path.parent
        else:
            raise OpenGemmaError(f"{path}: not a GGUF file (give a .gguf file, a checkpoint directory or a preset)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise OpenGemmaError(f"{path}: directory has no config.json")
        kind = "native" if native_ckpt.is_native(path) else "hf"
        return Source(kind, path, path.name)
    if text in PRESETS:
        return Source("preset", None, text)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists():
        return Source("hf", _hub_download(text), text)
    raise OpenGemmaError(f"no such model file, directory or preset: {text!r} "
                         f"(presets: {', '.join(PRESETS)})")


def _hub_download(repo_id: str) -> Path:
    """Fetch a Hugging Face hub repository's config, weights and tokenizer (needs huggingface_hub)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise OpenGemmaError(f"{repo_id!r} is not a local path; to download it from the hub, "
                             "pip install huggingface_hub") from None
    try:
        local = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    except Exception as e:  # network errors, gated repos, missing repos: all one line for the user
        raise OpenGemmaError(f"cannot download {repo_id!r} from the Hugging Face hub: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return Path(local)


def _checkpoint_module(kind: str):
    """The reader of one checkpoint kind. The GGUF one is imported on first use: it imports the
    ``gguf`` package (~45 ms of every start-up), which a load served by the converted-weight cache
    never needs."""
    if kind == "gguf":
        from .checkpoints import gguf as gguf_ckpt

        return gguf_ckpt
    return {"hf": hf_ckpt, "native": native_ckpt}[kind]


def load_config(model: str | os.PathLike | None) -> GemmaConfig:
    """Only the config (no weights read): for `opengemma info`."""
    src = resolve(model)
    if src.kind == "preset":
        return PRESETS[src.name]
    return _checkpoint_module(src.kind).read_config(src.path)


def load_tokenizer(src: Source, config: GemmaConfig) -> Tokenizer:
    if src.kind == "gguf":
        return Tokenizer.from_gguf(src.path)
    if src.path is not None and (src.path / "tokenizer.model").is_file():
        return Tokenizer.from_file(src.path / "tokenizer.model")
    # Presets and directories without a tokenizer: Gemma's vocabularies share their first
    # 256k pieces, so the embedded tokenizer serves any model whose ids it covers.
    tok = _embedded_tokenizer(embedded_path())
    where = f"in {src.path}" if src.path else f"for preset {src.name!r}"
    if config.vocab_size > tok.vocab_size + 64:
        raise OpenGemmaError(f"no tokenizer.model {where}, and the embedded tokenizer does not cover "
                             f"{config.vocab_size} ids")
    if config.vocab_size < tok.vocab_size:
        return _first_pieces(tok, config.vocab_size, where)
    return tok


@functools.lru_cache(maxsize=2)
def _embedded_tokenizer(path: Path) -> Tokenizer:
    """The embedded GGUF's tokenizer (0.5 s to build), once per process: presets load it each time."""
    return Tokenizer.from_gguf(path)


def _first_pieces(tok: Tokenizer, n: int, where: str) -> Tokenizer:
    """The tokenizer cut down to its first ``n`` pieces, for a smaller model (the tiny presets'
    512 ids).

    Why this rather than widening the model's vocabulary to the tokenizer's: the model stays
    exactly the shape its name and `opengemma info` give, and the cut is still a complete Gemma
    tokenizer. Gemma 3's first 512 ids hold every control token (<bos>, <eos>, <start_of_turn>,
    <end_of_turn>, ...), the newline and whitespace-run pieces and all 256 byte pieces, so
    sentencepiece's byte fallback encodes any text with ids below ``n``, and the chat format's
    ids are the full tokenizer's.

    Two changes make it a tokenizer every implementation reads alike. The ordinary (merged)
    pieces that made the cut ("▁t", "he", ...; 18 of 512) are marked unused: their parts (single
    letters) did not make it, and sentencepiece would still merge letters into them while
    transformers and llama.cpp, which build merges from pieces, never could. And "▁" (an escaped
    space, id 236,743 in the full vocabulary) takes the last of those slots, since a space that
    fell back to bytes would decode as a literal U+2581 (see :mod:`opengemma.tokenizer`). Text is
    then spaces, byte pieces and the user-defined pieces: an exported tiny model (`opengemma
    convert tiny-gemma3 DIR --to hf`) tokenizes the same in transformers."""
    specials = {"<bos>": tok.bos_id, "<eos>": tok.eos_id, "<unk>": tok.unk_id, "<pad>": tok.pad_id}
    if too_high := [name for name, i in specials.items() if i >= n]:
        raise OpenGemmaError(f"no tokenizer.model {where}, and the model's {n} ids are too few for the embedded "
                             f"tokenizer's {', '.join(too_high)} (id {max(specials[k] for k in too_high)})")
    # The ModelProto lists its pieces first: parse only the first n, not all 262,144 (0.8 s).
    head = itertools.islice((message for field, message in _fields(tok.model_bytes()) if field == 1), n)
    pieces, scores, types = _parse_pieces(b"".join(_len_field(1, message) for message in head))
    ordinary = [i for i, t in enumerate(types.tolist()) if t == NORMAL and pieces[i] != "\u2581"]
    types[ordinary] = UNUSED
    if "\u2581" not in pieces and ordinary:
        pieces[ordinary[-1]], types[ordinary[-1]] = "\u2581", NORMAL
    return Tokenizer(pieces, scores, types, bos_id=tok.bos_id, eos_id=tok.eos_id, unk_id=tok.unk_id,
                     pad_id=tok.pad_id)


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
    def _gen_config(self, max_new_tokens, temperature, top_k, top_p, seed, stop) -> "gen_mod.GenerationConfig":
        if isinstance(stop, str):
            stop = (stop,)
        return gen_mod.GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                        top_p=top_p, seed=seed, stop=tuple(stop or ()))

    def generate(self, prompt: str | list[str], *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: str | list[str] | None = None) -> str | list[str]:
        """Continue one prompt (returns a str) or a batch of prompts (returns a list), batched in one pass."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise OpenGemmaError("prompt must be a string or a non-empty list of strings")
        ids = [self._checked(self.tokenizer.encode(p, bos=True)) for p in prompts]
        gen = self._gen_config(max_new_tokens, temperature, top_k, top_p, seed, stop)
        outs = gen_mod.generate(self.model, self.tokenizer, ids, gen)
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
                    stop: str | list[str] | None = None) -> Iterator[str]:
        gen = self._gen_config(max_new_tokens, temperature, top_k, top_p, seed, stop)
        return gen_mod.stream_text(self.model, self.tokenizer, ids, gen)

    def chat(self, messages: list[dict], *, stream: bool = False, **kwargs) -> str | Iterator[str]:
        """Reply to a conversation (``[{"role": "user", "content": ...}, ...]``) as the model turn."""
        ids = self._checked(format_chat(self.tokenizer, messages, add_generation_prompt=True).ids)
        pieces = self._stream_ids(ids, **kwargs)
        return pieces if stream else "".join(pieces)


def load(model: str | os.PathLike | None = None, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None, seed: int = 0, quantize: str | None = None,
         compile: bool = False) -> Gemma:
    """Load a model (None = the embedded Gemma 3 270M) ready for generation.

    ``seed`` only matters for presets, whose weights are random (normal, std 0.02).
    ``quantize``: None/"none", "int8" or "int4" weight-only quantization (:mod:`opengemma.quant`);
    GGUF weights go straight into quantized modules, without a float copy of the model.
    ``compile``: run the decode step through ``torch.compile`` (:mod:`opengemma.compiled`; CUDA
    graphs on GPU), falling back to eager with a one-line warning where compiling fails.

    The first call in a process also applies :func:`opengemma.process.tune` (the garbage
    collector skips the start-up objects; glibc keeps freed activation memory for reuse).
    """
    process.tune()
    if quantize in (None, "none"):
        quantize = None
    else:
        from . import quant
        quant._check_mode(quantize)
    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    src = resolve(model)
    if src.kind == "preset":
        config = PRESETS[src.name]
        net = build_model(config, device=dev, dtype=dt)
        g = torch.Generator(device=dev).manual_seed(seed)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("norm.weight"):
                    p.zero_()
                else:
                    p.normal_(0.0, 0.02, generator=g)
        net.eval()
        tokenizer = load_tokenizer(src, net.config)
    elif quantize and src.kind == "gguf" and dev.type == "cpu" and weight_cache.enabled():
        net, tokenizer = _load_gguf_quantized_cached(src, quantize, dt)
    elif quantize and src.kind == "gguf":  # straight into quantized modules, no float model
        from . import quant_gguf
        _, net = quant_gguf.quantized_from_gguf(src.path, quantize, dtype=dt, device=dev)
        tokenizer = load_tokenizer(src, net.config)
    elif src.kind == "gguf" and weight_cache.enabled():
        net, tokenizer = _load_gguf_cached(src, dt, dev)
    else:
        module = _checkpoint_module(src.kind)
        config, state_dict = module.load(src.path, dtype=dt)
        net = load_weights(config, state_dict, dtype=dt, device=dev)
        tokenizer = load_tokenizer(src, net.config)
    if quantize and not isinstance(net.embed, quant.QuantizedEmbedding):
        quant.quantize_model(net, quantize)
    if compile:
        from . import compiled
        compiled.enable(net)
    return Gemma(net, tokenizer, src.name)


# Marks a cache entry whose conversion checked every weight (checkpoints.check_finite): such an
# entry is trusted as it is, since its key is the SHA-256 of the source file's content -- the same
# bytes get the same verdict. Checking again at each start would read the whole memory-mapped
# entry (1.1 GB fp32 for the 270M) and undo the cache's fast cold start. An entry without the mark
# (written before the check existed) is converted again, once, which checks it.
_CHECKED = "weights_checked"


def _load_gguf_cached(src: Source, dtype: torch.dtype, device: torch.device) -> tuple[GemmaModel, Tokenizer]:
    """GGUF through the converted-weight cache: convert once, then memory-map the result."""
    entry = weight_cache.entry_dir(src.path, dtype=str(dtype))
    hit = weight_cache.read(entry)
    if hit is not None and hit[2] is not None and hit[3].get(_CHECKED):
        config, state_dict, tok_bytes, _ = hit
        tokenizer = Tokenizer.from_file(entry / "tokenizer.model", vocab=weight_cache.read_vocab(entry))
        return load_weights(config, state_dict, dtype=dtype, device=device), tokenizer
    config, state_dict = _checkpoint_module("gguf").load(src.path, dtype=dtype)
    tokenizer = Tokenizer.from_gguf(src.path)
    weight_cache.write(entry, config, state_dict, tokenizer.model_bytes(), extra={_CHECKED: True},
                       vocab=tokenizer.vocab_arrays())
    return load_weights(config, state_dict, dtype=dtype, device=device), tokenizer


def _load_gguf_quantized_cached(src: Source, mode: str, dtype: torch.dtype) -> tuple[GemmaModel, Tokenizer]:
    """A quantized GGUF load through the converted-weight cache (CPU): convert once (seconds),
    then memory-map the packed weights (a fraction of a second, and no float copy in memory).
    Packed layouts are torch's own, so the key includes the torch version."""
    from . import quant_gguf, quant_store

    entry = weight_cache.entry_dir(src.path, dtype=str(dtype), quantize=mode, torch=torch.__version__)
    hit = weight_cache.read(entry)
    if hit is not None and hit[2] is not None and "plan" in hit[3] and hit[3].get(_CHECKED):
        config, tensors, _, extra = hit
        try:
            tokenizer = Tokenizer.from_file(entry / "tokenizer.model", vocab=weight_cache.read_vocab(entry))
            return quant_store.from_flat(config, tensors, extra["plan"]), tokenizer
        except OpenGemmaError:
            pass  # a damaged entry: convert again (and replace it)
    config, net = quant_gguf.quantized_from_gguf(src.path, mode, dtype=dtype, device="cpu")
    tokenizer = Tokenizer.from_gguf(src.path)
    tensors, plan = quant_store.to_flat(net)
    weight_cache.write(entry, config, tensors, tokenizer.model_bytes(), extra={"plan": plan, _CHECKED: True},
                       vocab=tokenizer.vocab_arrays())
    return net, tokenizer
