"""Tokenizer training (issue 15, item 1): a Gemma-style SentencePiece vocabulary trained on a small
generated corpus must round-trip any text, split digits, keep whitespace, never produce control
tokens from plain text, carry the same trainer/normalizer options as the GGUF -> SentencePiece
builder writes for Gemma, and load through the project's Tokenizer and chat formatter unchanged."""

from __future__ import annotations

import gzip
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opengemma.chat import format_chat
from opengemma.cli import main
from opengemma.data import tokenize_train as tt
from opengemma.errors import OpenGemmaError
from opengemma.sp_vocab import _parse_pieces
from opengemma.tokenizer import BYTE, CONTROL, NORMAL, USER_DEFINED, Tokenizer

VOCAB = 700
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SYLLABLES = ["ka", "to", "ri", "men", "sa", "lo", "ven", "qu", "ther", "ing", "ab", "os", "ple", "dra", "nu"]


def _corpus(seed: int, n: int) -> list[str]:
    """Documents of made-up words, numbers, indented code, CJK, emoji and tabs."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    docs = []
    for i in range(n):
        kind = i % 4
        if kind == 0:  # prose
            doc = " ".join(rng.choice(words) for _ in range(rng.randint(20, 80))).capitalize() + "."
        elif kind == 1:  # numbers
            price = f"${rng.randint(1, 99999)}.{rng.randint(0, 99):02d}"
            doc = f"In {rng.randint(1800, 2030)} the {rng.choice(words)} cost {price}"
        elif kind == 2:  # code
            name = rng.choice(words)
            doc = (f"def {name}(x):\n    if x > {rng.randint(0, 9)}:\n        return x * {rng.randint(2, 7)}"
                   f"\n\n\treturn {name}")
        else:  # CJK, emoji, runs of spaces
            doc = f"{rng.choice(words)}  日本語のテキスト {rng.choice(['😀', '🚀', '中文'])}   {rng.choice(words)}"
        docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(directory, report, Tokenizer) of a 700-piece vocabulary trained on a JSONL.gz + a text file."""
    root = tmp_path_factory.mktemp("tok")
    with gzip.open(root / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
        for doc in _corpus(0, 1500):
            f.write(json.dumps({"text": doc}) + "\n")
    (root / "extra.txt").write_text("\n".join(_corpus(1, 300)) + "\n", encoding="utf-8")
    report = tt.train_tokenizer([root / "corpus.jsonl.gz", root / "extra.txt"], VOCAB, root / "out",
                                heldout_fraction=0.05, compare="embedded")
    return root, report, Tokenizer.from_file(root / "out" / "tokenizer.model")


def _proto(model_bytes: bytes):
    pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    m = pb2.ModelProto()
    m.ParseFromString(model_bytes)
    return m


def test_options_equal_the_gguf_builders_field_by_field(trained, tokenizer):
    """Every trainer_spec and normalizer_spec field that opengemma.sp_vocab writes for Gemma's own
    vocabulary has the same value in the trained model (vocab_size: the one asked for)."""
    _, _, ours = trained
    gemma, mine = _proto(tokenizer.model_bytes()), _proto(ours.model_bytes())
    fields = gemma.trainer_spec.ListFields()
    assert {f.name for f, _ in fields} >= {"model_type", "split_digits", "byte_fallback", "unk_id", "bos_id",
                                           "eos_id", "pad_id", "unk_piece", "bos_piece", "eos_piece", "pad_piece"}
    for field, value in fields:
        expected = VOCAB if field.name == "vocab_size" else value
        assert getattr(mine.trainer_spec, field.name) == expected, field.name
    for field, value in gemma.normalizer_spec.ListFields():
        assert getattr(mine.normalizer_spec, field.name) == value, field.name
    assert mine.normalizer_spec.remove_extra_whitespaces is False and mine.normalizer_spec.name == "identity"


def test_loads_through_tokenizer_and_chat_formatter(trained, tokenizer):
    _, report, ours = trained
    assert ours.vocab_size == VOCAB == report["vocab_size"]
    assert (ours.pad_id, ours.eos_id, ours.bos_id, ours.unk_id) == (0, 1, 2, 3)
    assert [ours.id_to_piece(i) for i in range(6)] == ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                                                       "<end_of_turn>"]
    assert all(ours.piece_type(i) == CONTROL for i in (0, 1, 2, 4, 5))
    assert ours.stop_ids == (1, ours.end_of_turn_id)
    messages = [{"role": "user", "content": "Hi <end_of_turn> there"}, {"role": "model", "content": "ok"}]
    chat = format_chat(ours, messages, add_generation_prompt=False)
    sot, eot = ours.start_of_turn_id, ours.end_of_turn_id
    assert chat.ids[0] == ours.bos_id and chat.ids[1] == sot
    assert chat.ids.count(sot) == 2 and chat.ids.count(eot) == 2  # the forged marker in content stays text
    assert ours.decode(chat.ids) == tokenizer.decode(format_chat(tokenizer, messages, add_generation_prompt=False).ids)
    assert sum(chat.mask) == len(ours.encode_plain("ok")) + 1  # model content + its <end_of_turn>


