"""TruthfulQA MC2 (report Table 8 "TruthfulQA": "we use MC2"; the H6 suite's TruthfulQA, 0-shot):
the normalised probability mass the model puts on the true answers.

lm-eval ``truthfulqa_mc2``: same prompt as MC1 (the 6-example primer), the ``mc2_targets`` answers
(several true, several false) each scored by summed log-likelihood; per item
``sum(p(true)) / sum(p(all))`` with ``p = exp(loglik)``; the mean over the 817 questions.
"""

from . import truthfulqa_mc1
from .. import metrics
from .base import MCItem
from .truthfulqa_mc1 import HUB, RELPATH, context, decontam_texts, description, load, shot_text  # noqa: F401

NAME, KIND, SHOTS, MAIN = "truthfulqa_mc2", "mc", 0, "mc2"
PROTOCOL = ("truthfulqa hf_pinned_013686a (817); the paper's 6-example QA primer + '\\n\\nQ: {question}\\nA:', "
            "mc2 answers ' {answer}' by summed log-likelihood; mc2 = probability mass on the true answers "
            "normalised over all answers (exp of log-likelihoods), mean over questions; higher is better")


def to_mc(doc):
    answers, labels = truthfulqa_mc1.targets(doc, "mc2_targets")
    return MCItem.simple(context(doc), answers, labels.index(1))


def aggregate(docs, items, results):
    """mc2 per item from its answers' log-likelihoods -> (metrics, details)."""
    masses = [metrics.mc2_mass([ll for ll, _ in res], truthfulqa_mc1.targets(doc, "mc2_targets")[1])
              for doc, res in zip(docs, results)]
    mean, se = metrics.mean_stderr(masses)
    return {"mc2": mean, "mc2_stderr": se}, {}
