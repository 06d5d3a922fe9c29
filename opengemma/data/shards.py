"""Tokenized shards: the on-disk format between ``opengemma data prepare`` and training.

A prepared directory (layout agreed in the project's data interface)::

    DIR/manifest.json                  written last: the directory is complete only when it exists
    DIR/tokenizer.model                the tokenizer the ids come from
    DIR/shards/<source>/<NNNNN>.bin     uint32 little-endian ids, documents back to back
    DIR/shards/<source>/<NNNNN>.idx.npy uint64 [n_docs + 1] start offset of each document (last = total)
    DIR/shards/<source>/<NNNNN>.json    {"tokens": int, "docs": int, "sha256": hex digest of the .bin}
    DIR/heldout/<source>/...            the same, for held-out documents (validation), never trained on

Ids are uint32 because Gemma's vocabulary (262,144) does not fit 16 bits. Each document is stored
as ``[BOS] + tokens + [EOS]`` (the report's BOS per document); :class:`ShardWriter` adds them when
asked.

Writing is crash-safe: each file goes to a hidden temp name in its folder and is renamed into
place, and a shard's ``.json`` comes last, so a shard exists for readers (and for a resumed run)
only once it is complete; a killed run leaves at most temp files, never a half shard under a
final name. Reading memory-maps every ``.bin`` (nothing is loaded up front; a document is a zero-
copy numpy view) after cheap consistency checks of every shard (file sizes against the ``.json``,
offsets monotone and ending at the token count), so a truncated or mismatched shard is one clear
:class:`~opengemma.errors.OpenGemmaError` at open time; :meth:`ShardSet.verify` also checks every
``.bin`` against its SHA-256 (a full read: about a second per GB).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes, new_temp_file
from ..errors import OpenGemmaError

FORMAT, VERSION = "opengemma-shards", 1
TOKEN_DTYPE = np.dtype("<u4")  # ids; Gemma's 262k vocabulary exceeds uint16
OFFSET_DTYPE = np.dtype("<u8")  # document offsets into a .bin
MANIFEST = "manifest.json"
# manifest keys of each split: its shard list, token count, document count
_SPLIT_KEYS = {"train": ("shards", "tokens", "docs"), "heldout": ("heldout", "heldout_tokens", "heldout_docs")}


# -- atomic files --------------------------------------------------------------------------------
write_atomic = atomic_write_bytes  # the name the data modules use


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8")


# -- writing -------------------------------------------------------------------------------------
class ShardWriter:
    """Writes documents into numbered shards of about ``shard_tokens`` ids each, in ``folder``.

    ``add(ids)`` appends one document (``bos``/``eos``: ids to put around it); a new shard starts
    once the current one holds ``shard_tokens`` or more (a document never straddles two shards, so
    one longer than ``shard_tokens`` gets a shard of its own). ``close()`` finishes the last shard
    and returns the paths of all shards this writer finished, relative to ``root`` (default: the
    folder two levels up, i.e. the prepared directory for ``DIR/shards/<source>``), as
    ``manifest.json`` lists them. Shards are named ``{prefix}{index:05d}`` from ``start_index``: a
    resumed or parallel run picks its own range. ``vocab_size``: when given, an id outside it is an
    error (a tokenizer mix-up caught before it reaches training).

    The ``.bin`` streams to a temp file (memory stays flat), hashed as it goes. Use it as a
    context manager: an exception inside ``with`` drops the unfinished shard (finished ones stay).
    """

    def __init__(self, folder, shard_tokens: int = 2**24, *, root=None, start_index: int = 0,
                 prefix: str = "", vocab_size: int | None = None) -> None:
        if shard_tokens < 1:
            raise OpenGemmaError(f"shard_tokens must be positive, got {shard_tokens}")
        self.folder = Path(folder)
        self.root = Path(root) if root is not None else self.folder.parent.parent
        self.shard_tokens, self.prefix, self.vocab_size = int(shard_tokens), prefix, vocab_size
        self._index = int(start_index)
        self._finished: list[str] = []
        self._file = None  # the open temp .bin of the current shard
        self._closed = False
        self.tokens = self.docs = 0  # totals over all shards of this writer
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OpenGemmaError(f"cannot create shard folder {self.folder}: {e.strerror or e}") from None

    # -- per document
    def add(self, ids, *, bos: int | None = None, eos: int | None = None) -> None:
        """Append one document: ``ids`` (a sequence of ints or an integer array), with ``bos``
        before and ``eos`` after it when given. An empty document (no ids, no bos/eos) is skipped."""
        if self._closed:
            raise OpenGemmaError("ShardWriter.add after close()")
        arr = self._as_ids(ids)
        if bos is not None or eos is not None:
            arr = np.concatenate([self._as_ids([] if bos is None else [bos]), arr,
                                  self._as_ids([] if eos is None else [eos])])
        if arr.size == 0:
            return
        if self._file is not None and self._shard_tokens_now >= self.shard_tokens:
            self._finish_shard()
        if self._file is None:
            self._start_shard()
        data = arr.astype(TOKEN_DTYPE, copy=False).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._shard_tokens_now += int(arr.size)
        self._offsets.append(self._shard_tokens_now)
        self.tokens += int(arr.size)
        self.docs += 1

    def _as_ids(self, ids) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise OpenGemmaError(f"a document must be a 1-D sequence of integer ids, got shape {arr.shape} "
                                 f"of {arr.dtype}")
        if arr.size and arr.dtype != TOKEN_DTYPE:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= 2**32:
                raise OpenGemmaError(f"token id {lo if lo < 0 else hi} does not fit a uint32 shard")
        if arr.size and self.vocab_size is not None and int(arr.max()) >= self.vocab_size:
            raise OpenGemmaError(f"token id {int(arr.max())} is outside the vocabulary of {self.vocab_size}")
        return arr.astype(np.int64, copy=False) if arr.dtype != TOKEN_DTYPE else arr

    # -- per shard
    def _paths(self) -> tuple[Path, Path, Path]:
        stem = os.path.join(self.folder, f"{self.prefix}{self._index:05d}")  # no with_suffix: a prefix may hold dots
        return Path(stem + ".bin"), Path(stem + ".idx.npy"), Path(stem + ".json")

    def _start_shard(self) -> None:
        bin_path, _, meta_path = self._paths()
        # Overwriting a finished shard: drop its .json first so it never vouches for a new .bin.
        meta_path.unlink(missing_ok=True)
        self._tmp = Path(new_temp_file(bin_path)[0])
        self._file = open(self._tmp, "wb")
        self._hash = hashlib.sha256()
        self._offsets = [0]
        self._shard_tokens_now = 0

    def _finish_shard(self) -> None:
        bin_path, idx_path, meta_path = self._paths()
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, bin_path)
        except BaseException:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            raise
        finally:
            self._file = None
        offsets = np.asarray(self._offsets, dtype=OFFSET_DTYPE)  # [n_docs + 1]
        write_atomic(idx_path, _npy_bytes(offsets))
        meta = {"tokens": self._shard_tokens_now, "docs": len(self._offsets) - 1, "sha256": self._hash.hexdigest()}
        write_atomic(meta_path, _json_bytes(meta))  # last: now the shard counts as finished
        self._finished.append(os.path.relpath(bin_path, self.root).replace(os.sep, "/"))
        self._index += 1

    def close(self) -> list[str]:
        """Finish the current shard; the relative paths of every shard this writer finished."""
        if not self._closed:
            if self._file is not None:
                self._finish_shard()
            self._closed = True
        return list(self._finished)

    def abort(self) -> None:
        """Drop the unfinished shard (its temp file); finished shards stay."""
        if self._file is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._file = None
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def finished_shards(folder) -> list[str]:
    """Names (``NNNNN``) of the finished shards in ``folder``: those whose ``.json`` exists, the
    marker a resumed run uses to skip work already done."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".json")] for p in folder.glob("*.json") if not p.name.startswith("."))


