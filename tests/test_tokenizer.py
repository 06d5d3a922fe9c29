"""Tests for opengemma.tokenizer: the embedded Gemma 3 vocabulary, round trips, control tokens,
streaming, the hand-written ModelProto encoder, tokenizer.model files, and parity with transformers."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import opengemma.tokenizer as tok_mod
from opengemma.errors import OpenGemmaError
from opengemma.tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    StreamDecoder,
    Tokenizer,
    _read_gguf_tokenizer,
    build_model_proto,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Strings that stress the round trip: literal U+2581, NUL, lone control chars, emoji (incl. ZWJ
# sequences), accents (precomposed and combining), whitespace runs, CRLF, tabs, CJK, private use.
TRICKY = [
    "",
    " ",
    "\u2581",
    "a\u2581b \u2581\u2581 c\u2581",
    "\x00",
    "a\x00b",
    "\x01\x02\x1b[0m\x7f",
    "\u200b\u200d\ufeff",
    "😀👩‍👩‍👧‍👦🏳️‍🌈",
    "café naïve Ünïcödé e\u0301",
    "double  spaces   triple    quad",
    " " * 40 + "x" + " " * 70,
    "line\nbreaks\n\n\nand\r\nCRLF\r",
    "\ttabs\t\there",
    "日本語のテキスト、中文，한국어",
    "\ue000\U0010fffd",
    "12345678901234567890",
    "<0x41> looks like a byte piece",
]
SOME_CONTROL_SPELLINGS = [
    "<start_of_turn>",
    "<end_of_turn>",
    "<unused0>",
    "<unused17>",
    "<mask>",
    "<start_of_image>",
]
text_with_specials = st.lists(
    st.one_of(
        st.characters(codec="utf-8"),  # no lone surrogates: they are not text
        st.sampled_from(
            SOME_CONTROL_SPELLINGS
            + ["<bos>", "<eos>", "<pad>", "<unk>", "\u2581", "  ", "\n\n", "<", ">", "<table>"]
        ),
    ),
    max_size=30,
).map("".join)


def _read_gguf_tokenizer_from(path) -> dict:
    with open(path, "rb") as f:
        return _read_gguf_tokenizer(f.read())


# -- the embedded vocabulary -----------------------------------------------------------------------
def test_special_ids(tokenizer):
    assert tokenizer.vocab_size == 262144
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert (tokenizer.start_of_turn_id, tokenizer.end_of_turn_id) == (105, 106)
    assert tokenizer.stop_ids == (1, 106)
    assert tokenizer.id_to_piece(105) == "<start_of_turn>"
    assert tokenizer.piece_to_id("<end_of_turn>") == 106
    assert tokenizer.id_to_piece(238) == "<0x00>" and tokenizer.piece_type(238) == BYTE
    assert tokenizer.piece_type(3) == UNKNOWN and tokenizer.piece_type(105) == CONTROL
    assert tokenizer.piece_type(107) == USER_DEFINED and tokenizer.id_to_piece(107) == "\n"
    # GGUF spells whitespace-run pieces with real spaces; sentencepiece needs its "▁" spelling.
    assert tokenizer.id_to_piece(138) == "\u2581\u2581"


def test_lookup_errors(tokenizer):
    with pytest.raises(OpenGemmaError):
        tokenizer.piece_to_id("no such piece, surely")
    for bad in (-1, 262144, 1.0, "3"):
        with pytest.raises(OpenGemmaError):
            tokenizer.id_to_piece(bad)
    with pytest.raises(OpenGemmaError):
        tokenizer.decode([5, 262144])
    with pytest.raises(OpenGemmaError):
        tokenizer.decode([-1])
    with pytest.raises(OpenGemmaError):
        tokenizer.encode(b"bytes")
    with pytest.raises(OpenGemmaError):
        tokenizer.encode_plain("lone \ud800 surrogate")


def test_known_encodings(tokenizer):
    assert tokenizer.encode("Hello world") == [2, 9259, 1902]
    assert tokenizer.encode("Hello world", bos=False) == [9259, 1902]

    def pieces(text):
        return [tokenizer.id_to_piece(i) for i in tokenizer.encode_plain(text)]

    assert pieces("12345") == ["1", "2", "3", "4", "5"]  # digits are split
    assert pieces("a  b") == ["a", "\u2581\u2581", "b"]  # extra whitespace is kept, as one piece
    assert pieces(" lead") == ["\u2581lead"]  # no dummy prefix, leading space kept
    assert pieces("x\n\ny") == ["x", "\n\n", "y"]
    assert pieces("<table>") == ["<table>"]  # user-defined pieces are used even in plain mode
    assert pieces("\u2581") == ["<0xE2>", "<0x96>", "<0x81>"]  # literal U+2581: byte fallback


def test_load_time(gguf_path):
    start = time.perf_counter()
    tok = Tokenizer.from_gguf(gguf_path)
    elapsed = time.perf_counter() - start
    assert tok.vocab_size == 262144
    assert elapsed < 5.0, f"Tokenizer.from_gguf took {elapsed:.2f} s"  # ~0.6 s here; generous for CI


def test_from_gguf_errors(tmp_path):
    with pytest.raises(OpenGemmaError, match="cannot read"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all, just some bytes" * 10)
    with pytest.raises(OpenGemmaError, match="GGUF"):
        Tokenizer.from_gguf(junk)


# -- round trips ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, bos=True)) == text
    assert tokenizer.decode(tokenizer.encode_plain(text)) == text


@FAST
@given(st.text())
def test_round_trip_any_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, bos=True)) == text


@FAST
@given(text_with_specials)
def test_round_trip_with_control_spellings(tokenizer, text):
    # encode_plain never drops anything. Raw encode() turns "<bos>"/"<eos>"/"<pad>" into ids that
    # decode() skips, so only text without those spellings round-trips through it.
    assert tokenizer.decode(tokenizer.encode_plain(text)) == text
    if not any(s in text for s in ("<bos>", "<eos>", "<pad>")):
        assert tokenizer.decode(tokenizer.encode(text)) == text


# -- control tokens -----------------------------------------------------------------------------------
def test_raw_encode_parses_control_tokens(tokenizer):
    ids = tokenizer.encode("<start_of_turn>user\nhi<end_of_turn>\n", bos=False)
    assert ids == [105] + tokenizer.encode_plain("user\nhi") + [106] + tokenizer.encode_plain("\n")
    for spelling in SOME_CONTROL_SPELLINGS + ["<bos>", "<eos>", "<pad>", "<unk>"]:
        assert tokenizer.encode(spelling, bos=False) == [tokenizer.piece_to_id(spelling)]
    # longest match: "<unused17>" is not "<unused1>" + "7>"
    assert tokenizer.encode("x<unused17>y", bos=False) == [
        tokenizer.encode_plain("x")[0],
        tokenizer.piece_to_id("<unused17>"),
        tokenizer.encode_plain("y")[0],
    ]
    assert tokenizer.encode("<<start_of_turn>>", bos=False) == tokenizer.encode_plain("<") + [
        105
    ] + tokenizer.encode_plain(">")
    assert 105 not in tokenizer.encode("<start_of_turn", bos=False)


def test_plain_encode_never_forges_control_tokens(tokenizer):
    ids = tokenizer.encode_plain("<start_of_turn>user\nhi<end_of_turn><eos><bos>")
    assert not {1, 2, 105, 106} & set(ids)
    assert tokenizer.decode(ids) == "<start_of_turn>user\nhi<end_of_turn><eos><bos>"


@FAST
@given(text_with_specials)
def test_plain_encode_has_no_control_ids(tokenizer, text):
    assert all(tokenizer.piece_type(i) not in (CONTROL, UNKNOWN) for i in tokenizer.encode_plain(text))


# -- decoding and streaming ---------------------------------------------------------------------------
def test_decode_rules(tokenizer):
    hello = tokenizer.encode_plain("Hello world")
    assert tokenizer.decode([2, 0, *hello, 1, 0]) == "Hello world"  # bos, eos and pad are skipped
    assert tokenizer.decode([105, *tokenizer.encode_plain("model"), 106]) == "<start_of_turn>model<end_of_turn>"
    assert tokenizer.decode([238 + 0xE2, 238 + 0x82]) == "\ufffd"  # truncated 3-byte sequence
    assert tokenizer.decode([238 + 0xFF, *hello]) == "\ufffdHello world"  # invalid byte
    assert tokenizer.decode([238 + 0xC3, 238 + 0xA9]) == "é"


def _stream(tokenizer, ids):
    dec = StreamDecoder(tokenizer)
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


def test_stream_holds_back_partial_utf8(tokenizer):
    ids = [tokenizer.piece_to_id(f"<0x{b:02X}>") for b in "🚀".encode()]
    pieces, tail = _stream(tokenizer, [*tokenizer.encode_plain("go"), *ids])
    assert pieces[-4:] == ["", "", "", "🚀"] and "".join(pieces) == "go🚀" and tail == ""
    pieces, tail = _stream(tokenizer, ids[:2])  # the stream ends mid-character
    assert pieces == ["", ""] and tail == "\ufffd" == tokenizer.decode(ids[:2])
    dec = tokenizer.stream_decoder()
    assert dec.push(ids[0]) == "" and dec.flush() == "\ufffd" and dec.push(9259) == "Hello"  # reusable after flush


@FAST
@given(st.text())
@example("<bos>").via("found by hypothesis")
@example("a<eos>b<start_of_turn>")
def test_stream_equals_decode_for_encoded_text(tokenizer, text):
    ids = tokenizer.encode(text)
    pieces, tail = _stream(tokenizer, ids)
    # decode skips bos/eos/pad by design, so a text spelling one of them ("<bos>", found by
    # hypothesis) does not come back; every other text does
    gone = [tokenizer.decode([t]) for t in (tokenizer.bos_id, tokenizer.eos_id)]
    expected = text
    for t in ("<bos>", "<eos>", "<pad>"):
        if t in tokenizer._control_ids and tokenizer.decode([tokenizer._control_ids[t]]) == "":
            expected = expected.replace(t, "")
    assert gone == ["", ""]
    assert "".join(pieces) + tail == tokenizer.decode(ids) == expected


@FAST
@given(
    st.lists(
        st.one_of(st.integers(238, 493), st.sampled_from([0, 1, 2, 105, 106, 107, 138, 9259, 1902, 163543])),
        max_size=25,
    )
)
def test_stream_equals_decode_for_any_ids(tokenizer, ids):
    pieces, tail = _stream(tokenizer, ids)
    assert "".join(pieces) + tail == tokenizer.decode(ids)


# -- the ModelProto encoder and tokenizer.model files ------------------------------------------------
def test_model_proto_matches_sentencepiece_schema(tokenizer, gguf_path):
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    m = pb.ModelProto()
    m.ParseFromString(tokenizer.model_bytes())
    assert len(m.pieces) == 262144
    t = m.trainer_spec
    assert t.model_type == pb.TrainerSpec.BPE and t.vocab_size == 262144
    assert t.split_digits and t.byte_fallback
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (3, 2, 1, 0)
    assert (t.unk_piece, t.bos_piece, t.eos_piece, t.pad_piece) == ("<unk>", "<bos>", "<eos>", "<pad>")
    n = m.normalizer_spec
    assert (
        n.name == "identity" and not n.add_dummy_prefix and not n.remove_extra_whitespaces and n.escape_whitespaces
    )
    assert not n.precompiled_charsmap
    P = pb.ModelProto.SentencePiece
    assert [(p.piece, p.type) for p in m.pieces[:4]] == [
        ("<pad>", P.CONTROL),
        ("<eos>", P.CONTROL),
        ("<bos>", P.CONTROL),
        ("<unk>", P.UNKNOWN),
    ]
    assert (m.pieces[105].piece, m.pieces[105].type) == ("<start_of_turn>", P.CONTROL)
    assert (m.pieces[107].piece, m.pieces[107].type) == ("\n", P.USER_DEFINED)
    assert (m.pieces[238].piece, m.pieces[238].type) == ("<0x00>", P.BYTE)
    assert (m.pieces[495].piece, m.pieces[495].type, m.pieces[495].score) == ("in", P.NORMAL, -1.0)
    # every piece and score is the file's
    meta = _read_gguf_tokenizer_from(gguf_path)
    assert [p.piece for p in m.pieces] == [tokenizer.id_to_piece(i) for i in range(262144)]
    assert [p.piece for p in m.pieces[:107]] == meta["tokenizer.ggml.tokens"][:107]
    assert [p.score for p in m.pieces] == meta["tokenizer.ggml.scores"].tolist()


def test_build_model_proto_small(tmp_path):
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    pieces = (
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "\n"]
        + [f"<0x{b:02X}>" for b in range(256)]
        + ["\u2581", "a", "b", "ab", "\u2581ab", "é" * 70]
    )
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN, CONTROL, USER_DEFINED] + [BYTE] * 256 + [NORMAL] * 6
    scores = [0.0] * 262 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.5]
    proto = build_model_proto(pieces, scores, types, unk_id=3, bos_id=2, eos_id=1, pad_id=0)
    m = pb.ModelProto()
    m.ParseFromString(proto)
    assert [p.piece for p in m.pieces] == pieces
    assert [int(p.type) for p in m.pieces] == types
    assert [p.score for p in m.pieces] == scores
    # no pad id: the proto field is int32 -1, sign-extended on the wire as protobuf does
    m.ParseFromString(build_model_proto(pieces, scores, types, unk_id=3, bos_id=2, eos_id=1, pad_id=-1))
    assert m.trainer_spec.pad_id == -1

    path = tmp_path / "tokenizer.model"
    path.write_bytes(proto)
    tok = Tokenizer.from_file(path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (268, 2, 1, 0, 3)
    ids = tok.encode("ab ab\n<start_of_turn>zé")
    assert [tok.id_to_piece(i) for i in ids] == [
        "<bos>",
        "ab",
        "\u2581ab",
        "\n",
        "<start_of_turn>",
        "<0x7A>",
        "<0xC3>",
        "<0xA9>",
    ]
    assert tok.decode(ids) == "ab ab\n<start_of_turn>zé"
    assert tok.stop_ids == (1,)  # no <end_of_turn> in this vocabulary
    with pytest.raises(OpenGemmaError, match="no piece '<end_of_turn>'"):
        _ = tok.end_of_turn_id


def test_from_file_retypes_user_defined_turn_markers(tmp_path):
    """A tokenizer.model listing <start_of_turn> as USER_DEFINED would let plain text forge a turn."""
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    pieces += [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "a"]
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN, USER_DEFINED, USER_DEFINED] + [BYTE] * 256 + [NORMAL] * 2
    proto = build_model_proto(pieces, [0.0] * len(pieces), types, unk_id=3, bos_id=2, eos_id=1, pad_id=0)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(proto)
    tok = Tokenizer.from_file(path)
    assert tok.piece_type(4) == tok.piece_type(5) == CONTROL
    plain = tok.encode_plain("<start_of_turn>a")
    assert 4 not in plain and tok.decode(plain) == "<start_of_turn>a"
    assert tok.encode("<start_of_turn>a<end_of_turn>", bos=False) == [4, 263, 5]
    m = pb.ModelProto()
    m.ParseFromString(tok.model_bytes())  # retyped pieces, the file's other fields kept
    assert [int(p.type) for p in m.pieces[4:6]] == [CONTROL, CONTROL] and len(m.pieces) == len(pieces)
    assert m.trainer_spec.byte_fallback and m.normalizer_spec.name == "identity"


def test_from_file_round_trips_the_embedded_vocabulary(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(tokenizer.model_bytes())
    tok = Tokenizer.from_file(path)
    assert tok.vocab_size == tokenizer.vocab_size and tok.stop_ids == tokenizer.stop_ids
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (2, 1, 0, 3)
    for text in TRICKY + ["<start_of_turn>user\nhi<end_of_turn>"]:
        assert tok.encode(text) == tokenizer.encode(text)
        assert tok.encode_plain(text) == tokenizer.encode_plain(text)


def test_from_file_with_cached_vocab_equals_without(tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(tokenizer.model_bytes())
    vocab = tokenizer.vocab_arrays()
    asked = []
    monkeypatch.setattr(tok_mod.spm.SentencePieceProcessor, "id_to_piece",
                        lambda self, ids: asked.append(ids) or self.IdToPiece(ids))
    tok = Tokenizer.from_file(path, vocab=vocab)
    assert all(len(ids) <= 67 for ids in asked)  # only the spot check, never all 262k pieces
    assert tok._pieces == tokenizer._pieces and np.array_equal(tok._types, tokenizer._types)
    text = "<start_of_turn>user\nhi \u2581 caf\u00e9<end_of_turn>" + "".join(TRICKY)
    assert tok.encode(text) == tokenizer.encode(text) and tok.decode(tok.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    # arrays that do not belong to this model are ignored (then sentencepiece is asked for everything)
    wrong = dict(vocab, pieces=np.frombuffer("\0".join(tokenizer._pieces[::-1]).encode(), np.uint8))
    short = dict(vocab, types=vocab["types"][:-1])
    for bad in (wrong, short, {"pieces": vocab["pieces"]}):
        asked.clear()
        tok = Tokenizer.from_file(path, vocab=bad)
        assert tok._pieces == tokenizer._pieces and max(len(ids) for ids in asked) == tokenizer.vocab_size


def test_from_file_errors(tmp_path):
    with pytest.raises(OpenGemmaError, match="cannot read"):
        Tokenizer.from_file(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(OpenGemmaError, match="not a SentencePiece model"):
        Tokenizer.from_file(bad)


def test_tiny_gguf_from_path_and_reader(tmp_path):
    """A GGUF written by gguf-py (real spaces in user-defined pieces, as llama.cpp writes them),
    read from its path and from a ``gguf.GGUFReader``."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), arch="gemma3")
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "  "]
    tokens += [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "a", "b", "ab", "\u2581a"]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 264 + [-1.0, -2.0, -3.0, -4.0, -5.0])
    w.add_token_types([3, 3, 3, 3, 3, 3, 4, 4] + [6] * 256 + [1] * 5)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_array("test.other_strings", ["skipped", "by the reader"])  # non-tokenizer arrays are skipped
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    reader = gguf.GGUFReader(path)
    meta = _read_gguf_tokenizer_from(path)  # our header parser agrees with gguf-py's reader
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        field = reader.fields[key]
        theirs = [
            bytes(field.parts[i]).decode() if key.endswith("tokens") else field.parts[i][0] for i in field.data
        ]
        assert list(meta[key]) == theirs
    assert meta["tokenizer.ggml.bos_token_id"] == 2 and "test.other_strings" not in meta
    for source in (path, str(path), reader):
        tok = Tokenizer.from_gguf(source)
        assert tok.stop_ids == (1, 5) and tok.id_to_piece(7) == "\u2581\u2581"
        ids = tok.encode("ab a  b\n<start_of_turn>é")
        assert [tok.id_to_piece(i) for i in ids] == [
            "<bos>",
            "ab",
            "\u2581a",
            "\u2581\u2581",
            "b",
            "\n",
            "<start_of_turn>",
            "<0xC3>",
            "<0xA9>",
        ]
        assert tok.decode(ids) == "ab a  b\n<start_of_turn>é"


