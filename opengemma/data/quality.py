"""Model-based quality classifier (report "Filtering": model-based classifiers for quality; the
recipe of GPT-3, Brown et al. 2020, appendix A, and DCLM, Li et al. 2024: a linear model that
separates curated text from raw web text, whose score then filters the web).

Model: word 1-2-grams hashed into 2**20 features (scikit-learn's stateless ``HashingVectorizer``,
so nothing but the weights is stored), sub-linear term frequencies and an L2-normalised vector,
then logistic regression with balanced class weights. Documents are cut into windows of about
``window`` words so long books and short web pages weigh alike; a document's score is the mean
probability of "curated" over its windows.

The split is deterministic and by document: a document (all its windows) is held out when the
xxh3 hash of its text falls in the held-out fraction, so the same inputs always give the same
split and the same model. The model is saved as ``.npz`` (weights) + ``.json`` (settings and
held-out precision/recall), with no pickle, so loading a model file runs no code.

    opengemma data quality-train --positive wiki.txt books.jsonl --negative c4.jsonl --output quality.npz
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..errors import OpenGemmaError

N_FEATURES = 2**20
_WORDS = re.compile(r"\S+")


def windows(text: str, size: int) -> list[str]:
    """``text`` as consecutive windows of ``size`` whitespace-separated words (the last may be shorter;
    one window for a short text)."""
    ws = _WORDS.findall(text)
    if len(ws) <= size:
        return [" ".join(ws)]
    return [" ".join(ws[i:i + size]) for i in range(0, len(ws), size) if len(ws[i:i + size]) >= size // 4]


def _vectorizer():
    try:
        from sklearn.feature_extraction.text import HashingVectorizer
    except ImportError:
        raise OpenGemmaError("the quality classifier needs scikit-learn: pip install 'opengemma[data]'") from None
    # alternate_sign off + sublinear-tf-like binary=False; norm l2 (what the saved weights expect)
    return HashingVectorizer(n_features=N_FEATURES, ngram_range=(1, 2), alternate_sign=False, norm="l2",
                             lowercase=True, token_pattern=r"(?u)\b\w+\b")


def _heldout(text: str, fraction: float) -> bool:
    import xxhash

    return xxhash.xxh3_64_intdigest(text.encode("utf-8")) % 10_000 < fraction * 10_000


class QualityModel:
    """A trained classifier: ``score(texts)`` -> probability that each text is curated-like."""

    def __init__(self, coef: np.ndarray, intercept: float, window: int, info: dict | None = None):
        self.coef = np.asarray(coef, dtype=np.float64)  # [N_FEATURES]
        self.intercept = float(intercept)
        self.window = int(window)
        self.info = info or {}
        self._vec = _vectorizer()

    def score_windows(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.empty(0)
        x = self._vec.transform(texts)  # sparse [n, N_FEATURES]
        z = x @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def score(self, texts: Sequence[str]) -> list[float]:
        """Per document, the mean curated-probability of its windows."""
        pieces, owner = [], []
        for i, t in enumerate(texts):
            w = windows(t, self.window)
            pieces += w
            owner += [i] * len(w)
        probs = self.score_windows(pieces)
        sums = np.bincount(np.asarray(owner, dtype=np.int64), weights=probs, minlength=len(texts))
        counts = np.bincount(np.asarray(owner, dtype=np.int64), minlength=len(texts))
        return (sums / np.maximum(counts, 1)).tolist()

    # -- files
    def save(self, path: str | Path) -> Path:
        from .shards import _json_bytes, write_atomic

        path = Path(path).with_suffix(".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        import io

        buf = io.BytesIO()
        nz = np.flatnonzero(self.coef)
        np.savez_compressed(buf, index=nz.astype(np.int64), value=self.coef[nz].astype(np.float32))
        write_atomic(path, buf.getvalue())
        meta = {"format": "opengemma-quality", "version": 1, "n_features": N_FEATURES, "intercept": self.intercept,
                "window": self.window, **self.info}
        write_atomic(path.with_suffix(".json"), _json_bytes(meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> QualityModel:
        path = Path(path).with_suffix(".npz")
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            raise OpenGemmaError(f"quality model {path}: no such model (needs {path.name} and {meta_path.name}; "
                                 "train one with `opengemma data quality-train`)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            with np.load(path, allow_pickle=False) as z:
                index, value = z["index"], z["value"]
        except (OSError, ValueError, KeyError) as e:
            raise OpenGemmaError(f"quality model {path}: unreadable ({e})") from None
        if meta.get("format") != "opengemma-quality" or meta.get("n_features") != N_FEATURES:
            raise OpenGemmaError(f"quality model {path}: not an opengemma quality model of this version")
        coef = np.zeros(N_FEATURES)
        coef[index] = value
        info = {k: v for k, v in meta.items() if k not in ("format", "version", "n_features", "intercept", "window")}
        return cls(coef, meta["intercept"], meta["window"], info)


def train(positive: Iterable[str], negative: Iterable[str], *, window: int = 128, heldout: float = 0.1,
          c: float = 4.0, max_windows: int = 200_000) -> QualityModel:
    """Fit curated (``positive``) against web (``negative``) documents; held-out precision, recall
    and F1 of the "curated" class at 0.5, and the held-out rate of web windows scored curated,
    go into ``model.info``."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise OpenGemmaError("the quality classifier needs scikit-learn: pip install 'opengemma[data]'") from None
    split = {"train": ([], []), "test": ([], [])}
    counts = {"positive_docs": 0, "negative_docs": 0}
    for label, docs in ((1, positive), (0, negative)):
        for doc in docs:
            counts["positive_docs" if label else "negative_docs"] += 1
            # split by document, so no held-out window has a sibling from the same text in training
            xs, ys = split["test" if _heldout(doc, heldout) else "train"]
            for w in windows(doc, window):
                if not w:
                    continue
                if len(xs) < max_windows:
                    xs.append(w)
                    ys.append(label)
    (xtr, ytr), (xte, yte) = split["train"], split["test"]
    for name, ys in (("training", ytr), ("held-out", yte)):
        if len(set(ys)) < 2:
            raise OpenGemmaError(f"quality-train: the {name} split needs both curated and web text "
                                 f"({sum(ys)} curated, {len(ys) - sum(ys)} web windows); give more input")
    vec = _vectorizer()
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
    clf.fit(vec.transform(xtr), ytr)
    model = QualityModel(clf.coef_[0], clf.intercept_[0], window)
    pred = model.score_windows(xte) >= 0.5
    y = np.asarray(yte, dtype=bool)
    tp = int((pred & y).sum())
    precision = tp / max(int(pred.sum()), 1)
    recall = tp / max(int(y.sum()), 1)
    model.info = {**counts, "train_windows": len(xtr), "heldout_windows": len(xte), "heldout_fraction": heldout,
                  "heldout_precision": precision, "heldout_recall": recall,
                  "heldout_f1": 2 * precision * recall / max(precision + recall, 1e-12),
                  "heldout_accuracy": float((pred == y).mean()), "C": c}
    return model
