"""Training a Gemma-style SentencePiece tokenizer, and measuring bytes per token.

Report section "Pre-training / Tokenizer": "a subset of the SentencePiece tokenizer ... It splits
digits, does not remove extra whitespace, and relies on byte-level encodings for unknown tokens",
and Table 3's control tokens. :data:`GEMMA_TRAINER_OPTIONS` are those choices as sentencepiece
trainer options, equal field by field to what :func:`opengemma.sp_vocab.build_model_proto` writes
for Gemma's own vocabulary (BPE, ``split_digits``, ``byte_fallback``, identity normalization, no
dummy prefix, no whitespace removal, pad 0 / eos 1 / bos 2 / unk 3 named ``<pad>``...), plus:

* ``<start_of_turn>`` and ``<end_of_turn>`` as CONTROL pieces (ids 4 and 5): sentencepiece never
  produces a control piece from text, so plain text cannot forge a turn;
* Gemma's user-defined whitespace pieces: runs of 1-31 newlines, 2-31 spaces and 1-31 tabs
  (``max_whitespace_run``), matched whole, as Gemma 3's vocabulary has them (code indentation and
  blank lines then cost one token);
* the ten digits are required characters (always single pieces, never byte fallback).

Training text: documents are read from text files (a document per line), JSONL (``text_fields``:
the listed fields a record has, joined by a newline) or Parquet, each optionally gzip'd. A
deterministic fraction of documents (by a hash of their text) is held out; the rest is cut into
lines (the newline pieces are user-defined, so no merge crosses a line anyway) and a sample of at
most ``sample_bytes`` is drawn by bottom-k hashing (the lines with the smallest keyed hashes: one
pass, memory bounded by the sample, independent of file order). Training 8k pieces on the 23 MB
shared pretraining corpus takes about 5 s on 2 threads.

:func:`bytes_per_token` measures compression (UTF-8 bytes / tokens, no BOS/EOS) of a tokenizer on
documents; the training report gives it for the new tokenizer and for a comparison tokenizer (the
embedded Gemma 3) on the same held-out text, overall and per input file.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import io
import json
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import OpenGemmaError

CONTROL_SYMBOLS = ("<start_of_turn>", "<end_of_turn>")
MAX_WHITESPACE_RUN = 31  # Gemma 3's vocabulary: newline runs 1-31, space runs 2-31, tab runs 1-31
_MAX_LINE_CHARS = 8192  # longer lines are cut (at a space) into training sentences of at most this
_SPACE = "\u2581"  # sentencepiece's escaped space: user-defined pieces are matched after escaping

# The report's tokenizer, as sentencepiece trainer options. The fields that
# opengemma.sp_vocab.build_model_proto writes for Gemma's vocabulary must come out equal
# (tests compare the two ModelProtos' trainer_spec and normalizer_spec field by field).
GEMMA_TRAINER_OPTIONS = {
    "model_type": "bpe",
    "split_digits": True,  # every digit its own piece
    "byte_fallback": True,  # unknown characters become UTF-8 byte pieces, never <unk>
    "normalization_rule_name": "identity",  # no NFKC: the text is kept as is
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3,
    "pad_piece": "<pad>", "eos_piece": "<eos>", "bos_piece": "<bos>", "unk_piece": "<unk>",
    "control_symbols": list(CONTROL_SYMBOLS),
    "required_chars": "0123456789",
    "allow_whitespace_only_pieces": True,
}


def whitespace_pieces(max_run: int = MAX_WHITESPACE_RUN) -> list[str]:
    """Gemma's user-defined whitespace pieces (spaces spelled as sentencepiece's U+2581)."""
    return (["\n" * n for n in range(1, max_run + 1)] + [_SPACE * n for n in range(2, max_run + 1)]
            + ["\t" * n for n in range(1, max_run + 1)])


# -- reading documents ---------------------------------------------------------------------------
def _kind(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    suffix = Path(name).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    return "parquet" if suffix == ".parquet" else "text"


def read_documents(path, text_fields: Sequence[str] = ("text",)) -> Iterator[str]:
    """The documents of one file, streamed: a text file (a document per line), JSONL (per record,
    the listed ``text_fields`` it has, joined by a newline) or Parquet; ``.gz`` is decompressed.
    A missing file, a malformed line or non-UTF-8 bytes is one clear error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise OpenGemmaError(f"{path}: no such input file")
    kind = _kind(path)
    if kind == "parquet":
        yield from _parquet_documents(path, text_fields)
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    n = 0
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):  # bytes per line: a decoding error names its line
                line = raw.decode("utf-8").removesuffix("\n")
                if kind == "text":
                    line = line.removesuffix("\r")
                    if line.strip():
                        yield line
                    continue
                if not line.strip():
                    continue
                text = _record_text(line, text_fields, path, n)
                if text:
                    yield text
    except UnicodeDecodeError as e:
        raise OpenGemmaError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip: truncated, corrupt or not gzip at all
        raise OpenGemmaError(f"{path}:{n + 1}: unreadable ({getattr(e, 'strerror', None) or e})") from None


