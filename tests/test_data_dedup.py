"""Deduplication (opengemma.data.dedup): planted near-duplicates (edited copies at Jaccard >= 0.8
on 5-word shingles) are found by datatrove's MinHash LSH blocks with recall >= 0.95 and <= 1%
false positives among distinct documents; exact duplicates are found by the sorted-hash merge."""

from __future__ import annotations

import random
import re

import numpy as np

from opengemma.data import dedup


def _shingles(text: str, n: int = 5) -> set:
    ws = re.sub(r"[^\w\s]", "", text.lower()).split()
    return {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def _jaccard(a: str, b: str) -> float:
    sa, sb = _shingles(a), _shingles(b)
    return len(sa & sb) / len(sa | sb)


def _word(rng: random.Random) -> str:
    # letters only: datatrove's text normalisation maps every digit to 0
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))


def _corpus(rng: random.Random, n: int, words: int = 150) -> list[str]:
    vocab = [_word(rng) for _ in range(3000)]
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


def _edited(rng: random.Random, text: str, lo: float = 0.8, hi: float = 0.9) -> str:
    """A copy with substituted words until its Jaccard similarity falls in [lo, hi)."""
    ws = text.split()
    while True:
        copy = list(ws)
        for _ in range(rng.randint(1, 4)):
            copy[rng.randrange(len(copy))] = _word(rng)
        if lo <= _jaccard(text, " ".join(copy)) < hi:
            return " ".join(copy)


def test_planted_near_duplicates_recall_and_false_positives(tmp_path):
    rng = random.Random(0)
    distinct = _corpus(rng, 400)
    planted = [_edited(rng, distinct[i]) for i in range(100)]
    assert all(0.8 <= _jaccard(distinct[i], planted[i]) < 0.9 for i in range(100))
    removed = set(dedup.near_duplicates(distinct + planted, tmp_path))
    found = sum((400 + i) in removed or i in removed for i in range(100))
    false = sum(i in removed for i in range(100, 400))  # originals with no planted copy
    assert found / 100 >= 0.95
    assert false / 300 <= 0.01


def test_lsh_curve_matches_the_configuration():
    assert dedup.candidate_probability(0.8, 20, 7) > 0.98
    assert dedup.candidate_probability(0.4, 20, 7) < 0.05


def test_exact_duplicates_across_tasks(tmp_path):
    a, b, c = "same text", "other text", "third"
    dedup.write_hashes(tmp_path / "h0.npy", [dedup.content_hash(t) for t in (a, b, a)])
    dedup.write_hashes(tmp_path / "h1.npy", [dedup.content_hash(t) for t in (c, b + "  \n", a)])
    assert dedup.find_exact([tmp_path / "h0.npy", tmp_path / "h1.npy"], tmp_path / "out") == 3
    # the first copy (task 0, index 0 for a; task 0, index 1 for b) stays; all later copies go
    assert dedup.load_exact(tmp_path / "out", 0) == {2}
    assert dedup.load_exact(tmp_path / "out", 1) == {1, 2}
    assert np.load(tmp_path / "out" / "00001.npy").dtype == np.uint32
