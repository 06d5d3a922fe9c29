"""Gemma's tokenizer: a SentencePiece BPE model, built from a ``tokenizer.model`` or from a GGUF vocabulary.

Report section "Pre-training / Tokenizer": Gemma uses "a subset of the SentencePiece tokenizer
(Kudo and Richardson, 2018) of Gemini ... It splits digits, does not remove extra whitespace, and
relies on byte-level encodings for unknown tokens". Gemma 3 keeps that design with a 262k
vocabulary. In SentencePiece terms: BPE, ``split_digits``, ``byte_fallback``, identity
normalization, no dummy prefix, no whitespace removal, spaces escaped to U+2581 ("▁").

A GGUF file stores no ``tokenizer.model``, only the vocabulary (pieces, scores, piece types) and
the special ids. We rebuild the SentencePiece ModelProto from those with a tiny hand-written
protobuf wire encoder (no dependency on the protobuf package) and let the sentencepiece library do
the BPE merges, so encoding is the reference algorithm rather than a re-implementation.

Three things sit on top of sentencepiece:

* Control tokens. In the ModelProto they stay CONTROL, which sentencepiece never matches in text,
  so :meth:`Tokenizer.encode_plain` can never produce ``<start_of_turn>`` from user text (no forged
  turns). :meth:`Tokenizer.encode` first splits the text on the literal spellings of control
  pieces and emits their ids, which is what HF transformers and llama.cpp do with special tokens.
* A literal U+2581 in the text. Sentencepiece escapes spaces to U+2581, so a literal one would come
  back as a space. We encode it as its three UTF-8 byte-fallback tokens instead, and decode with our
  own id -> bytes table, so ``decode(encode(s)) == s`` holds for every string.
* Streaming: :class:`StreamDecoder` emits text as soon as its UTF-8 bytes are complete.

Parity: ids equal those of transformers' tokenizer built from the same GGUF, except for a literal
U+2581 (transformers reads it as a space) and runs of 32+ spaces: Gemma's whitespace-run pieces
are user-defined, matched longest-first by sentencepiece and llama.cpp (31 spaces, then the rest),
while transformers' GGUF converter makes them ordinary BPE pieces and merges them 16 + 16.
"""

from __future__ import annotations

import codecs
import mmap
import operator
import os
import re
import struct
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from .errors import OpenGemmaError

from .sp_vocab import (  # noqa: F401  (piece types and build_model_proto are part of this module's API)
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    _encode_pieces,
    _fields,
    _len_field,
    _parse_pieces,
    _read_gguf_tokenizer,
    build_model_proto,
)

_SPACE = "\u2581"  # sentencepiece's escaped space
_SPACE_UTF8 = _SPACE.encode("utf-8")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Every Gemma control piece is spelled "<...>" without inner angle brackets; finding such
# candidates and looking them up is far faster than a 6000-way regex alternation.
_ANGLE_CANDIDATE = r"<[^<>]*>"


