"""HellaSwag (report Table 6: 0-shot; Gemma 3 card: 10-shot): sentence completion over 4 endings.

lm-eval ``hellaswag/utils.py``: query ``preprocess(activity_label + ": " + ctx_a + " " +
ctx_b.capitalize())``, choices ``preprocess(ending)``; acc_norm is the number usually quoted.
"""

import re

from .base import MCItem

NAME, KIND, SHOTS, CARD_SHOTS, MAIN = "hellaswag", "mc", 0, 10, "acc_norm"
PROTOCOL = ("hellaswag validation (10042); lm-eval preprocessing; query 'activity: ctx_a Ctx_b', 4 endings by "
            "log-likelihood; acc_norm (per character) quoted; few-shot examples from validation (no train split "
            "locally), one fixed seeded set excluding the item")


def preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def load(src):
    docs = src.jsonl("hellaswag/validation.jsonl", ("Rowan/hellaswag", None, "validation"))
    return docs, docs, True


def _query(doc):
    return preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())


def to_mc(doc):
    return MCItem.simple(_query(doc), [preprocess(e) for e in doc["endings"]], int(doc["label"]))


def shot_text(doc):
    return _query(doc) + " " + preprocess(doc["endings"][int(doc["label"])])
