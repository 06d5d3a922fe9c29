"""The mixture file of ``opengemma data prepare`` (TOML or JSON) and reading its sources.

A mixture names its sources (files or folders of JSONL / text / Parquet, with the text field),
the filters of each, the global PII, dedup and decontamination settings, and the **stages** of
training (per-stage source weights and token budgets; report "Pretraining": the mixture is
staged so high-quality data weighs more toward the end). Relative paths are relative to the
mixture file. Every mistake is one :class:`OpenGemmaError` line naming the key: an unknown key or
source, weights that do not sum to 1, a stage without a budget, a missing file.

Example (``examples/mixture-shared-corpus.toml`` is the full one)::

    tokenizer = "embedded"                 # the embedded Gemma 3 tokenizer, or a tokenizer.model / .gguf path
    [sources.web]
    paths = ["../../shared/datasets/pretrain_web_c4_sample"]
    filters = ["gopher_quality", "gopher_repetition", "c4"]
    quality = 0.1                          # keep documents the quality model scores at least this
    toxicity = 0.8                         # drop documents whose worst window scores above this
    [[stages]]
    name = "main"
    tokens = 20_000_000
    weights = {web = 0.7, wiki = 0.3}

Reading: ``.jsonl``/``.json`` (one JSON object per line), ``.txt``/``.md`` (one document per line,
or per file with ``text_mode = "file"``), ``.parquet`` (row groups), any of them gzip'd (``.gz``);
other files in a folder are read whole (``text_mode = "file"``, e.g. source code). Large plain files
are cut into byte ranges of ``chunk_mb`` so both cores share one big file; every chunk is one
resumable task.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OpenGemmaError
from . import filters as filter_mod
from . import pii

_TOP_KEYS = {"name", "tokenizer", "seed", "workers", "shard_tokens", "chunk_mb", "sources", "stages", "pii",
             "dedup", "decontam", "quality", "description"}
_SOURCE_KEYS = {"paths", "text", "text_mode", "glob", "filters", "quality", "toxicity", "heldout", "min_chars",
                "description"}
_STAGE_KEYS = {"name", "tokens", "weights", "ramp_tokens"}
_DEDUP_KEYS = {"exact", "near", "bands", "rows", "ngram"}
_DECONTAM_KEYS = {"enabled", "roots", "n", "min_words", "tasks"}
_QUALITY_KEYS = {"model", "positive", "negative", "window", "heldout"}
_READABLE = (".jsonl", ".json", ".txt", ".md", ".parquet")
_FOLDER_DEFAULT = (".jsonl", ".json", ".txt", ".parquet")  # what a folder contributes without a glob (no README.md)


@dataclass
class Source:
    name: str
    files: list[Path]
    text: list[str] = field(default_factory=lambda: ["text"])
    text_mode: str = "line"  # for text files: "line" (one document per line) or "file"
    filters: dict = field(default_factory=dict)  # filter name -> options
    quality: float | None = None
    toxicity: float | None = None
    heldout: float = 0.0
    min_chars: int = 1


@dataclass
class Stage:
    name: str
    tokens: int
    weights: dict[str, float]
    ramp_tokens: int | None = None

    def as_dict(self) -> dict:
        d = {"name": self.name, "tokens": self.tokens, "weights": dict(self.weights)}
        if self.ramp_tokens:
            d["ramp_tokens"] = self.ramp_tokens
        return d


@dataclass
class Mixture:
    path: Path
    sha256: str
    name: str
    tokenizer: str
    sources: dict[str, Source]
    stages: list[Stage]
    pii: dict
    dedup: dict
    decontam: dict
    quality: dict
    seed: int = 0
    workers: int = 2
    shard_tokens: int = 2**24
    chunk_mb: float = 32.0


# -- parsing ---------------------------------------------------------------------------------------
def load(path: str | Path) -> Mixture:
    """Parse and check a mixture file; every problem is one clear line."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise OpenGemmaError(f"mixture {path}: no such file") from None
    except OSError as e:
        raise OpenGemmaError(f"mixture {path}: unreadable ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OpenGemmaError(f"mixture {path}: not UTF-8 (byte {e.start})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise OpenGemmaError(f"mixture {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    else:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise OpenGemmaError(f"mixture {path}: not valid TOML ({e})") from None
    if not isinstance(data, dict):
        raise OpenGemmaError(f"mixture {path}: expected a table of settings at the top")
    return parse(data, path, hashlib.sha256(raw).hexdigest())


def _bad(path: Path, msg: str):
    raise OpenGemmaError(f"mixture {path}: {msg}")


def _keys(path: Path, table, allowed: set[str], where: str) -> dict:
    if not isinstance(table, dict):
        _bad(path, f"{where} must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        _bad(path, f"unknown key {unknown[0]!r} in {where} (known: {', '.join(sorted(allowed))})")
    return table


def _number(path: Path, value, where: str, lo: float, hi: float = math.inf, integer: bool = False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not (lo <= value <= hi) or (isinstance(value, float) and math.isnan(value)):
        kind = "a whole number" if integer else "a number"
        span = f">= {lo}" if hi == math.inf else f"in [{lo}, {hi}]"
        _bad(path, f"{where} must be {kind} {span}, got {value!r}")
    return value


def parse(data: dict, path: Path, sha256: str = "") -> Mixture:
    _keys(path, data, _TOP_KEYS, "the mixture")
    base = path.parent
    sources_raw = data.get("sources")
    if not isinstance(sources_raw, dict) or not sources_raw:
        _bad(path, "no [sources.<name>] given")
    sources = {name: _source(path, base, name, spec) for name, spec in sources_raw.items()}
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        _bad(path, "no [[stages]] given (each with name, tokens and weights)")
    stages = [_stage(path, i, s, sources) for i, s in enumerate(stages_raw)]
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        _bad(path, f"stage names must be distinct, got {names}")
    pii_policy = pii.check_policy(_keys(path, data.get("pii", {}), {pii.SENSITIVE, pii.PERSONAL}, "[pii]"))
    dedup = {"exact": True, "near": True, "bands": 20, "rows": 7, "ngram": 5,
             **_keys(path, data.get("dedup", {}), _DEDUP_KEYS, "[dedup]")}
    for key in ("bands", "rows", "ngram"):
        _number(path, dedup[key], f"dedup.{key}", 1, 1000, integer=True)
    decontam = {"enabled": True, "roots": [], "n": 13, "min_words": 8, "tasks": None,
                **_keys(path, data.get("decontam", {}), _DECONTAM_KEYS, "[decontam]")}
    if decontam["enabled"]:
        if not decontam["roots"]:
            _bad(path, "decontam.roots: name the benchmark folders (e.g. the shared benchmarks and datasets), "
                       "or set decontam.enabled = false")
        decontam["roots"] = [str((base / r).resolve()) for r in decontam["roots"]]
        if not any(Path(r).is_dir() for r in decontam["roots"]):
            _bad(path, f"decontam.roots: none of {', '.join(decontam['roots'])} exists")
        _number(path, decontam["n"], "decontam.n", 1, 100, integer=True)
        _number(path, decontam["min_words"], "decontam.min_words", 1, 100, integer=True)
    quality = dict(_keys(path, data.get("quality", {}), _QUALITY_KEYS, "[quality]"))
    if quality.get("model"):
        quality["model"] = str((base / quality["model"]).resolve())
    for key in ("positive", "negative"):
        for name in quality.get(key, []):
            if name not in sources:
                _bad(path, f"quality.{key}: unknown source {name!r} (sources: {', '.join(sources)})")
    users = [s.name for s in sources.values() if s.quality is not None]
    if users and not quality.get("model") and not (quality.get("positive") and quality.get("negative")):
        _bad(path, f"source {users[0]!r} sets a quality threshold but [quality] names neither a model nor "
                   "positive/negative sources to train one")
    tokenizer = data.get("tokenizer", "embedded")
    if not isinstance(tokenizer, str):
        _bad(path, "tokenizer must be 'embedded' or a path")
    if tokenizer != "embedded":
        tokenizer = str((base / tokenizer).resolve())
        if not Path(tokenizer).is_file():
            _bad(path, f"tokenizer {tokenizer}: no such file")
    return Mixture(path=path, sha256=sha256, name=str(data.get("name", path.stem)), tokenizer=tokenizer,
                   sources=sources, stages=stages, pii=pii_policy, dedup=dedup, decontam=decontam, quality=quality,
                   seed=_number(path, data.get("seed", 0), "seed", 0, 2**32 - 1, integer=True),
                   workers=_number(path, data.get("workers", 2), "workers", 1, 1024, integer=True),
                   shard_tokens=_number(path, data.get("shard_tokens", 2**24), "shard_tokens", 1, 2**40,
                                        integer=True),
                   chunk_mb=float(_number(path, data.get("chunk_mb", 32), "chunk_mb", 0.001)))


def _source(path: Path, base: Path, name: str, spec) -> Source:
    where = f"sources.{name}"
    _keys(path, spec, _SOURCE_KEYS, f"[{where}]")
    if not name.replace("_", "").replace("-", "").isalnum():
        _bad(path, f"source name {name!r}: use letters, digits, '-' and '_' (it names a folder)")
    paths = spec.get("paths")
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not paths:
        _bad(path, f"{where}.paths: give the files or folders to read")
    files: list[Path] = []
    for p in paths:
        full = (base / p).resolve()
        if full.is_dir():
            pattern = spec.get("glob")
            found = sorted(f for f in full.rglob(pattern or "*") if f.is_file() and not f.name.startswith(".")
                           and (pattern or _readable(f, _FOLDER_DEFAULT)))
            if not found:
                _bad(path, f"{where}: folder {full} holds no readable file ({', '.join(_FOLDER_DEFAULT)}, or .gz of "
                           "them; set glob = '*.py' for other files)")
            files += found
        elif full.is_file():
            files.append(full)
        else:
            _bad(path, f"{where}: {full}: no such file or folder")
    text = spec.get("text", "text")
    text = [text] if isinstance(text, str) else text
    if not isinstance(text, list) or not text or not all(isinstance(t, str) for t in text):
        _bad(path, f"{where}.text: a field name or a list of field names")
    mode = spec.get("text_mode", "line")
    if mode not in ("line", "file"):
        _bad(path, f"{where}.text_mode must be 'line' or 'file', got {mode!r}")
    flt = spec.get("filters", [])
    flt = {f: True for f in flt} if isinstance(flt, list) else flt
    if not isinstance(flt, dict):
        _bad(path, f"{where}.filters: a list of filter names or a table of name = options")
    for fname, opts in flt.items():
        try:
            filter_mod.build(fname, opts)
        except OpenGemmaError as e:
            _bad(path, f"{where}.filters: {e}")
    src = Source(name, files, text, mode, dict(flt), heldout=float(_number(path, spec.get("heldout", 0.0),
                                                                            f"{where}.heldout", 0.0, 0.5)),
                 min_chars=_number(path, spec.get("min_chars", 1), f"{where}.min_chars", 0, integer=True))
    if "quality" in spec:
        src.quality = float(_number(path, spec["quality"], f"{where}.quality", 0.0, 1.0))
    if "toxicity" in spec:
        src.toxicity = float(_number(path, spec["toxicity"], f"{where}.toxicity", 0.0, 1.0))
    return src


def _readable(f: Path, kinds: tuple[str, ...] = _READABLE) -> bool:
    name = f.name.lower().removesuffix(".gz")
    return name.endswith(kinds)


def _stage(path: Path, i: int, spec, sources: dict) -> Stage:
    _keys(path, spec, _STAGE_KEYS, f"stage {i + 1}")
    name = spec.get("name", f"stage{i + 1}")
    where = f"stage {name!r}"
    if "tokens" not in spec:
        _bad(path, f"{where} has no token budget (tokens = N)")
    tokens = _number(path, spec["tokens"], f"{where}: tokens", 1, integer=True)
    weights = spec.get("weights")
    if not isinstance(weights, dict) or not weights:
        _bad(path, f"{where} has no weights (weights = {{source = share, ...}})")
    for src, w in weights.items():
        if src not in sources:
            _bad(path, f"{where}: unknown source {src!r} in weights (sources: {', '.join(sources)})")
        _number(path, w, f"{where}: weight of {src!r}", 0.0, 1.0)
    total = sum(weights.values())
    if abs(total - 1.0) > 1e-6:
        _bad(path, f"{where}: weights sum to {total:.6g}, not 1")
    ramp = spec.get("ramp_tokens")
    if ramp is not None:
        _number(path, ramp, f"{where}: ramp_tokens", 0, tokens, integer=True)
        if i == 0 and ramp:
            _bad(path, f"{where}: ramp_tokens needs a previous stage to ramp from")
    return Stage(str(name), int(tokens), {k: float(v) for k, v in weights.items()}, ramp)


# -- reading ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """One resumable unit of input: a byte range of a plain file, a row group of a Parquet file, or a
    whole compressed file."""

    source: str
    file: str
    start: int = 0
    end: int = -1  # -1: to the end
    lines: bool = False  # start/end count lines (a gzip'd file: no seeking), else bytes (or a row group)

    def as_list(self) -> list:
        return [self.source, self.file, self.start, self.end, self.lines]


def chunks(mix: Mixture) -> list[Chunk]:
    """Every source's input cut into chunks, in a fixed order."""
    out: list[Chunk] = []
    size = max(int(mix.chunk_mb * 2**20), 1)
    for src in mix.sources.values():
        for f in src.files:
            name = f.name.lower()
            if name.endswith(".parquet"):
                groups = _parquet_groups(f)
                out += [Chunk(src.name, str(f), g, g + 1) for g in range(groups)]
            elif src.text_mode == "file" and not _structured(f) or not _readable(f):
                out.append(Chunk(src.name, str(f)))
            elif name.endswith(".gz"):
                out += [Chunk(src.name, str(f), a, b, lines=True) for a, b in _line_ranges(f, size)]
            else:
                n = f.stat().st_size
                out += [Chunk(src.name, str(f), a, min(a + size, n)) for a in range(0, max(n, 1), size)]
    return out


def _structured(f: Path) -> bool:
    return f.name.lower().removesuffix(".gz").endswith((".jsonl", ".json"))


def _line_ranges(f: Path, size: int) -> list[tuple[int, int]]:
    """Line ranges of about ``size`` uncompressed bytes each of a gzip'd file (one quick pass)."""
    ranges, start, n, acc = [], 0, 0, 0
    try:
        with gzip.open(f, "rb") as fh:
            for line in fh:
                n, acc = n + 1, acc + len(line)
                if acc >= size:
                    ranges.append((start, n))
                    start, acc = n, 0
    except (OSError, EOFError) as e:
        raise OpenGemmaError(f"{f}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    if n > start or not ranges:
        ranges.append((start, -1))
    else:
        ranges[-1] = (ranges[-1][0], -1)
    return ranges


def _parquet_groups(f: Path) -> int:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise OpenGemmaError(f"{f}: reading Parquet needs pyarrow (pip install 'opengemma[data]')") from None
    try:
        return pq.ParquetFile(f).num_row_groups
    except Exception as e:  # pyarrow raises several types for a bad file
        raise OpenGemmaError(f"{f}: not a readable Parquet file ({e})") from None


def _text_of(rec, fields: list[str], where: str) -> str:
    if not isinstance(rec, dict):
        raise OpenGemmaError(f"{where}: expected a JSON object")
    parts = []
    for name in fields:
        value = rec.get(name)
        if value is None:
            raise OpenGemmaError(f"{where}: record has no {name!r} field")
        if not isinstance(value, str):
            raise OpenGemmaError(f"{where}: field {name!r} is {type(value).__name__}, not text")
        parts.append(value)
    return "\n".join(parts)


def read_chunk(chunk: Chunk, src: Source) -> Iterator[tuple[str, str]]:
    """(document id, text) of every document of ``chunk``; a bad line or byte is one clear error."""
    path = Path(chunk.file)
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from _read_parquet(chunk, src, path)
        return
    structured = _structured(path)
    if src.text_mode == "file" and not structured or not _readable(path):
        yield f"{path.name}", _whole(path)
        return
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            pos = lineno = 0
            if chunk.lines:  # skip to the first line of the range (a gzip stream cannot seek)
                while lineno < chunk.start and f.readline():
                    lineno += 1
            elif chunk.start:
                pos = chunk.start
                f.seek(pos - 1)
                if f.read(1) != b"\n":  # mid-line: that line belongs to the previous chunk
                    pos += len(f.readline())
                lineno = None  # line numbers are known from the file's start only
            while chunk.end < 0 or (lineno if chunk.lines else pos) < chunk.end:
                raw = f.readline()
                if not raw:
                    break
                at, pos = pos, pos + len(raw)
                if lineno is not None:
                    lineno += 1
                where = f"{path}:{lineno}" if lineno is not None else f"{path}: line at byte {at}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise OpenGemmaError(f"{path}: not UTF-8 (byte {at + e.start}); convert the file to UTF-8") from None
                if not line.strip():
                    continue
                if structured:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise OpenGemmaError(f"{where}: not valid JSON ({e.msg})") from None
                    yield _doc_id(path, lineno, at), _text_of(rec, src.text, where)
                else:
                    yield _doc_id(path, lineno, at), line.rstrip("\r\n")
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise OpenGemmaError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None


def _doc_id(path: Path, lineno: int | None, at: int) -> str:
    return f"{path.name}:{lineno}" if lineno is not None else f"{path.name}@{at}"


def _whole(path: Path) -> str:
    try:
        data = gzip.open(path, "rb").read() if path.name.lower().endswith(".gz") else path.read_bytes()
    except (OSError, EOFError) as e:
        raise OpenGemmaError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OpenGemmaError(f"{path}: not UTF-8 (byte {e.start}); convert the file to UTF-8") from None


def _read_parquet(chunk: Chunk, src: Source, path: Path) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path).read_row_group(chunk.start, columns=src.text)
    except Exception as e:  # missing column, corrupt file
        raise OpenGemmaError(f"{path}: row group {chunk.start}: {e}") from None
    cols = [table.column(c).to_pylist() for c in src.text]
    for i, values in enumerate(zip(*cols)):
        where = f"{path}: row group {chunk.start} row {i}"
        yield f"{path.name}#{chunk.start}.{i}", _text_of(dict(zip(src.text, values)), src.text, where)


def tokenizer_path(value) -> str:
    """A tokenizer given on the command line: "embedded", or a tokenizer.model / .gguf file (or a
    folder holding tokenizer.model, as `opengemma tokenizer train` writes), resolved."""
    if str(value) == "embedded":
        return "embedded"
    p = Path(value).expanduser()
    if p.is_dir():
        p = p / "tokenizer.model"
    if not p.is_file():
        raise OpenGemmaError(f"--tokenizer {value}: no such file")
    return str(p.resolve())
