"""Decontamination: remove training documents that contain evaluation items (report "Filtering":
evaluation sets are removed from the pretraining mixture), by n-gram overlap as GPT-3 (Brown et
al. 2020, appendix C) and PaLM: a document that shares one 13-gram of normalised words with an
item of any benchmark is contaminated.

The index is built from ``opengemma eval``'s task registry (:data:`opengemma.eval.tasks.TASKS`),
generically, so a task added to eval is decontaminated against without touching this file: for
each task, ``load(DataSource(roots))``; per evaluated item the task's ``decontam_texts(doc)`` when
it defines one, else for multiple-choice tasks the contexts and the gold continuation of
``to_mc(doc)``, else the zero-shot ``prompt(doc, [])``. Items shorter than ``n`` words contribute
their whole word sequence when it has at least ``min_words`` (GPT-3 lowers n for short items the
same way); shorter ones cannot be matched reliably and are counted as skipped. A match counts only
when the n-gram is informative (:func:`informative`: not a run of numbers or one repeated word).
Tasks whose data are missing under every root are reported, not fatal.

Words are ``\\w+`` runs of the lower-cased text (punctuation and spacing ignored). Each word is
hashed once (xxh64) and an n-gram's hash is a polynomial of its words' hashes mod 2**64, computed
for all positions at once with numpy; the index is a sorted uint64 array (plus the task and item of
each n-gram) saved as ``.npy`` files that worker processes memory-map, so it is built once and
shared, and a lookup is a binary search.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import OpenGemmaError

DEFAULT_N, DEFAULT_MIN_WORDS = 13, 8
_WORD = re.compile(r"\w+")
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio): the polynomial base
_BITS = 28  # pre-filter bitmap of 2**28 bits (32 MiB): ~1-2% false hits at a few million n-grams


def normal_words(text: str) -> list[str]:
    """Lower-cased ``\\w+`` runs: the units n-grams are made of."""
    return _WORD.findall(text.lower())


def _word_hashes(ws: Sequence[str]) -> np.ndarray:
    import xxhash

    return np.fromiter((xxhash.xxh64_intdigest(w) for w in ws), dtype=np.uint64, count=len(ws))


def gram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every window of ``n`` consecutive words ([len - n + 1]; empty if too short)."""
    count = len(word_hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic mod 2**64 is the point
        for j in range(n):
            h = h * _MULT + word_hashes[j:j + count]
    return h


def item_texts(task, doc) -> list[str]:
    """The test text of one evaluated item that training data must not contain."""
    if hasattr(task, "decontam_texts"):
        return [t for t in task.decontam_texts(doc) if t]
    if getattr(task, "KIND", None) == "mc":
        item = task.to_mc(doc)
        ctx, cont = item.pairs[item.gold]
        others = {c for c, _ in item.pairs if c != ctx}
        return [ctx + cont, *sorted(others)]
    return [task.prompt(doc, [])]


@dataclass
class TaskReport:
    name: str
    items: int = 0
    grams: int = 0
    skipped_short: int = 0
    missing: str | None = None  # why the task's data could not be read


@dataclass
class Index:
    """Sorted n-gram hashes of every benchmark item, with the task and item each came from."""

    n: int
    hashes: np.ndarray  # uint64 [G], sorted
    task_ids: np.ndarray  # uint16 [G]
    item_ids: np.ndarray  # uint32 [G]
    lengths: list[int]  # gram lengths present (n, and shorter whole items)
    tasks: list[TaskReport] = field(default_factory=list)
    bitmap: np.ndarray | None = None  # uint8 [2**_BITS / 8]: bit (hash >> (64 - _BITS)) set for each entry

    def __post_init__(self):
        if self.bitmap is None:
            self.bitmap = np.zeros(1 << (_BITS - 3), dtype=np.uint8)
            top = (np.asarray(self.hashes) >> np.uint64(64 - _BITS)).astype(np.int64)
            np.bitwise_or.at(self.bitmap, top >> 3, (1 << (top & 7)).astype(np.uint8))

    # -- building
    @classmethod
    def build(cls, roots: Sequence[str | Path], n: int = DEFAULT_N, min_words: int = DEFAULT_MIN_WORDS,
              tasks: Sequence[str] | None = None) -> Index:
        """Index every task of the eval registry (or ``tasks``) readable under ``roots``."""
        from ..eval.tasks import TASKS
        from ..eval.tasks.base import DataSource

        if n < 1 or min_words < 1:
            raise OpenGemmaError(f"decontamination: n ({n}) and min_words ({min_words}) must be positive")
        existing = [Path(r) for r in roots if Path(r).is_dir()]
        if not existing:
            raise OpenGemmaError(f"decontamination: none of the benchmark roots exists: {', '.join(map(str, roots))}")
        source = DataSource(existing)
        names = list(TASKS) if tasks is None else list(tasks)
        parts: list[tuple[np.ndarray, int, np.ndarray]] = []
        reports: list[TaskReport] = []
        for tid, name in enumerate(names):
            if name not in TASKS:
                raise OpenGemmaError(f"decontamination: unknown task {name!r}")
            rep = TaskReport(name)
            reports.append(rep)
            try:
                task = importlib.import_module(TASKS[name])
                docs = task.load(source)[0]
            except OpenGemmaError as e:
                rep.missing = str(e)
                continue
            for item, doc in enumerate(docs):
                rep.items += 1
                for text in item_texts(task, doc):
                    wh = _word_hashes(normal_words(text))
                    k = n if len(wh) >= n else len(wh)
                    if k < min_words:
                        rep.skipped_short += 1
                        continue
                    g = gram_hashes(wh, k)
                    rep.grams += len(g)
                    parts.append((g, k, np.full(len(g), item, dtype=np.uint32), tid))
        if parts:
            # the gram length is folded into the hash so equal word hashes of different lengths differ
            hashes = np.concatenate([_with_length(g, k) for g, k, _, _ in parts])
            task_ids = np.concatenate([np.full(len(g), t, dtype=np.uint16) for g, _, _, t in parts])
            item_ids = np.concatenate([i for _, _, i, _ in parts])
            lengths = sorted({k for _, k, _, _ in parts}, reverse=True)
        else:
            hashes, task_ids, item_ids, lengths = (np.empty(0, np.uint64), np.empty(0, np.uint16),
                                                   np.empty(0, np.uint32), [])
        order = np.lexsort((item_ids, task_ids, hashes))
        hashes, task_ids, item_ids = hashes[order], task_ids[order], item_ids[order]
        # one entry per (n-gram, task): templates repeated in every item (BBH's chain-of-thought
        # prompt) would otherwise dominate the index; the first item keeps the name
        keep = np.ones(len(hashes), dtype=bool)
        keep[1:] = (hashes[1:] != hashes[:-1]) | (task_ids[1:] != task_ids[:-1])
        return cls(n, hashes[keep], task_ids[keep], item_ids[keep], lengths, reports)

    # -- persistence (workers memory-map the arrays)
    def save(self, folder: str | Path) -> None:
        from .shards import write_atomic

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("hashes", "task_ids", "item_ids", "bitmap"):
            np.save(folder / f"{name}.npy", getattr(self, name))
        meta = {"n": self.n, "lengths": self.lengths, "tasks": [vars(t) for t in self.tasks]}
        write_atomic(folder / "index.json", json.dumps(meta, indent=1).encode())  # last: the index is complete

    @classmethod
    def load(cls, folder: str | Path) -> Index:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "index.json").read_text(encoding="utf-8"))
            arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r")
                      for name in ("hashes", "task_ids", "item_ids", "bitmap")}
        except (OSError, ValueError) as e:
            raise OpenGemmaError(f"decontamination index {folder}: unreadable ({e})") from None
        return cls(meta["n"], arrays["hashes"], arrays["task_ids"], arrays["item_ids"], meta["lengths"],
                   [TaskReport(**t) for t in meta["tasks"]], arrays["bitmap"])

    @staticmethod
    def exists(folder: str | Path) -> bool:
        return (Path(folder) / "index.json").is_file()

    # -- lookup
    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def find(self, text: str) -> list[tuple[str, int, str]]:
        """Every benchmark item ``text`` overlaps: ``(task, item index, the first matching n-gram)``,
        one entry per (task, item)."""
        if not len(self.hashes):
            return []
        ws = normal_words(text)
        wh = _word_hashes(ws)
        hits: dict[tuple[int, int], str] = {}
        for k in self.lengths:
            g = _with_length(gram_hashes(wh, k), k)
            top = (g >> np.uint64(64 - _BITS)).astype(np.int64)
            where = np.flatnonzero((self.bitmap[top >> 3] >> (top & 7)) & 1)  # cheap pre-filter
            if not len(where):
                continue
            pos = np.searchsorted(self.hashes, g[where])
            pos[pos == len(self.hashes)] = 0
            for j in np.flatnonzero(self.hashes[pos] == g[where]):
                at, hi = int(where[j]), int(pos[j])
                if not informative(ws[at:at + k]):
                    continue
                while hi < len(self.hashes) and self.hashes[hi] == g[at]:
                    key = (int(self.task_ids[hi]), int(self.item_ids[hi]))
                    hits.setdefault(key, " ".join(ws[at:at + k]))
                    hi += 1
        return [(self.tasks[t].name, i, gram) for (t, i), gram in sorted(hits.items())]


def informative(gram: Sequence[str]) -> bool:
    """Whether a matched n-gram can show contamination: at least half its words distinct and at
    most half of them numbers. Runs like "0 0 0 ..." or "1 2 3 ... 13" occur in benchmark items
    (MBPP and MATH test cases) and in any code or table, so they prove nothing."""
    return len(set(gram)) * 2 >= len(gram) and sum(w.isdigit() for w in gram) * 2 <= len(gram)


def _with_length(g: np.ndarray, k: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return g * _MULT + np.uint64(k)
