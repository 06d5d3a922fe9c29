"""AGIEval English (report Table 6: "3-5-shot"): the English multiple-choice exams, by log-likelihood.

Records are AGIEval v1 (``passage``, ``question``, ``options``, ``label``). The query follows
lm-eval's ``hails/agieval`` format (``"Q: {passage} {question} Answer Choices: (A)... (B)...\\nA: Among A
through E, the answer is"``) and the choices are the option strings, scored as ``" " + option``;
acc and acc_norm micro-averaged over the English tasks (``weight_by_size``). The cloze ``math``
task is not included (it needs generation and AGIEval's math equivalence). Shots default to 0
(lm-eval); ``--shots k`` prepends k solved items of the same exam (fixed seeded set, item
excluded) instead of the official token-budgeted demonstrations.
"""

from .base import MCItem, fixed_shots

NAME, KIND, SHOTS, MAIN = "agieval", "mc", 0, "acc"
ENGLISH = ("aqua-rat", "gaokao-english", "logiqa-en", "lsat-ar", "lsat-lr", "lsat-rc", "sat-en-without-passage",
           "sat-en", "sat-math")
PROTOCOL = ("AGIEval v1 English multiple choice (aqua-rat, gaokao-english, logiqa-en, lsat-ar/lr/rc, sat-en, "
            "sat-en-without-passage, sat-math); query 'Q: passage question Answer Choices: ...\\nA: Among A through X, "
            "the answer is'; options by log-likelihood; acc micro-averaged; 0-shot as lm-eval (math cloze excluded)")


def load(src):
    docs = []
    for task in ENGLISH:
        for d in src.jsonl(f"agieval/{task}.jsonl", (f"hails/agieval-{task}", None, "test")):
            if d.get("options") and d.get("label"):
                docs.append(dict(d, _task=task))
    return docs, docs, True


def shots_for(doc, pool, k, rng=None):
    return fixed_shots(doc, [d for d in pool if d["_task"] == doc["_task"]], k)


def _letters(doc):
    return [o[1] if o.startswith("(") else chr(ord("A") + i) for i, o in enumerate(doc["options"])]


def _context(doc):
    passage = (doc.get("passage") or "").strip()
    q = f"{passage} {doc['question']}".strip()
    letters = _letters(doc)
    return f"Q: {q} Answer Choices: {' '.join(doc['options'])}\nA: Among A through {letters[-1]}, the answer is"


def _gold(doc):
    label = doc["label"] if isinstance(doc["label"], str) else doc["label"][0]
    return _letters(doc).index(label.strip())


def to_mc(doc):
    return MCItem.simple(_context(doc), doc["options"], _gold(doc))


def shot_text(doc):
    return _context(doc) + " " + doc["options"][_gold(doc)]
