"""MMLU (report Table 6: 5-shot, top-1): 57 subjects, letter answers by log-likelihood.

lm-eval ``mmlu/default``: description ``"The following are multiple choice questions (with
answers) about <subject>.\\n\\n"``, the 5 ``dev`` items of the same subject in order (first_n),
prompt ``"{question.strip()}\\nA. ..\\nD. ..\\nAnswer:"``, choices ``" A"``..``" D"``; acc,
micro-averaged over the 14,042 questions.
"""

from .base import MCItem

NAME, KIND, SHOTS, MAIN = "mmlu", "mc", 5, "acc"
LETTERS = ["A", "B", "C", "D"]
PROTOCOL = ("mmlu test (14042); per-subject description + the subject's first k dev items; letter choices "
            "' A'..' D' by log-likelihood; acc micro-averaged over questions")


def load(src):
    docs = src.jsonl("mmlu/test.jsonl", ("cais/mmlu", "all", "test"))
    pool = src.jsonl("mmlu/dev.jsonl", ("cais/mmlu", "all", "dev"))
    return docs, pool, False


def description(doc):
    return f"The following are multiple choice questions (with answers) about {doc['subject'].replace('_', ' ')}.\n\n"


def shots_for(doc, pool, k, rng=None):
    return [d for d in pool if d["subject"] == doc["subject"]][:k]


def _context(doc):
    lines = [doc["question"].strip()] + [f"{L}. {c}" for L, c in zip(LETTERS, doc["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def to_mc(doc):
    return MCItem.simple(_context(doc), LETTERS, int(doc["answer"]))


def shot_text(doc):
    return _context(doc) + " " + LETTERS[int(doc["answer"])]