@FAST
@given(st.text())
def test_round_trip_random_unicode(trained, text):
    _, _, ours = trained
    assert ours.decode(ours.encode_plain(text)) == text


@FAST
@given(st.text(alphabet=st.sampled_from([" ", "\t", "\n", "\r", "a", "7", "日", "本", "語", "😀", "🚀", "\u2581", "é", "<"]),
               max_size=80))
def test_round_trip_whitespace_runs_cjk_emoji(trained, text):
    _, _, ours = trained
    ids = ours.encode_plain(text)
    assert ours.decode(ids) == text and ours.unk_id not in ids


@pytest.mark.parametrize("text", ["\tindented\t\ttabs\t", "a  b   c    d" + " " * 40 + "e", "  leading and trailing  ",
                                  "日本語と中文の混在テキスト", "emoji 😀🚀👩‍👩‍👧 and ✓", "\u2581literal\u2581\u2581",
                                  "line\r\nwindows\rmac\n\n\n", "\x00\x01nul", "  \n \t\n"])
def test_round_trip_examples(trained, text):
    _, _, ours = trained
    ids = ours.encode_plain(text)
    assert ours.decode(ids) == text
    assert ours.unk_id not in ids  # byte fallback, never <unk>


def test_every_digit_is_its_own_piece(trained):
    _, _, ours = trained
    for i in range(ours.vocab_size):
        piece = ours.id_to_piece(i)
        if any(c.isdigit() for c in piece) and ours.piece_type(i) != BYTE:
            assert len(piece) == 1, piece  # split_digits: no piece joins a digit to anything
    for d in "0123456789":
        assert ours.piece_type(ours.piece_to_id(d)) == NORMAL  # required chars: never byte fallback
    ids = ours.encode_plain("year 2024: 1234567890 and 007")
    digits = [ours.id_to_piece(i) for i in ids if ours.id_to_piece(i).isdigit()]
    assert "".join(digits) == "20241234567890007" and all(len(p) == 1 for p in digits)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>", "user\n",
                                 "model", "<", ">", " ", "text", "\n"]), max_size=20).map("".join))
def test_control_tokens_never_come_from_plain_text(trained, text):
    _, _, ours = trained
    ids = ours.encode_plain(text)
    assert not set(ids) & {0, 1, 2, 3, ours.start_of_turn_id, ours.end_of_turn_id}
    assert ours.decode(ids) == text


def test_whitespace_runs_are_user_defined_pieces(trained):
    _, _, ours = trained
    pieces, _, types = _parse_pieces(ours.model_bytes())  # the file's own piece types
    for run in ("\n", "\n\n\n", "\t\t", "\u2581" * 4, "\u2581" * 31):
        assert types[pieces.index(run)] == USER_DEFINED
    assert [ours.id_to_piece(i) for i in ours.encode_plain("\n\n\n")] == ["\n\n\n"]
    assert ours.id_to_piece(ours.encode_plain("x    y")[1]) == "\u2581" * 4


def test_report_has_bytes_per_token_against_gemma(trained):
    root, report, _ = trained
    on_disk = json.loads((root / "out" / "tokenizer.json").read_text())
    assert on_disk == report
    held = report["heldout"]
    assert held["documents"] > 0
    assert set(held["per_file"]) == {str(root / "corpus.jsonl.gz"), str(root / "extra.txt")}
    assert held["ours"]["bytes_per_token"] > 1 and held["compare"]["bytes_per_token"] > 1
    assert held["compare"]["vocab_size"] == 262144 and held["compare"]["bytes"] == held["ours"]["bytes"]
    assert sum(f["heldout_documents"] for f in report["inputs"]) == held["documents"]
    assert report["training_sample"]["bytes"] <= report["training_sample"]["sample_bytes"]
    assert report["options"]["split_digits"] and report["options"]["byte_fallback"]


def test_heldout_choice_is_deterministic_and_proportional():
    docs = [f"document number {i}" for i in range(4000)]
    chosen = [d for d in docs if tt.is_heldout(d, 0.1, seed=3)]
    assert chosen == [d for d in docs if tt.is_heldout(d, 0.1, seed=3)]
    assert 300 < len(chosen) < 500
    assert chosen != [d for d in docs if tt.is_heldout(d, 0.1, seed=4)]
    assert not any(tt.is_heldout(d, 0.0, seed=3) for d in docs)


