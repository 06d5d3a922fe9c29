"""Deduplication: exact (identical text) and near-duplicate (MinHash LSH) removal across the whole
mixture (report "Filtering"; Lee et al. 2022 show duplicates hurt and leak into evaluations).

* Exact: each document's text (stripped) is hashed (xxh3, 64 bits) in the filter stage; each task
  writes its ``(hash, doc index)`` pairs sorted; one step merges the sorted files (``heapq.merge``:
  memory stays flat however many documents) and writes, per task, the indices of every copy after
  the first.
* Near: datatrove's four MinHash blocks (signatures, LSH buckets, union-find clusters, filter) with
  :func:`minhash_config`: 5-word shingles of the simplified text (lower case, no punctuation, no
  diacritics), ``bands`` x ``rows`` hashes. A pair of documents becomes a candidate with
  probability ``1 - (1 - J**rows)**bands`` at Jaccard similarity ``J``; the default 20 x 7 gives
  0.99 at J = 0.8 and 0.03 at J = 0.4. The blocks are disk-based and run as datatrove executor
  stages, so they scale out unchanged (Slurm/Ray executors).

Words for shingling come from :class:`WhitespaceWords` (the text is already simplified, so a split
on spaces is exact and avoids datatrove's default spaCy tokenizer, the slowest part of its stage 1).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

PAIR = np.dtype([("hash", "<u8"), ("doc", "<u4")])  # one document's exact hash and index in its task


def content_hash(text: str) -> int:
    """64-bit hash of a document's text, stripped (the exact-duplicate key)."""
    import xxhash

    return xxhash.xxh3_64_intdigest(text.strip().encode("utf-8"))


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """Probability that two documents at this Jaccard similarity share an LSH bucket."""
    return 1.0 - (1.0 - jaccard ** rows) ** bands


def minhash_config(bands: int = 20, rows: int = 7, ngram: int = 5, seed: int = 1):
    """datatrove's :class:`MinhashConfig` for ``bands`` buckets of ``rows`` hashes over ``ngram``-word
    shingles (64-bit hashes)."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    return MinhashConfig(n_grams=ngram, num_buckets=bands, hashes_per_bucket=rows, seed=seed,
                         hash_config=HashConfig(precision=64))


def whitespace_words():
    """A datatrove word tokenizer that splits on whitespace (see the module docstring)."""
    from datatrove.utils.word_tokenizers import WordTokenizer

    class WhitespaceWords(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    return WhitespaceWords("en")


def minhash_steps(work: Path, config, *, removed_dir: Path | None = None):
    """The four datatrove MinHash blocks reading/writing under ``work``: (signature, buckets,
    cluster, filter). The signature and filter blocks must see the same documents in the same
    order per task."""
    from datatrove.pipeline.dedup.minhash import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                                  MinhashDedupSignature)

    sig = MinhashDedupSignature(output_folder=str(work / "signatures"), config=config, language=whitespace_words())
    buckets = MinhashDedupBuckets(input_folder=str(work / "signatures"), output_folder=str(work / "buckets"),
                                  config=config)
    cluster = MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"),
                                  config=config)
    exclusion = None
    if removed_dir is not None:
        from datatrove.pipeline.writers import JsonlWriter

        exclusion = JsonlWriter(str(removed_dir), output_filename="${rank}.jsonl.gz")
    filt = MinhashDedupFilter(input_folder=str(work / "remove"), exclusion_writer=exclusion)
    return sig, buckets, cluster, filt


# -- exact duplicates ------------------------------------------------------------------------------
def write_hashes(path: Path, hashes: Sequence[int]) -> None:
    """Save one task's document hashes (in document order) sorted by hash, atomically."""
    from .shards import _npy_bytes, write_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    arr = np.empty(len(hashes), dtype=PAIR)
    arr["hash"] = np.asarray(hashes, dtype=np.uint64)
    arr["doc"] = np.arange(len(hashes), dtype=np.uint32)
    arr.sort(order=("hash", "doc"))
    write_atomic(path, _npy_bytes(arr))


def _stream(path: Path, task: int) -> Iterable[tuple[int, int, int]]:
    arr = np.load(path, mmap_mode="r")
    for start in range(0, len(arr), 1 << 16):  # read in blocks: flat memory, few Python calls per item
        block = np.asarray(arr[start:start + (1 << 16)])
        for h, d in zip(block["hash"].tolist(), block["doc"].tolist()):
            yield h, task, d


def find_exact(hash_files: Sequence[Path], out_dir: Path) -> int:
    """Merge the tasks' sorted hash files; write ``out_dir/<task>.npy``: sorted uint32 indices of the
    documents of each task that repeat an earlier one (order: task, then index). The number found."""
    from .shards import _npy_bytes, write_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    removes: list[list[int]] = [[] for _ in hash_files]
    last = None
    found = 0
    for h, task, doc in heapq.merge(*(_stream(p, t) for t, p in enumerate(hash_files) if p.is_file())):
        if h == last:
            removes[task].append(doc)
            found += 1
        last = h
    for task, docs in enumerate(removes):
        write_atomic(out_dir / f"{task:05d}.npy", _npy_bytes(np.asarray(sorted(docs), dtype=np.uint32)))
    return found


def load_exact(out_dir: Path, task: int) -> frozenset[int]:
    path = out_dir / f"{task:05d}.npy"
    return frozenset(np.load(path).tolist()) if path.is_file() else frozenset()


def near_duplicates(texts: Sequence[str], work: Path, *, bands: int = 20, rows: int = 7, ngram: int = 5) -> list[int]:
    """Indices of ``texts`` that datatrove's MinHash pipeline removes as near-duplicates of an
    earlier kept one (all four blocks in this process, one task): for tests and benchmarks."""
    from datatrove.data import Document

    config = minhash_config(bands, rows, ngram)
    sig, buckets, cluster, filt = minhash_steps(Path(work), config)
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    sig.run(iter(docs), 0, 1)
    for b in range(bands):
        buckets.run(None, b, bands)
    cluster.run(None, 0, 1)
    kept = {int(d.id) for d in filt.run(iter([Document(text=t, id=str(i)) for i, t in enumerate(texts)]), 0, 1)}
    return [i for i in range(len(texts)) if i not in kept]
