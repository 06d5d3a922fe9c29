"""SentencePiece vocabularies as bytes: the ModelProto wire format, and GGUF's tokenizer keys.

Part of the tokenizer (report section "Pretraining": a SentencePiece vocabulary that splits digits,
keeps whitespace and falls back to bytes; Table 3's control tokens). Two readers and one writer,
kept apart from :mod:`opengemma.tokenizer` so that module is only about encoding and decoding:

* :func:`build_model_proto` writes a sentencepiece ``ModelProto`` (no protobuf dependency: the few
  fields needed are encoded by hand) and :func:`_parse_pieces` reads its pieces back;
* :func:`_read_gguf_tokenizer` reads the ``tokenizer.*`` metadata of a GGUF file straight from its
  bytes, without building a Python object per array element (262k pieces in Gemma 3's file).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

# Piece types: sentencepiece_model.proto ModelProto.SentencePiece.Type. GGUF's
# tokenizer.ggml.token_type uses the same numbers (llama.cpp copies them from the proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# -- protobuf wire format (just what sentencepiece_model.proto needs) -------------------------------
def _varint(n: int) -> bytes:
    if n < 0:  # proto int32 negatives are sign-extended to 64 bits, as protobuf does
        n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _int_field(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(int(value))


def build_model_proto(
    pieces: Sequence[str], scores: Sequence[float], types: Sequence[int], *, unk_id: int, bos_id: int, eos_id: int,
    pad_id: int,
) -> bytes:  # fmt: skip
    """Serialized sentencepiece ModelProto for a Gemma-style BPE vocabulary.

    Field numbers follow sentencepiece_model.proto: ModelProto{pieces=1, trainer_spec=2,
    normalizer_spec=3}; SentencePiece{piece=1, score=2, type=3}.
    """
    trainer = [
        _int_field(3, 2),  # model_type = BPE
        _int_field(4, len(pieces)),  # vocab_size
        _int_field(25, 1),  # split_digits
        _int_field(35, 1),  # byte_fallback
        _int_field(40, unk_id),
        _int_field(41, bos_id),
        _int_field(42, eos_id),
        _int_field(43, pad_id),
    ]
    # unk_piece=45, bos_piece=46, eos_piece=47, pad_piece=48: sentencepiece finds bos/eos/pad by
    # these names, so a file written from this proto reports the right special ids.
    for field, i in ((45, unk_id), (46, bos_id), (47, eos_id), (48, pad_id)):
        if 0 <= i < len(pieces):
            trainer.append(_len_field(field, pieces[i].encode("utf-8")))
    normalizer = [
        _len_field(1, b"identity"),  # name
        _int_field(3, 0),  # add_dummy_prefix = false
        _int_field(4, 0),  # remove_extra_whitespaces = false
        _int_field(5, 1),  # escape_whitespaces = true
    ]
    return (
        _encode_pieces(pieces, scores, types)
        + _len_field(2, b"".join(trainer))
        + _len_field(3, b"".join(normalizer))
    )


def _encode_pieces(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> bytes:
    """The repeated ``ModelProto.pieces`` field (1): one SentencePiece{piece=1, score=2, type=3} each."""
    piece_key, score_key = _key(1, 2), _key(2, 5)
    score_bytes = np.asarray(scores, dtype="<f4").tobytes()
    # NORMAL is the proto default: leaving it out keeps the message small and parses the same.
    type_tags = {t: b"" if t == NORMAL else _int_field(3, t) for t in range(1, 7)}
    varint = [_varint(n) for n in range(1024)]  # lengths are small: a lookup table halves load time
    out = []
    for i, (piece, t) in enumerate(zip(pieces, np.asarray(types).tolist())):
        raw = piece.encode("utf-8")
        head = varint[len(raw)] if len(raw) < 1024 else _varint(len(raw))
        body = b"".join((piece_key, head, raw, score_key, score_bytes[4 * i : 4 * i + 4], type_tags[t]))
        out += (piece_key, varint[len(body)] if len(body) < 1024 else _varint(len(body)), body)
    return b"".join(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """(field number, value) of each field of a protobuf message: int for varints, else bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire in (1, 2, 5):
            n, pos = _read_varint(buf, pos) if wire == 2 else (8 if wire == 1 else 4, pos)
            value, pos = buf[pos : pos + n], pos + n
            if pos > len(buf):
                raise ValueError("truncated protobuf message")
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def _parse_pieces(proto: bytes) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Pieces, scores and types of a serialized ModelProto (everything else is skipped)."""
    pieces, scores, types = [], [], []
    for field, message in _fields(proto):
        if field == 1:  # ModelProto.pieces
            fields = dict(_fields(message))
            pieces.append(fields.get(1, b"").decode("utf-8"))
            scores.append(struct.unpack("<f", fields.get(2, b"\0\0\0\0"))[0])
            types.append(fields.get(3, NORMAL))
    return pieces, np.asarray(scores, dtype=np.float32), np.asarray(types, dtype=np.int32)


# -- GGUF metadata (only the tokenizer.* keys) ------------------------------------------------------
# Value types of the GGUF spec: struct format (or None for string / array).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _read_gguf_tokenizer(buf) -> dict:
    """The ``tokenizer.*`` metadata of a GGUF file held in ``buf`` (bytes-like, e.g. an mmap).

    We parse the header ourselves instead of using ``gguf.GGUFReader``: the reader builds a numpy
    memmap per array element (half a million for Gemma's vocabulary) and takes ~10 s; walking the
    key/value section directly takes a fraction of a second. String arrays are decoded only for
    tokenizer keys; other arrays are skipped by their lengths.
    """
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError("not a GGUF file (bad magic)")
    (version,) = struct.unpack_from("<I", buf, 4)
    endian = "<"
    if version & 0xFFFF == 0:  # a big-endian file reads as a huge little-endian version
        endian = ">"
        (version,) = struct.unpack_from(">I", buf, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported (need 2 or later)")
    u64 = struct.Struct(endian + "Q")
    _, n_kv = struct.unpack_from(endian + "QQ", buf, 8)
    pos = 24

    def read_str(pos: int) -> tuple[bytes, int]:
        (n,) = u64.unpack_from(buf, pos)
        pos += 8
        return bytes(buf[pos : pos + n]), pos + n

    def read_value(vtype: int, pos: int, keep: bool):
        if vtype in _GGUF_SCALARS:
            fmt = endian + _GGUF_SCALARS[vtype]
            return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
        if vtype == _GGUF_STRING:
            raw, pos = read_str(pos)
            return raw.decode("utf-8"), pos
        if vtype == _GGUF_ARRAY:
            (itype,) = struct.unpack_from(endian + "I", buf, pos)
            (count,) = u64.unpack_from(buf, pos + 4)
            pos += 12
            if itype in _GGUF_SCALARS:
                dtype = np.dtype(_GGUF_SCALARS[itype]).newbyteorder(endian)
                end = pos + count * dtype.itemsize
                arr = np.frombuffer(bytes(buf[pos:end]), dtype=dtype) if keep else None
                return arr, end
            if itype == _GGUF_STRING:
                if not keep:
                    for _ in range(count):
                        (n,) = u64.unpack_from(buf, pos)
                        pos += 8 + n
                    return None, pos
                items = []
                append, unpack = items.append, u64.unpack_from
                for _ in range(count):
                    (n,) = unpack(buf, pos)
                    pos += 8
                    append(buf[pos : pos + n])
                    pos += n
                return [bytes(b).decode("utf-8") for b in items], pos
            values = []
            for _ in range(count):
                v, pos = read_value(itype, pos, keep)
                values.append(v)
            return values, pos
        raise ValueError(f"unknown GGUF value type {vtype}")

    meta = {}
    for _ in range(n_kv):
        key, pos = read_str(pos)
        (vtype,) = struct.unpack_from(endian + "I", buf, pos)
        name = key.decode("utf-8")
        keep = name.startswith("tokenizer.")
        value, pos = read_value(vtype, pos + 4, keep)
        if keep:
            meta[name] = value
    return meta