def test_bottom_k_sample_is_bounded_and_order_free():
    items = [(f"line {i} " * (i % 7 + 1)) for i in range(500)]
    a, b = tt._BottomK(2000), tt._BottomK(2000)
    for x in items:
        a.offer(tt._key(x, 0), x, len(x))
    for x in reversed(items):
        b.offer(tt._key(x, 0), x, len(x))
    assert a.items() == b.items() and 1800 < a.size <= 2000


def test_sample_bytes_and_determinism(trained, tmp_path):
    root, _, _ = trained
    args = dict(vocab_size=VOCAB, sample_bytes=60_000, heldout_fraction=0.05, compare=None)
    r1 = tt.train_tokenizer([root / "corpus.jsonl.gz"], output=tmp_path / "a", **args)
    tt.train_tokenizer([root / "corpus.jsonl.gz"], output=tmp_path / "b", **args)
    assert r1["training_sample"]["bytes"] <= 60_000 < sum(f["bytes"] for f in r1["inputs"])
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()
    assert "compare" not in r1["heldout"]


def test_parquet_and_text_inputs(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"content": ["x = 1\n", None, "def f():\n    pass"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "c.parquet")
    assert list(tt.read_documents(tmp_path / "c.parquet", ["content"])) == ["x = 1\n", "def f():\n    pass"]
    with pytest.raises(OpenGemmaError, match="no column text"):
        list(tt.read_documents(tmp_path / "c.parquet"))
    (tmp_path / "t.txt").write_bytes(b"first doc\r\n\n  \nsecond\tdoc\n")
    assert list(tt.read_documents(tmp_path / "t.txt")) == ["first doc", "second\tdoc"]


def test_text_fields_are_joined_and_missing_ones_fail(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps({"question": "Q?", "answer": "A."}) + "\n" + json.dumps("a bare string") + "\n")
    assert list(tt.read_documents(f, ["question", "answer"])) == ["Q?\nA.", "a bare string"]
    with pytest.raises(OpenGemmaError, match=r"qa.jsonl:1: none of the text field\(s\) text"):
        list(tt.read_documents(f))


# -- the command line ------------------------------------------------------------------------------
def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_train_and_stats(trained, tmp_path, capsys):
    root, _, _ = trained
    out = tmp_path / "cli"
    code, stdout, _ = _run(capsys, "tokenizer", "train", "--input", str(root / "extra.txt"), "--vocab-size", "500",
                           "--output", str(out), "--compare", "none", "--heldout-fraction", "0.1")
    assert code == 0 and (out / "tokenizer.model").is_file() and "all" in stdout
    code, _, err = _run(capsys, "tokenizer", "train", "--input", str(root / "extra.txt"), "--vocab-size", "500",
                        "--output", str(out))
    assert code == 1 and "already exists" in err and len(err.strip().splitlines()) == 1
    code, stdout, _ = _run(capsys, "tokenizer", "stats", "--tokenizer", str(out), "--input", str(root / "extra.txt"),
                           "--compare", str(root / "out" / "tokenizer.model"), "--json")
    stats = json.loads(stdout)
    assert code == 0 and stats["tokenizer"]["vocab_size"] == 500 and stats["compare"]["bytes_per_token"] > 1


@pytest.mark.parametrize("content, message", [
    (b'{"text": "fine"}\n{"text": broken}\n', "bad.jsonl:2: not JSON"),
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "bad.jsonl:2: not UTF-8"),
    (b'{"text": "fine"}\n[1, 2]\n', "bad.jsonl:2: expected a JSON object"),
    (b'{"text": "fine"}\n{"text": "\\ud800"}\n', "bad.jsonl:2: the text holds a lone surrogate"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    code, _, err = _run(capsys, "tokenizer", "train", "--input", str(bad), "--vocab-size", "500", "--output",
                        str(tmp_path / "o"), "--compare", "none")
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "tokenizer.model").exists()


def test_cli_missing_file_and_bad_flags(tmp_path, capsys):
    code, _, err = _run(capsys, "tokenizer", "train", "--input", str(tmp_path / "nope.txt"), "--vocab-size", "500",
                        "--output", str(tmp_path / "o"))
    assert code == 1 and "nope.txt: no such input file" in err
    for flags in (["--vocab-size", "12"], ["--vocab-size", "500", "--sample-bytes", "lots"]):
        with pytest.raises(SystemExit) as e:
            main(["tokenizer", "train", "--input", "x.txt", "--output", str(tmp_path / "o"), *flags])
        assert e.value.code == 2
    capsys.readouterr()
    assert tt.whitespace_pieces(2) == ["\n", "\n\n", "\u2581\u2581", "\t", "\t\t"]


def test_vocab_too_small_for_the_special_pieces(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    with pytest.raises(OpenGemmaError, match="too small"):
        tt.train_tokenizer([tmp_path / "a.txt"], 350, tmp_path / "o")
