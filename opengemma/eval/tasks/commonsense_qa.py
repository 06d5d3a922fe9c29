"""CommonsenseQA (report Table 6: 7-shot), letter multiple choice by log-likelihood.

lm-eval ``commonsense_qa/default.yaml`` format: ``"Question: {question}\\nA. ...\\nE. ...\\nAnswer:"``,
choices ``A``-``E``, target ``answerKey``. The report's 7-shot prompt is unpublished; here the 7
examples are one fixed seeded set from validation (the test labels are hidden and no train split
is local), excluding the item, in the same letter format.
"""

from .base import MCItem

NAME, KIND, SHOTS, MAIN = "commonsense_qa", "mc", 7, "acc"
LETTERS = ["A", "B", "C", "D", "E"]
PROTOCOL = ("commonsense_qa validation (1221); lm-eval letter format 'Question: q\\nA. ..\\nE. ..\\nAnswer:', "
            "choices ' A'..' E' by log-likelihood; acc; 7 shots from validation (fixed seeded set, item excluded)")


def load(src):
    docs = src.jsonl("commonsense_qa/validation.jsonl", ("tau/commonsense_qa", None, "validation"))
    return docs, docs, True


def _context(doc):
    lines = [f"Question: {doc['question'].strip()}"]
    lines += [f"{lab}. {text}" for lab, text in zip(doc["choices"]["label"], doc["choices"]["text"])]
    return "\n".join(lines) + "\nAnswer:"


def to_mc(doc):
    return MCItem.simple(_context(doc), LETTERS, LETTERS.index(doc["answerKey"].strip()))


def shot_text(doc):
    return _context(doc) + " " + doc["answerKey"].strip()