# -- parity with transformers' tokenizer built from the same GGUF --------------------------------------
HF_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Q: What is 12 * 7?\nA: 84",
    "   leading spaces, trailing spaces   ",
    "<table><tr><td>html</td></tr></table>",
    "日本語のテキスト、中文，한국어 and Ελληνικά",
    "<bos>stray <eos> and <pad>, <unk>, <mask>, <unused42>, [multimodal], <start_of_image>",
]
HF_MIXED = (
    "Hello  world\n\n\tdigits 12345 and 3.14159 café naïve Ünïcödé 🙂🚀 "
    "<start_of_turn>user\nhi<end_of_turn>\n  end  \n\n\n"
)


@pytest.mark.slow
def test_hf_parity(tokenizer, hf_gguf_tokenizer):
    for text in HF_PROMPTS + [HF_MIXED]:
        assert tokenizer.encode(text, bos=True) == hf_gguf_tokenizer(text).input_ids, text


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text_with_specials.filter(lambda s: "\u2581" not in s and " " * 32 not in s))
def test_hf_parity_random(tokenizer, hf_gguf_tokenizer, text):
    # Excluded: literal U+2581 (HF reads it as a space; we keep it as bytes so it round-trips) and
    # whitespace runs of 32+ (see test_long_space_runs).
    assert tokenizer.encode(text, bos=True) == hf_gguf_tokenizer(text).input_ids


@pytest.mark.slow
def test_long_space_runs(tokenizer, hf_gguf_tokenizer):
    """Known deviation: a run of 32+ spaces. Gemma's whitespace pieces ("▁▁" .. 31 of them) are
    sentencepiece USER_DEFINED pieces, matched longest-first (as sentencepiece and llama.cpp do);
    transformers' GGUF converter turns them into ordinary BPE pieces and merges them differently."""
    text = "x" + " " * 32 + "y"
    ours = [tokenizer.id_to_piece(i) for i in tokenizer.encode_plain(text)]
    assert ours == ["x", "\u2581" * 31, "\u2581y"]
    assert tokenizer.decode(hf_gguf_tokenizer(text).input_ids) == text  # both spell the same text
