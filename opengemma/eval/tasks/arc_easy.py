"""ARC-Easy (report Table 6; Gemma 3 card: 0-shot): grade-school science, by log-likelihood of each
answer text. lm-eval ``arc/arc_easy.yaml``: ``"Question: {question}\\nAnswer:"``, choices
``choices.text``, target ``choices.label.index(answerKey)``; acc and acc_norm.
"""

from .base import MCItem

NAME, KIND, SHOTS, MAIN = "arc_easy", "mc", 0, "acc_norm"
FOLDER, HUB = "arc_easy", ("allenai/ai2_arc", "ARC-Easy")
PROTOCOL = ("arc_easy test (2376); prompt 'Question: {question}\\nAnswer:'; answer texts by log-likelihood; "
            "acc and acc_norm (per character); few-shot examples from the validation split")


def load(src):
    docs = src.jsonl(f"{FOLDER}/test.jsonl", HUB + ("test",))
    pool = src.jsonl(f"{FOLDER}/validation.jsonl", HUB + ("validation",))
    return docs, pool, False


def gold(doc):
    return doc["choices"]["label"].index(doc["answerKey"].strip())


def to_mc(doc):
    return MCItem.simple(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"], gold(doc))


def shot_text(doc):
    return f"Question: {doc['question']}\nAnswer: {doc['choices']['text'][gold(doc)]}"
