"""WinoGrande with partial scoring (report Table 6: "partial scoring"; Gemma 3 card: 5-shot).

Partial evaluation (Trinh & Le 2018, GPT-3; lm-eval ``winogrande/preprocess_winogrande.py``): the
sentence is cut at ``_``; each option fills the blank to make a *context*, and the shared
*continuation* (the rest of the sentence) is scored after each; the option whose context makes
the continuation more likely wins. The option tokens themselves are never scored.
"""

from .base import MCItem

NAME, KIND, SHOTS, CARD_SHOTS, MAIN = "winogrande", "mc", 0, 5, "acc"
PROTOCOL = ("winogrande_xl validation (1267); partial scoring: contexts sentence[:_]+option1/option2, shared "
            "continuation ' '+sentence[_+1:].strip() scored after each; acc; few-shot examples are whole filled-in "
            "sentences from validation (no train split locally), one fixed seeded set excluding the item")


def load(src):
    docs = src.jsonl("winogrande/validation.jsonl", ("allenai/winogrande", "winogrande_xl", "validation"))
    return docs, docs, True


def partial(doc):
    """(context for option1, context for option2, continuation), as lm-eval builds them."""
    s = doc["sentence"]
    idx = s.index("_")
    return s[:idx] + doc["option1"], s[:idx] + doc["option2"], s[idx + 1:].strip()


def to_mc(doc):
    c1, c2, cont = partial(doc)
    return MCItem(((c1, " " + cont), (c2, " " + cont)), {"1": 0, "2": 1}[str(doc["answer"])], (cont, cont))


def shot_text(doc):
    c1, c2, cont = partial(doc)
    return (c1 if str(doc["answer"]) == "1" else c2) + " " + cont