# -- the tokenizer -------------------------------------------------------------------------------------
class Tokenizer:
    """SentencePiece BPE tokenizer with Gemma's special-token handling.

    Build it with :meth:`from_gguf` or :meth:`from_file`; the constructor takes a vocabulary
    (pieces, scores and sentencepiece piece types) and the special ids.
    """

    def __init__(
        self, pieces: Sequence[str], scores: Sequence[float], types: Sequence[int], *, bos_id: int, eos_id: int,
        unk_id: int, pad_id: int = -1, model_proto: bytes | None = None, _processor=None,
    ) -> None:  # fmt: skip
        n = len(pieces)
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("unk_id", unk_id)):
            if not 0 <= value < n:
                raise OpenGemmaError(f"tokenizer {name} {value} is outside the vocabulary of {n} pieces")
        self._pieces = list(pieces)
        self._piece_ids_table: dict[str, int] | None = None  # built on first use (262k entries)
        self._types = np.asarray(types, dtype=np.int32).copy()
        self._bos, self._eos, self._unk = int(bos_id), int(eos_id), int(unk_id)
        self._pad = int(pad_id) if pad_id is not None and 0 <= pad_id < n else -1
        self._types[(self._types < NORMAL) | (self._types > BYTE)] = NORMAL  # GGUF's 0 is "undefined"
        # sentencepiece insists on exactly one UNKNOWN piece; GGUF files often mark <unk> CONTROL.
        self._types[self._types == UNKNOWN] = CONTROL
        self._types[self._unk] = UNKNOWN
        # The specials and turn markers must be CONTROL: sentencepiece never matches those in text,
        # which is what keeps encode_plain() from forging them. A tokenizer.model that lists them
        # as user-defined gets them retyped; its other fields are kept as they are.
        specials = [self._bos, self._eos, self._pad] + [self._find(p) for p in ("<start_of_turn>", "<end_of_turn>")]
        retype = [i for i in specials if i >= 0 and i != self._unk and self._types[i] != CONTROL]
        self._types[retype] = CONTROL
        if model_proto is None:
            ids = {"unk_id": self._unk, "bos_id": self._bos, "eos_id": self._eos, "pad_id": self._pad}
            model_proto = build_model_proto(self._pieces, scores, self._types, **ids)
        elif retype:
            rest = b"".join(_len_field(f, v) for f, v in _fields(model_proto) if f != 1)  # all messages
            model_proto = _encode_pieces(self._pieces, scores, self._types) + rest
        self._model_proto = model_proto
        if _processor is not None and not retype:
            self._sp = _processor  # already loaded from this very proto
        else:
            self._sp = spm.SentencePieceProcessor()
            try:
                self._sp.LoadFromSerializedProto(model_proto)
            except (RuntimeError, OSError) as e:
                raise OpenGemmaError(f"sentencepiece rejected the tokenizer model: {e}") from None

        # Control pieces that raw encode() parses out of text. All CONTROL pieces, like HF and
        # llama.cpp's special tokens (<bos>, <eos>, <pad>, <unk>, <mask>, <unusedN>, turns).
        control_idx = np.flatnonzero((self._types == CONTROL) | (self._types == UNKNOWN))
        self._control_ids = {self._pieces[i]: int(i) for i in control_idx if self._pieces[i]}
        if all(re.fullmatch(_ANGLE_CANDIDATE, p) for p in self._control_ids):
            self._control_re = re.compile(_ANGLE_CANDIDATE)
        else:  # longest first, so "<unused10>" wins over "<unused1>"
            alternatives = sorted(self._control_ids, key=len, reverse=True)
            self._control_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

        # id -> bytes, for decode(), computed per id on first use (see _IdBytes).
        self._id_bytes = _IdBytes(self._pieces, self._types, skip={self._bos, self._eos, self._pad})
        byte_ids = {int(m.group(1), 16): int(i) for i in np.flatnonzero(self._types == BYTE)
                    if (m := _BYTE_PIECE.fullmatch(self._pieces[i]))}
        # A literal U+2581 is encoded as its UTF-8 bytes (see module docstring); without byte
        # pieces we cannot do that and fall back to sentencepiece (it then decodes as a space).
        has_bytes = all(b in byte_ids for b in _SPACE_UTF8)
        self._literal_space = [byte_ids[b] for b in _SPACE_UTF8] if has_bytes else None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, *, vocab: dict[str, np.ndarray] | None = None) -> Tokenizer:
        """Load a SentencePiece ``tokenizer.model`` file. ``vocab``: this very tokenizer's
        :meth:`vocab_arrays` (the converted-weight cache keeps them), which spares asking
        sentencepiece for all pieces and types again; ignored where it does not fit the file."""
        try:
            with open(path, "rb") as f:
                proto = f.read()
        except OSError as e:
            raise OpenGemmaError(f"cannot read tokenizer model {os.fspath(path)!r}: {e.strerror}") from None
        fast = _fast_vocab(proto, vocab)
        if fast is not None:  # the common case (our own tokenizer.model files): no Python parse
            sp, pieces, types = fast
            ids = {"bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "unk_id": sp.unk_id(), "pad_id": sp.pad_id()}
            return cls(pieces, np.zeros(len(pieces), np.float32), types, **ids, model_proto=proto, _processor=sp)
        try:
            pieces, scores, types = _parse_pieces(proto)
        except (ValueError, IndexError, TypeError, AttributeError, struct.error) as e:
            raise OpenGemmaError(f"{os.fspath(path)!r} is not a SentencePiece model: {e}") from None
        if not pieces:
            raise OpenGemmaError(f"{os.fspath(path)!r} is not a SentencePiece model: it has no pieces")
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise OpenGemmaError(f"{os.fspath(path)!r} is not a SentencePiece model: {e}") from None
        ids = {"bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "unk_id": sp.unk_id(), "pad_id": sp.pad_id()}
        return cls(pieces, scores, types, **ids, model_proto=proto, _processor=sp)

    @classmethod
    def from_gguf(cls, path_or_reader) -> Tokenizer:
        """Build the tokenizer from a GGUF file's vocabulary (a path or a ``gguf.GGUFReader``)."""
        reader = hasattr(path_or_reader, "data") and hasattr(path_or_reader, "fields")  # a gguf.GGUFReader
        where = str(getattr(path_or_reader, "path", "GGUF reader")) if reader else os.fspath(path_or_reader)
        try:
            if reader:  # reuse its memory map of the file, but not its (slow) per-element fields
                meta = _read_gguf_tokenizer(memoryview(path_or_reader.data))
            else:
                with open(where, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    meta = _read_gguf_tokenizer(buf)
        except OSError as e:
            raise OpenGemmaError(f"cannot read GGUF file {where!r}: {e.strerror or e}") from None
        except (ValueError, IndexError, struct.error) as e:
            raise OpenGemmaError(f"{where}: corrupt GGUF metadata: {e}") from None
        if (model := meta.get("tokenizer.ggml.model")) != "llama":
            raise OpenGemmaError(
                f"{where}: tokenizer.ggml.model is {model!r}; only SentencePiece ('llama') is supported"
            )
        keys = ("tokens", "scores", "token_type", "bos_token_id", "eos_token_id")
        if missing := [f"tokenizer.ggml.{k}" for k in keys if f"tokenizer.ggml.{k}" not in meta]:
            raise OpenGemmaError(f"{where}: GGUF tokenizer metadata lacks {', '.join(missing)}")
        pieces = meta["tokenizer.ggml.tokens"]
        scores, types = meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"]
        if not len(pieces) == len(scores) == len(types):
            raise OpenGemmaError(f"{where}: GGUF tokens, scores and token types differ in length")
        if meta.get("tokenizer.ggml.add_space_prefix", False):
            raise OpenGemmaError(f"{where}: add_space_prefix vocabularies are not supported (Gemma has none)")
        # llama.cpp's converter "pre-normalizes" user-defined pieces, writing the "▁" of the original
        # tokenizer.model as a real space ("▁▁" -> "  "), because llama.cpp matches them in raw text.
        # Sentencepiece matches user-defined pieces after escaping spaces, so we spell them back.
        pieces = [
            p.replace(" ", _SPACE) if t == USER_DEFINED else p for p, t in zip(pieces, np.asarray(types).tolist())
        ]
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        if unk is None:  # fall back to the piece spelled <unk>
            unk = pieces.index("<unk>") if "<unk>" in pieces else -1
        bos, eos = int(meta["tokenizer.ggml.bos_token_id"]), int(meta["tokenizer.ggml.eos_token_id"])
        pad = int(meta.get("tokenizer.ggml.padding_token_id", -1))
        return cls(pieces, scores, types, bos_id=bos, eos_id=eos, unk_id=int(unk), pad_id=pad)

    def vocab_arrays(self) -> dict[str, np.ndarray] | None:
        """The pieces (UTF-8, NUL-separated) and their types as two arrays, for
        :meth:`from_file`'s ``vocab``: asking sentencepiece for 262,144 pieces and their types
        costs ~95 ms of every start, reading these back (one decode, one split) ~40 ms. None if a
        piece holds a NUL."""
        blob = "\0".join(self._pieces)
        if blob.count("\0") != len(self._pieces) - 1:
            return None
        return {"pieces": np.frombuffer(blob.encode("utf-8"), np.uint8), "types": self._types.astype(np.int8)}

    def model_bytes(self) -> bytes:
        """The serialized SentencePiece ModelProto: write it out to get a ``tokenizer.model``."""
        return self._model_proto

    def stream_decoder(self) -> StreamDecoder:
        """A fresh :class:`StreamDecoder` for one generated sequence."""
        return StreamDecoder(self)

    # -- vocabulary ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        """Padding id, or -1 when the vocabulary defines none."""
        return self._pad

    @property
    def unk_id(self) -> int:
        return self._unk

    @property
    def start_of_turn_id(self) -> int:
        return self.piece_to_id("<start_of_turn>")

    @property
    def end_of_turn_id(self) -> int:
        return self.piece_to_id("<end_of_turn>")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: eos, and <end_of_turn> when the vocabulary has it."""
        eot = self._find("<end_of_turn>")
        return (self._eos,) if eot < 0 else (self._eos, eot)

    def id_to_piece(self, i: int) -> str:
        return self._pieces[self._check_id(i)]

    def piece_to_id(self, piece: str) -> int:
        if self._piece_ids_table is None:
            table: dict[str, int] = {}
            for i, p in enumerate(self._pieces):
                table.setdefault(p, i)
            self._piece_ids_table = table
        try:
            return self._piece_ids_table[piece]
        except (KeyError, TypeError):
            raise OpenGemmaError(f"the vocabulary has no piece {piece!r}") from None

    def _find(self, piece: str) -> int:
        """Id of a special piece, or -1; a scan, since specials sit at the start of the vocabulary."""
        try:
            return self._pieces.index(piece)
        except ValueError:
            return -1

    def piece_type(self, i: int) -> int:
        """SentencePiece type of piece ``i`` (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)."""
        return int(self._types[self._check_id(i)])

    def _check_id(self, i) -> int:
        if not _valid_id(i, len(self._pieces)):
            raise OpenGemmaError(f"token id {i!r} is outside the vocabulary of {len(self._pieces)} pieces")
        return int(i)

    # -- encoding --------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of ``text``; control tokens spelled in it (``<start_of_turn>``...) become their ids.

        Use this for trusted text such as a pre-formatted prompt; use :meth:`encode_plain` (or
        :func:`opengemma.chat.format_chat`) for user-provided text.
        """
        _check_text(text)
        ids = [self._bos] if bos else []
        pos = 0
        regex = self._control_re
        if regex is not None and ("<" in text or regex.pattern != _ANGLE_CANDIDATE):  # fast path: no "<"
            for m in regex.finditer(text):
                tid = self._control_ids.get(m.group())
                if tid is None:
                    continue
                if m.start() > pos:
                    ids.extend(self._encode_plain(text[pos : m.start()]))
                ids.append(tid)
                pos = m.end()
        ids.extend(self._encode_plain(text[pos:] if pos else text))
        return ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` with no BOS and no control-token parsing.

        ``"<start_of_turn>"`` in the text becomes ordinary pieces, so user text cannot forge a turn.
        User-defined pieces (newline runs, space runs, HTML tags) are still used: that is how
        Gemma's own tokenizer spells them.
        """
        _check_text(text)
        return self._encode_plain(text)

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        if _SPACE not in text or self._literal_space is None:
            return self._sp.EncodeAsIds(text)
        ids: list[int] = []
        for k, part in enumerate(text.split(_SPACE)):
            if k:
                ids.extend(self._literal_space)
            if part:
                ids.extend(self._sp.EncodeAsIds(part))
        return ids

    # -- decoding --------------------------------------------------------------------------------
    def id_bytes(self, i: int) -> bytes:
        """The UTF-8 bytes token ``i`` stands for in decoded text (empty for bos/eos/pad)."""
        return self._id_bytes[self._check_id(i)]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The UTF-8 bytes of ``ids`` (what :meth:`decode` decodes)."""
        ids = list(ids)
        table = self._id_bytes
        try:
            index = [operator.index(i) for i in ids]
            if index and min(index) < 0:  # negative list indices would silently wrap around
                raise IndexError
            return b"".join([table[i] for i in index])
        except (IndexError, TypeError):
            bad = next(i for i in ids if not _valid_id(i, len(table)))
            raise OpenGemmaError(f"token id {bad!r} is outside the vocabulary of {len(table)} pieces") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: bos/eos/pad are skipped, other pieces (control ones too) are rendered as
        their text, byte pieces are joined into UTF-8 (invalid sequences become U+FFFD)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self._bos}, eos_id={self._eos})"


class _IdBytes:
    """id -> the bytes it decodes to, computed lazily and remembered: byte pieces are raw bytes,
    "▁" is a space, bos/eos/pad vanish. Building all 262k entries up front would cost a
    noticeable part of a cold start for the few hundred ids a reply uses."""

    def __init__(self, pieces: list[str], types: np.ndarray, skip: set[int]) -> None:
        self._pieces, self._types, self._skip = pieces, types, skip
        self._memo: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._pieces)

    def __getitem__(self, i: int) -> bytes:
        out = self._memo.get(i)
        if out is None:
            if not 0 <= i < len(self._pieces):
                raise IndexError(i)
            piece = self._pieces[i]
            if self._types[i] == BYTE and (m := _BYTE_PIECE.fullmatch(piece)):
                out = bytes([int(m.group(1), 16)])
            elif i in self._skip:
                out = b""
            else:
                out = piece.replace(_SPACE, " ").encode("utf-8")
            self._memo[i] = out
        return out


def _fast_vocab(proto: bytes, cached: dict[str, np.ndarray] | None = None):
    """(processor, pieces, types) from sentencepiece's own batched queries (or from ``cached``,
    :meth:`Tokenizer.vocab_arrays`, where it fits), or None when the specials are not all CONTROL
    yet (then the proto must be parsed and rewritten in Python)."""
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError):
        return None
    n = sp.get_piece_size()
    turns = [sp.piece_to_id(p) for p in ("<start_of_turn>", "<end_of_turn>")]
    specials = [i for i in [sp.bos_id(), sp.eos_id(), sp.pad_id()] + turns if 0 <= i < n and i != sp.unk_id()]
    if n == 0 or not all(sp.IsControl(i) for i in specials):
        return None
    if cached is not None and (got := _cached_vocab(sp, cached)) is not None:
        return sp, *got
    everything = list(range(n))
    types = np.full(n, NORMAL, dtype=np.int32)
    for flag, kind in ((sp.IsControl, CONTROL), (sp.IsUnknown, UNKNOWN), (sp.IsUnused, UNUSED), (sp.IsByte, BYTE)):
        types[np.asarray(flag(everything), dtype=bool)] = kind
    # USER_DEFINED is not queryable; it is only needed to rebuild a proto, which this path never does.
    return sp, sp.id_to_piece(everything), types


def _cached_vocab(sp, arrays: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray] | None:
    """(pieces, types) from :meth:`Tokenizer.vocab_arrays`, if they belong to ``sp``'s model: the
    same size, and the same pieces at 64 ids spread over the vocabulary and at the specials."""
    try:
        pieces = bytes(arrays["pieces"]).decode("utf-8").split("\0")
        types = np.asarray(arrays["types"], dtype=np.int32)
    except (KeyError, UnicodeDecodeError, TypeError, ValueError):
        return None
    n = sp.get_piece_size()
    if len(pieces) != n or types.shape != (n,):
        return None
    probe = sorted({*np.linspace(0, n - 1, 64).astype(int).tolist(), sp.bos_id(), sp.eos_id(), sp.unk_id()})
    probe = [i for i in probe if 0 <= i < n]
    if sp.id_to_piece(probe) != [pieces[i] for i in probe]:
        return None
    return pieces, types


def _valid_id(i, n: int) -> bool:
    try:
        return 0 <= operator.index(i) < n  # index(): ints, numpy and 0-d torch ints; not floats
    except TypeError:
        return False


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise OpenGemmaError(f"text to tokenize must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise OpenGemmaError("text to tokenize contains a lone surrogate and is not valid Unicode") from None


class StreamDecoder:
    """Incremental decoding for streaming generation.

    ``push(id)`` returns the text completed by that token; bytes of a UTF-8 character that is not
    finished yet (a multi-byte character split over byte-fallback tokens) are held back until it
    is. ``flush()`` returns what is left (an unfinished sequence becomes U+FFFD). The concatenation
    of all pushes and the flush equals ``tokenizer.decode(ids)``: both use Python's UTF-8 decoder
    with ``errors="replace"``, whose incremental and one-shot forms agree.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self._tokenizer.id_bytes(token_id))

    def flush(self) -> str:
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