# -- manifest ------------------------------------------------------------------------------------
def write_manifest(directory, manifest: dict) -> Path:
    """Write ``DIR/manifest.json`` atomically (call it last: it marks the directory complete).
    ``format`` and ``version`` are filled in; the rest is checked as :func:`read_manifest` does."""
    directory = Path(directory)
    manifest = {"format": FORMAT, "version": VERSION, **{k: v for k, v in manifest.items()
                                                         if k not in ("format", "version")}}
    _check_manifest(manifest, directory / MANIFEST)
    path = directory / MANIFEST
    write_atomic(path, _json_bytes(manifest))
    return path


def read_manifest(directory) -> dict:
    """``DIR/manifest.json``, checked: one clear error if the directory is not a finished shard set."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise OpenGemmaError(f"{directory}: no such shard directory")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OpenGemmaError(f"{directory}: no manifest.json: not a prepared shard directory, or its "
                             "`opengemma data prepare` run did not finish") from None
    except (OSError, UnicodeDecodeError) as e:
        raise OpenGemmaError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise OpenGemmaError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(m, where) -> None:
    def bad(msg: str):
        raise OpenGemmaError(f"{where}: {msg}")

    if not isinstance(m, dict) or m.get("format") != FORMAT:
        bad(f"not an {FORMAT} manifest")
    if m.get("version") != VERSION:
        bad(f"format version {m.get('version')!r} is not supported (this opengemma reads version {VERSION})")
    sources = m.get("sources")
    if not isinstance(sources, dict) or not sources:
        bad("'sources' must be a non-empty object")
    for name, src in sources.items():
        if not isinstance(src, dict):
            bad(f"source {name!r} must be an object")
        for key in ("shards", "heldout"):
            paths = src.get(key, [])
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                bad(f"source {name!r}: {key!r} must be a list of shard paths")
    stages = m.get("stages", [])
    if not isinstance(stages, list):
        bad("'stages' must be a list")
    tok = m.get("tokenizer", {})
    if not isinstance(tok, dict):
        bad("'tokenizer' must be an object")


# -- reading -------------------------------------------------------------------------------------
class Shard:
    """One memory-mapped shard: ``tokens`` uint32 [n_tokens] and ``offsets`` uint64 [n_docs + 1]."""

    __slots__ = ("path", "tokens", "offsets", "meta")

    def __init__(self, bin_path: Path) -> None:
        self.path = bin_path
        stem = str(bin_path)[: -len(".bin")] if str(bin_path).endswith(".bin") else str(bin_path)
        meta_path, idx_path = Path(stem + ".json"), Path(stem + ".idx.npy")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            tokens, docs = int(meta["tokens"]), int(meta["docs"])
        except FileNotFoundError:
            raise OpenGemmaError(f"shard {bin_path}: its .json is missing (an unfinished shard)") from None
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise OpenGemmaError(f"shard {bin_path}: unreadable .json ({e})") from None
        self.meta = meta
        try:
            size = bin_path.stat().st_size
        except OSError as e:
            raise OpenGemmaError(f"shard {bin_path}: {e.strerror or e}") from None
        if size != tokens * TOKEN_DTYPE.itemsize:
            raise OpenGemmaError(f"shard {bin_path} is corrupt or truncated: {size} bytes, its .json says "
                                 f"{tokens} tokens ({tokens * TOKEN_DTYPE.itemsize} bytes)")
        try:
            offsets = np.load(idx_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise OpenGemmaError(f"shard {bin_path}: unreadable document index {idx_path.name} ({e})") from None
        if offsets.shape != (docs + 1,) or offsets.dtype != OFFSET_DTYPE:
            raise OpenGemmaError(f"shard {bin_path}: document index has shape {offsets.shape} of {offsets.dtype}, "
                                 f"expected ({docs + 1},) of uint64")
        if docs and (int(offsets[0]) != 0 or int(offsets[-1]) != tokens or np.any(np.diff(offsets) <= 0)):
            raise OpenGemmaError(f"shard {bin_path}: document index is inconsistent with its {tokens} tokens")
        self.offsets = np.ascontiguousarray(offsets)
        # np.memmap refuses empty files; an empty shard reads as an empty array. The plain
        # ndarray view (it keeps the map alive) slices without np.memmap's per-slice overhead.
        self.tokens = (np.memmap(bin_path, dtype=TOKEN_DTYPE, mode="r").view(np.ndarray) if tokens
                       else np.zeros(0, dtype=TOKEN_DTYPE))

    def verify(self) -> None:
        """Check the ``.bin`` against the SHA-256 in its ``.json``."""
        if file_sha256(self.path) != self.meta.get("sha256"):
            raise OpenGemmaError(f"shard {self.path} is corrupt: its SHA-256 does not match its .json")


class ShardSource:
    """The documents of one source (one split), over all its shards, by a global document index."""

    def __init__(self, name: str, shards: Sequence[Shard]) -> None:
        self.name = name
        self.shards = list(shards)
        docs = np.array([len(s.offsets) - 1 for s in self.shards], dtype=np.int64)
        self._doc_starts = np.concatenate([[0], np.cumsum(docs)])  # [n_shards + 1]
        self.num_docs = int(self._doc_starts[-1])
        self.num_tokens = int(sum(len(s.tokens) for s in self.shards))
        # Fast paths when there is a single shard (the common small case): no search per document.
        self._single = self.shards[0] if len(self.shards) == 1 else None

    def _locate(self, i: int) -> tuple[Shard, int]:
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} of source {self.name!r} (it has {self.num_docs})")
        if self._single is not None:
            return self._single, i
        k = int(np.searchsorted(self._doc_starts, i, side="right")) - 1
        return self.shards[k], i - int(self._doc_starts[k])

    def doc(self, i: int) -> np.ndarray:
        """Document ``i`` as a read-only uint32 view into its shard (``[BOS] ... [EOS]``)."""
        shard, j = self._locate(i)
        return shard.tokens[int(shard.offsets[j]) : int(shard.offsets[j + 1])]

    def doc_length(self, i: int) -> int:
        shard, j = self._locate(i)
        return int(shard.offsets[j + 1] - shard.offsets[j])

    def doc_lengths(self) -> np.ndarray:
        """Length of every document, int64 [num_docs]."""
        if not self.shards:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(s.offsets).astype(np.int64) for s in self.shards])

    def iter_docs(self) -> Iterable[np.ndarray]:
        for shard in self.shards:
            offs = shard.offsets.tolist()
            for a, b in zip(offs[:-1], offs[1:]):
                yield shard.tokens[a:b]


class ShardSet:
    """A prepared directory, opened: ``manifest`` and, per split, every source memory-mapped."""

    def __init__(self, directory: Path, manifest: dict, splits: dict[str, dict[str, ShardSource]]) -> None:
        self.directory, self.manifest, self._splits = directory, manifest, splits

    @classmethod
    def open(cls, directory, *, verify: bool = False) -> ShardSet:
        """Open ``DIR`` (checks every shard's sizes and index; ``verify``: also their SHA-256)."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        splits: dict[str, dict[str, ShardSource]] = {}
        for split, (key, tokens_key, docs_key) in _SPLIT_KEYS.items():
            splits[split] = {}
            for name, src in manifest["sources"].items():
                shards = []
                for rel in src.get(key, []):
                    path = (directory / rel).resolve()
                    if not path.is_file():
                        raise OpenGemmaError(f"{directory}: shard {rel} of source {name!r} is missing")
                    shards.append(Shard(path))
                source = ShardSource(name, shards)
                for what, count in ((tokens_key, source.num_tokens), (docs_key, source.num_docs)):
                    expected = src.get(what)
                    if expected is not None and expected != count:
                        raise OpenGemmaError(f"{directory}: source {name!r} has {count} {what.split('_')[-1]} in "
                                             f"its {split} shards, the manifest says {expected}")
                splits[split][name] = source
        shard_set = cls(directory, manifest, splits)
        if verify:
            shard_set.verify()
        return shard_set

    @property
    def sources(self) -> list[str]:
        return list(self.manifest["sources"])

    @property
    def stages(self) -> list[dict]:
        return list(self.manifest.get("stages", []))

    @property
    def tokenizer_info(self) -> dict:
        return dict(self.manifest.get("tokenizer", {}))

    def source(self, name: str, split: str = "train") -> ShardSource:
        if split not in self._splits:
            raise OpenGemmaError(f"unknown split {split!r} (expected one of {', '.join(self._splits)})")
        try:
            return self._splits[split][name]
        except KeyError:
            raise OpenGemmaError(f"{self.directory}: no source {name!r} (it has {', '.join(self.sources)})") from None

    def verify(self) -> None:
        """Check every shard's ``.bin`` against its SHA-256."""
        for split in self._splits.values():
            for src in split.values():
                for shard in src.shards:
                    shard.verify()

    def __repr__(self) -> str:
        parts = [f"{n}: {s.num_tokens:,} tokens / {s.num_docs:,} docs" for n, s in self._splits["train"].items()]
        return f"ShardSet({str(self.directory)!r}; {'; '.join(parts)})"


def source_totals(paths: Iterable[str], root) -> dict[str, int]:
    """``{"tokens": ..., "docs": ...}`` summed from the ``.json`` of shards listed relative to
    ``root`` (what a manifest entry records, without opening the ``.bin`` files)."""
    tokens = docs = 0
    for rel in paths:
        meta_path = Path(root) / (rel[: -len(".bin")] + ".json" if rel.endswith(".bin") else rel + ".json")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise OpenGemmaError(f"shard {rel}: unreadable .json ({e})") from None
        tokens, docs = tokens + int(meta["tokens"]), docs + int(meta["docs"])
    return {"tokens": tokens, "docs": docs}


def file_sha256(path) -> str:
    """Hex SHA-256 of a file (the manifest records the tokenizer's)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()



def build_shard_set(directory, sources: dict, *, heldout: dict | None = None, stages: Sequence[dict] = (),
                    tokenizer: dict | None = None, shard_tokens: int = 2**24, bos: int | None = None,
                    eos: int | None = None) -> Path:
    """Write a complete shard directory from token lists: ``sources`` / ``heldout`` map a source
    name to its documents (sequences of ids; ``bos``/``eos`` added around each when given), then
    the manifest. For tests and small inputs; ``opengemma data prepare`` builds the real ones."""
    directory = Path(directory)
    entries: dict[str, dict] = {}
    for name in sources:
        entry = entries.setdefault(name, {})
        for split, docs in (("train", sources[name]), ("heldout", (heldout or {}).get(name, ()))):
            key, tokens_key, docs_key = _SPLIT_KEYS[split]
            with ShardWriter(directory / key / name, shard_tokens, root=directory) as w:
                for doc in docs:
                    w.add(doc, bos=bos, eos=eos)
            entry.update({key: w.close(), tokens_key: w.tokens, docs_key: w.docs})
    manifest = {"tokenizer": dict(tokenizer or {}), "sources": entries, "stages": list(stages)}
    write_manifest(directory, manifest)
    return directory