def _record_text(line: str, fields: Sequence[str], path: Path, n: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise OpenGemmaError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno})") from None
    if isinstance(record, str):
        record = {fields[0]: record}
    if not isinstance(record, dict):
        raise OpenGemmaError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
    parts = [record[f] for f in fields if f in record and record[f] is not None]
    if not parts:
        have = ", ".join(list(record)[:8])
        raise OpenGemmaError(f"{path}:{n}: none of the text field(s) {', '.join(fields)} (the record has: {have}); "
                             "choose them with --text-field")
    if not all(isinstance(p, str) for p in parts):
        raise OpenGemmaError(f"{path}:{n}: text field(s) {', '.join(fields)} must hold strings")
    text = "\n".join(parts)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a "\ud800" escape: JSON allows it, UTF-8 cannot hold it
        raise OpenGemmaError(f"{path}:{n}: the text holds a lone surrogate escape (not valid Unicode)") from None
    return text


def _parquet_documents(path: Path, fields: Sequence[str]) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise OpenGemmaError(f"{path}: reading Parquet needs pyarrow (pip install 'opengemma[data]')") from None
    try:
        pf = pq.ParquetFile(path)
        columns = [f for f in fields if f in pf.schema_arrow.names]
        if not columns:
            raise OpenGemmaError(f"{path}: no column {', '.join(fields)} (it has {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=columns, batch_size=4096):
            cols = [batch.column(c).to_pylist() for c in columns]
            for values in zip(*cols):
                text = "\n".join(v for v in values if isinstance(v, str))
                if text:
                    yield text
    except OpenGemmaError:
        raise
    except Exception as e:  # pyarrow's errors have no common base: one line for the user
        raise OpenGemmaError(f"{path}: unreadable Parquet ({type(e).__name__}: {e})") from None


# -- sampling ------------------------------------------------------------------------------------
def _key(text: str, seed: int) -> int:
    """A 64-bit keyed hash of ``text``: the same text gets the same key in every run and file."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little")


class _BottomK:
    """The items with the smallest keys whose sizes add up to at most ``budget`` (bytes): the
    longest prefix, in key order, of everything offered that fits; the same whatever the order of
    the offers."""

    def __init__(self, budget: int) -> None:
        self.budget, self.size = budget, 0
        self._heap: list[tuple[int, int, object]] = []  # (-key, size, item): a max-heap of the kept keys
        self._cut = 1 << 64  # smallest key ever turned away: nothing at or above it may enter

    def offer(self, key: int, item, size: int) -> None:
        if key >= self._cut:
            return
        if self.size + size > self.budget and (not self._heap or -self._heap[0][0] < key):
            self._cut = key  # it would be the first to go
            return
        heapq.heappush(self._heap, (-key, size, item))
        self.size += size
        while self.size > self.budget:
            neg_key, dropped, _ = heapq.heappop(self._heap)
            self.size -= dropped
            self._cut = -neg_key

    def discard(self, items: set) -> None:
        """Drop the kept items that are in ``items``."""
        self._heap = [e for e in self._heap if e[2] not in items]
        heapq.heapify(self._heap)
        self.size = sum(e[1] for e in self._heap)

    def items(self) -> list:
        """Kept items, in key order (a deterministic shuffle)."""
        return [item for _, _, item in sorted(self._heap, key=lambda e: -e[0])]


def _lines(doc: str) -> Iterator[str]:
    """Training sentences of a document: its lines, long ones cut before a space."""
    for line in doc.split("\n"):
        while len(line) > _MAX_LINE_CHARS:
            cut = line.rfind(" ", _MAX_LINE_CHARS // 2, _MAX_LINE_CHARS)
            cut = cut if cut > 0 else _MAX_LINE_CHARS
            yield line[:cut]
            line = line[cut:]
        if line:
            yield line


def is_heldout(text: str, fraction: float, seed: int) -> bool:
    """Deterministic held-out choice by a hash of the document's text (duplicates go together)."""
    return fraction > 0 and _key(text, seed ^ 0x5EED) < fraction * 2**64


# -- training ------------------------------------------------------------------------------------
def train_tokenizer(inputs: Sequence, vocab_size: int, output, *, sample_bytes: int = 64 << 20,
                    heldout: Sequence = (), heldout_fraction: float = 0.02, heldout_bytes: int = 16 << 20,
                    text_fields: Sequence[str] = ("text",), seed: int = 0, threads: int = 2,
                    character_coverage: float = 0.9995, max_whitespace_run: int = MAX_WHITESPACE_RUN,
                    compare="embedded", force: bool = False, log=None) -> dict:
    """Train a tokenizer on ``inputs``, write ``output/tokenizer.model`` and ``output/tokenizer.json``
    (the report, also returned). ``heldout``: files to measure on; without them, a
    ``heldout_fraction`` of the input documents (kept out of training). ``compare``: the tokenizer
    to measure against (``"embedded"``: Gemma 3's; a path; None: none)."""
    import sentencepiece as spm

    from ..tokenizer import Tokenizer

    log = log or (lambda msg: None)
    output = Path(output)
    model_path, report_path = output / "tokenizer.model", output / "tokenizer.json"
    if model_path.exists() and not force:
        raise OpenGemmaError(f"{model_path} already exists (use --force to replace it)")
    if not inputs:
        raise OpenGemmaError("no --input files")
    reserved = 4 + len(CONTROL_SYMBOLS) + len(whitespace_pieces(max_whitespace_run)) + 256
    if vocab_size < reserved + 10:
        raise OpenGemmaError(f"vocab size {vocab_size} is too small: {reserved} pieces are special, whitespace "
                             "runs and bytes (lower --max-whitespace-run or raise --vocab-size)")
    for f in list(inputs) + list(heldout):
        if not Path(f).is_file():
            raise OpenGemmaError(f"{f}: no such input file")
    if compare not in (None, "embedded") and not Path(compare).exists():
        raise OpenGemmaError(f"{compare}: no such tokenizer to compare with")
    fraction = 0.0 if heldout else heldout_fraction

    sample, held = _BottomK(sample_bytes), _BottomK(heldout_bytes)
    file_stats = []
    for f in inputs:
        docs = nbytes = nheld = 0
        first: tuple[int, str] | None = None  # the training document with the smallest key
        for doc in read_documents(f, text_fields):
            size = len(doc.encode("utf-8"))
            docs, nbytes = docs + 1, nbytes + size
            key = _key(doc, seed)
            if is_heldout(doc, fraction, seed):
                nheld += 1
                held.offer(key, (str(f), doc), size)
                continue
            if first is None or key < first[0]:
                first = (key, doc)
            for line in _lines(doc):
                sample.offer(_key(line, seed), line, len(line.encode("utf-8")))
        if fraction and not nheld and docs >= 2:
            # A file of few, long documents (a book, a dump with an article per line) drew none:
            # hold out its first document by key anyway, so every input is measured.
            nheld, (key, doc) = 1, first
            held.offer(key, (str(f), doc), len(doc.encode("utf-8")))
            sample.discard(set(_lines(doc)))
        file_stats.append({"file": str(f), "documents": docs, "bytes": nbytes, "heldout_documents": nheld})
        log(f"read {f}: {docs:,} documents, {nbytes / 1e6:.1f} MB" + (f", {nheld:,} held out" if fraction else ""))
    for f in heldout:
        for doc in read_documents(f, text_fields):
            held.offer(_key(doc, seed), (str(f), doc), len(doc.encode("utf-8")))
    lines = sample.items()
    if not lines:
        raise OpenGemmaError("the inputs hold no text to train on")

    options = dict(GEMMA_TRAINER_OPTIONS, vocab_size=int(vocab_size), num_threads=int(threads),
                   character_coverage=float(character_coverage), input_sentence_size=0,
                   shuffle_input_sentence=False, max_sentence_length=4 * _MAX_LINE_CHARS + 16,
                   user_defined_symbols=whitespace_pieces(max_whitespace_run), minloglevel=2)
    log(f"training a {vocab_size:,}-piece BPE tokenizer on {sample.size / 1e6:.1f} MB ({len(lines):,} lines)")
    proto = io.BytesIO()
    start = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto, **options)
    except RuntimeError as e:  # e.g. "... Vocabulary size too high (5000). Please set it to a value <= 378."
        reason = str(e).strip().splitlines()[-1].rsplit("] ", 1)[-1]
        raise OpenGemmaError(f"sentencepiece could not train the tokenizer on {sample.size:,} bytes of text: "
                             f"{reason}") from None
    train_seconds = time.perf_counter() - start
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OpenGemmaError(f"cannot create {output}: {e.strerror or e}") from None
    from .shards import file_sha256, write_atomic

    write_atomic(model_path, proto.getvalue())
    ours = Tokenizer.from_file(model_path)  # the result must load through the project's tokenizer

    held_docs = held.items()
    other = load_compare_tokenizer(compare) if compare is not None and held_docs else None
    report = {
        "tokenizer": "tokenizer.model", "sha256": file_sha256(model_path), "vocab_size": ours.vocab_size,
        "options": {k: v for k, v in options.items() if k not in ("user_defined_symbols", "minloglevel")},
        "user_defined_symbols": len(options["user_defined_symbols"]),
        "inputs": file_stats,
        "training_sample": {"bytes": sample.size, "lines": len(lines), "sample_bytes": sample_bytes, "seed": seed},
        "train_seconds": round(train_seconds, 3),
        "heldout": heldout_report(held_docs, ours, other,
                                  source=[str(f) for f in heldout] or f"{fraction:g} of the input documents "
                                                                       f"(by a keyed hash of their text, seed {seed})"),
    }
    write_atomic(report_path, (json.dumps(report, indent=1) + "\n").encode("utf-8"))
    return report


