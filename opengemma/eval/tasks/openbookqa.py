"""OpenBookQA (report Table 6): elementary science with an open book, by log-likelihood.

lm-eval ``openbookqa/openbookqa.yaml``: the bare ``question_stem`` as the prompt, choices
``choices.text``, target ``choices.label.index(answerKey)``; acc_norm usually quoted.
"""

from .base import MCItem

NAME, KIND, SHOTS, MAIN = "openbookqa", "mc", 0, "acc_norm"
PROTOCOL = ("openbookqa main test (500); prompt = question_stem; answer texts by log-likelihood; acc and "
            "acc_norm; few-shot examples from validation")


def load(src):
    docs = src.jsonl("openbookqa/test.jsonl", ("allenai/openbookqa", "main", "test"))
    pool = src.jsonl("openbookqa/validation.jsonl", ("allenai/openbookqa", "main", "validation"))
    return docs, pool, False


def _gold(doc):
    return doc["choices"]["label"].index(doc["answerKey"].strip())


def to_mc(doc):
    return MCItem.simple(doc["question_stem"], doc["choices"]["text"], _gold(doc))


def shot_text(doc):
    return f"{doc['question_stem']} {doc['choices']['text'][_gold(doc)]}"
