"""PIQA (report Table 6, 0-shot): physical commonsense, two solutions, by log-likelihood.

lm-eval ``piqa/piqa.yaml``: ``"Question: {goal}\\nAnswer:"``, choices ``[sol1, sol2]``, target
``label``. Metrics: acc and acc_norm.
"""

from .base import MCItem

NAME, KIND, SHOTS, MAIN = "piqa", "mc", 0, "acc"
PROTOCOL = ("piqa validation (1838); prompt 'Question: {goal}\\nAnswer:'; choices ' '+sol1/sol2 by log-likelihood; "
            "acc and acc_norm (per character)")


def load(src):
    docs = src.jsonl("piqa/validation.jsonl", ("ybisk/piqa", None, "validation"))
    return docs, docs, True


def to_mc(doc):
    return MCItem.simple(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def shot_text(doc):
    return f"Question: {doc['goal']}\nAnswer: {[doc['sol1'], doc['sol2']][int(doc['label'])]}"
