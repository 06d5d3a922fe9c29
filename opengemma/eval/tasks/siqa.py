"""SIQA (report Table 6, 0-shot): social commonsense, three answers, by log-likelihood.

lm-eval ``siqa/siqa.yaml``: ``"Q: {context} {question}\\nA:"``, choices ``[answerA, answerB,
answerC]``, target ``label - 1`` (1-based label). Metric: acc (acc_norm also reported).
"""

from .base import MCItem

NAME, KIND, SHOTS, MAIN = "siqa", "mc", 0, "acc"
PROTOCOL = ("siqa validation (1954); prompt 'Q: {context} {question}\\nA:'; choices ' '+answerA/B/C by "
            "log-likelihood; gold label-1; acc")


def load(src):
    docs = src.jsonl("siqa/validation.jsonl", ("allenai/social_i_qa", None, "validation"))
    return docs, docs, True


def _choices(doc):
    return [doc["answerA"], doc["answerB"], doc["answerC"]]


def to_mc(doc):
    return MCItem.simple(f"Q: {doc['context']} {doc['question']}\nA:", _choices(doc), int(doc["label"]) - 1)


def shot_text(doc):
    return f"Q: {doc['context']} {doc['question']}\nA: {_choices(doc)[int(doc['label']) - 1]}"
