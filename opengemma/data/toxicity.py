"""The project's offline toxicity scorer: one name, one function.

``score(texts) -> list[float]`` gives each text a probability in [0, 1] that it is offensive or
profane. The model is the linear SVM (calibrated, bag of 1-2-gram TF-IDF features) that ships
inside the ``alt-profanity-check`` wheel (module ``profanity_check``): it needs no network and no
download, and scores ~10k short texts per second on one core. It is *not* the Perspective API that
the Gemma report uses, and it measures profanity/insults more than subtler toxicity; every
number it produces is labelled with :data:`NAME`.

Used by the data pipeline's safety filter (:mod:`opengemma.data.pipeline`, per document through
:func:`score_document`) and by the safety evaluation (:mod:`opengemma.eval.classifiers`).
The classifier is loaded on first use, not on import.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from ..errors import OpenGemmaError

NAME = "alt-profanity-check 1.x linear SVM"
_INSTALL = "pip install alt-profanity-check (or pip install 'opengemma[data]')"
_WINDOW_WORDS = 64  # words per window when scoring a long document (see score_document)
_WORD = re.compile(r"\S+")


@functools.lru_cache(maxsize=1)
def _predict_prob():
    try:
        import warnings

        with warnings.catch_warnings():
            # the pickled model was fitted with an older scikit-learn; its linear weights load fine
            warnings.simplefilter("ignore")
            from profanity_check import predict_prob
    except ImportError as e:
        raise OpenGemmaError(f"the offline toxicity scorer needs alt-profanity-check ({e.name or e} is not "
                             f"installed): {_INSTALL}") from None
    return predict_prob


def available() -> bool:
    """Whether :func:`score` can run (the classifier package is installed)."""
    try:
        _predict_prob()
    except OpenGemmaError:
        return False
    return True


def score(texts: Sequence[str]) -> list[float]:
    """Probability in [0, 1] that each text is offensive, one float per text, in order."""
    texts = list(texts)
    if not texts:
        return []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise OpenGemmaError(f"toxicity score: text {i} is {type(t).__name__}, not str")
    return [float(p) for p in _predict_prob()(texts)]


def windows(text: str, words: int = _WINDOW_WORDS) -> list[str]:
    """``text`` cut into consecutive windows of ``words`` whitespace-separated words (at least one)."""
    toks = _WORD.findall(text)
    if not toks:
        return [""]
    return [" ".join(toks[i:i + words]) for i in range(0, len(toks), words)]


def score_document(texts: Sequence[str], words: int = _WINDOW_WORDS) -> list[float]:
    """Per document, the highest window score: a bag-of-words model dilutes one abusive
    paragraph in a long page, so a document is as toxic as its worst ``words``-word window."""
    pieces: list[str] = []
    owner: list[int] = []
    for i, t in enumerate(texts):
        w = windows(t, words)
        pieces += w
        owner += [i] * len(w)
    best = [0.0] * len(texts)
    for i, p in zip(owner, score(pieces)):
        best[i] = max(best[i], p)
    return best