def load_compare_tokenizer(spec):
    """The tokenizer to compare with: ``"embedded"`` (Gemma 3's), a ``tokenizer.model``, a GGUF
    file, or a directory holding a ``tokenizer.model``; returned as (name, Tokenizer)."""
    from ..tokenizer import Tokenizer

    if spec in (None, "embedded"):
        from ..embedded import NAME, embedded_path

        return NAME, Tokenizer.from_gguf(embedded_path(progress=False))
    path = Path(spec)
    if path.is_dir() and (path / "tokenizer.model").is_file():
        return str(path), Tokenizer.from_file(path / "tokenizer.model")
    if path.is_file():
        with open(path, "rb") as f:
            is_gguf = f.read(4) == b"GGUF"
        return str(path), Tokenizer.from_gguf(path) if is_gguf else Tokenizer.from_file(path)
    raise OpenGemmaError(f"{spec}: no such tokenizer (give 'embedded', a tokenizer.model, a .gguf file or a "
                         "directory with a tokenizer.model)")


def bytes_per_token(tokenizer, docs: Sequence[str]) -> dict:
    """UTF-8 bytes, tokens (no BOS/EOS) and bytes per token of ``tokenizer`` on ``docs``."""
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    tokens = sum(len(tokenizer.encode_plain(d)) for d in docs)
    return {"bytes": nbytes, "tokens": tokens, "bytes_per_token": round(nbytes / tokens, 4) if tokens else None}


