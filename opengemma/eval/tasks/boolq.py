"""BoolQ (report Table 6, 0-shot): yes/no questions about a passage, by log-likelihood.

lm-eval ``super_glue/boolq/default.yaml``: ``"{passage}\\nQuestion: {question}?\\nAnswer:"``,
choices ``["no", "yes"]``, target ``label``; the local copy has the HF ``boolq`` field ``answer``
(bool), so ``label = int(answer)``. Metric: acc.
"""

from .base import MCItem

NAME, KIND, SHOTS, MAIN = "boolq", "mc", 0, "acc"
PROTOCOL = ("boolq validation (3270); prompt '{passage}\\nQuestion: {question}?\\nAnswer:'; choices ' no'/' yes' "
            "by log-likelihood; acc; few-shot examples (if any) from validation, excluding the item")


def load(src):
    docs = src.jsonl("boolq/validation.jsonl", ("google/boolq", None, "validation"))
    return docs, docs, True


def _context(doc):
    return f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"


def to_mc(doc):
    return MCItem.simple(_context(doc), ["no", "yes"], int(doc["answer"]))


def shot_text(doc):
    return _context(doc) + " " + ["no", "yes"][int(doc["answer"])]
