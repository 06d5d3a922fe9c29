"""The offline text classifiers that score generated continuations for the safety benchmarks
(report Table 8: RealToxicityPrompts, ToxiGen, BOLD).

Nothing here reaches the network: the Perspective API and hub classifiers the published numbers
use are out of reach, so

* toxicity is the project's offline scorer :mod:`opengemma.data.toxicity` (``NAME`` and
  ``score(texts) -> list[float]`` in [0, 1]; a linear model that ships inside the
  ``alt-profanity-check`` wheel); its scores are *not* Perspective scores and every result names it;
* sentiment is VADER (Hutto & Gilbert 2014; ``vaderSentiment``, lexicon inside the wheel), the
  sentiment model of the BOLD paper: the compound score in [-1, 1].

Each getter returns ``(name, score_fn)`` or raises one clear :class:`OpenGemmaError` naming the
missing package and how to install it, so the runner can skip that task and run the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from ..errors import OpenGemmaError

Scorer = Callable[[Sequence[str]], list[float]]
VADER_NAME = "vader-3.3 compound (offline lexicon; BOLD paper's sentiment model)"


def toxicity() -> tuple[str, Scorer]:
    """(name, score) of the offline toxicity scorer; a clear error when it cannot be used."""
    try:
        mod = importlib.import_module("opengemma.data.toxicity")
    except ImportError as e:
        raise _unavailable(e) from None
    except OpenGemmaError as e:
        raise OpenGemmaError(f"offline toxicity scorer unavailable: {e}") from None

    def score(texts: Sequence[str]) -> list[float]:
        try:
            out = [float(x) for x in mod.score(list(texts))]
        except ImportError as e:  # the module may import its classifier lazily
            raise _unavailable(e) from None
        if len(out) != len(texts):
            raise OpenGemmaError(f"toxicity scorer {mod.NAME} returned {len(out)} scores for {len(texts)} texts")
        return out

    try:
        score(["probe"])  # loads the classifier now: a missing package fails before any generation
    except OpenGemmaError as e:
        raise OpenGemmaError(f"offline toxicity scorer unavailable: {e}") from None
    return f"{mod.NAME} (offline; not Perspective API)", score


def _unavailable(e: ImportError) -> OpenGemmaError:
    missing = getattr(e, "name", None) or str(e)
    if missing.startswith("opengemma"):  # this install predates the scorer module
        return OpenGemmaError(f"offline toxicity scorer unavailable: {missing} is missing from this opengemma "
                              "install (update opengemma)")
    return OpenGemmaError(f"offline toxicity scorer unavailable ({missing} is not installed): "
                          "pip install 'opengemma[eval]' (alt-profanity-check)")


def sentiment() -> tuple[str, Scorer]:
    """(name, score) of VADER's compound sentiment; a clear error when the package is missing."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise OpenGemmaError("BOLD needs the VADER sentiment lexicon: pip install vaderSentiment "
                             "(or pip install 'opengemma[eval]')") from None
    analyzer = SentimentIntensityAnalyzer()
    return VADER_NAME, lambda texts: [float(analyzer.polarity_scores(t)["compound"]) for t in texts]