def heldout_report(docs: Sequence[tuple[str, str]], ours, other=None, *, source="") -> dict:
    """Bytes per token of ``ours`` (and ``other``: (name, tokenizer)) on (file, text) documents,
    overall and per file."""
    by_file: dict[str, list[str]] = {}
    for f, text in docs:
        by_file.setdefault(f, []).append(text)
    texts = [t for _, t in docs]
    report = {"source": source, "documents": len(texts), "ours": bytes_per_token(ours, texts), "per_file": {}}
    if other is not None:
        report["compare"] = {"name": other[0], "vocab_size": other[1].vocab_size, **bytes_per_token(other[1], texts)}
    for f, group in sorted(by_file.items()):
        entry = {"documents": len(group), "ours": bytes_per_token(ours, group)}
        if other is not None:
            entry["compare"] = bytes_per_token(other[1], group)
        report["per_file"][f] = entry
    return report


def format_report(report: dict, ours_name: str = "ours") -> str:
    """The held-out bytes-per-token table of a report, as text."""
    held = report.get("heldout", report)
    cmp_name = held.get("compare", {}).get("name")
    what = "held-out text" if "heldout" in report else "text"
    lines = [f"{what}: {held['documents']:,} documents ({held['ours']['bytes'] / 1e6:.2f} MB), "
             f"{held.get('source', '')}"]
    head = f"{'file':<48} {'docs':>6} {ours_name + ' B/tok':>12}"
    if cmp_name:
        head += f" {'compare B/tok':>14} {'ratio':>7}"
    lines.append(head)

    def row(label, docs, ours, other):
        text = f"{label[-48:]:<48} {docs:>6} {_fmt(ours):>12}"
        if other is not None:
            ratio = ours["bytes_per_token"] / other["bytes_per_token"] if ours["tokens"] and other["tokens"] else None
            text += f" {_fmt(other):>14} {ratio if ratio is None else f'{ratio:.3f}':>7}"
        return text

    for f, entry in held["per_file"].items():
        lines.append(row(os.path.basename(f) if len(f) > 48 else f, entry["documents"], entry["ours"],
                         entry.get("compare")))
    lines.append(row("all", held["documents"], held["ours"], held.get("compare")))
    if cmp_name:
        lines.append(f"compare = {cmp_name} ({held['compare']['vocab_size']:,} pieces)")
    return "\n".join(lines)


def _fmt(entry: dict) -> str:
    return "-" if entry["bytes_per_token"] is None else f"{entry['bytes_per_token']:.3f}"
