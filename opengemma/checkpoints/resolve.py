"""What a model argument names, and the tokenizer that goes with it.

``--model`` (and ``opengemma.load(model)``) takes the embedded default (None), a GGUF file, a
Hugging Face or opengemma checkpoint directory, a preset name (random weights of that shape, for
benchmarks and smoke tests), or a Hugging Face hub id ("google/gemma-2b", downloaded with
``huggingface_hub`` when that is installed and the hub is reachable). :func:`resolve` turns it into
a :class:`Source`; the config always comes from the file itself (:func:`read_config`), and
:func:`load_tokenizer` finds the tokenizer: the GGUF's own vocabulary, a ``tokenizer.model`` beside
the weights, or the embedded model's (cut to a smaller preset's vocabulary).
"""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import PRESETS, GemmaConfig
from ..embedded import NAME as EMBEDDED_NAME
from ..embedded import embedded_path
from ..errors import OpenGemmaError
from ..sp_vocab import NORMAL, UNUSED, _fields, _len_field, _parse_pieces
from ..tokenizer import Tokenizer
from . import detect_format, reader


@dataclass(frozen=True)
class Source:
    """Where a model comes from: kind is 'gguf', 'hf', 'native' or 'preset'."""

    kind: str
    path: Path | None
    name: str


def resolve(model: str | os.PathLike | None) -> Source:
    """Turn a model argument into a :class:`Source` (one clear error line if it names nothing)."""
    if model is None:
        return Source("gguf", embedded_path(), EMBEDDED_NAME)
    text = str(model)
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~name" of no known user: not a path then
        path = Path(text)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_file():
        if path.suffix != ".gguf" and detect_format_or_none(path) != "gguf":
            raise OpenGemmaError(f"{path}: not a GGUF file (give a .gguf file, a checkpoint directory or a preset)")
        return Source("gguf", path, path.name)
    if path.is_dir():
        return Source(detect_format(path), path, path.name)
    if text in PRESETS:
        return Source("preset", None, text)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists():
        return Source("hf", _hub_download(text), text)
    raise OpenGemmaError(f"no such model file, directory or preset: {text!r} (presets: {', '.join(PRESETS)})")


def detect_format_or_none(path: Path) -> str | None:
    try:
        return detect_format(path)
    except OpenGemmaError:
        return None


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


def read_config(src: Source) -> GemmaConfig:
    """Only the config, no weights read (``opengemma info``)."""
    return PRESETS[src.name] if src.kind == "preset" else reader(src.kind).read_config(src.path)


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
