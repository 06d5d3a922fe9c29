"""Natural Questions open (report Table 6: 5-shot): closed-book QA by generation and exact match.

lm-eval ``nq_open/nq_open.yaml``: description ``"Answer these questions:\\n\\n"``, ``"Q: {question}?\\nA:"``,
few-shot delimiter ``"\\n"``, greedy until ``\\n`` ``.`` ``,``; exact match against any answer, ignoring
case, punctuation and articles.
"""

from .. import metrics

NAME, KIND, SHOTS, MAIN = "natural_questions", "gen", 5, "exact_match"
STOP, MAX_TOKENS = ("\n", ".", ","), 32
ARTICLES = (r"\b(?:The |the |An |A |The |a |an )",)
PROTOCOL = ("nq_open dev (3610); 'Answer these questions:\\n\\n' + 5 shots 'Q: q?\\nA: a' joined by '\\n' (fixed "
            "seeded set from dev, item excluded) + 'Q: {question}?\\nA:'; greedy until '\\n' '.' ','; exact match vs "
            "any answer, case, punctuation and articles ignored")


def load(src):
    docs = src.jsonl("natural_questions/NQ-open.dev.jsonl", ("google-research-datasets/nq_open", None, "validation"))
    return docs, docs, True


def prompt(doc, shots):
    block = "".join(f"Q: {s['question']}?\nA: {s['answer'][0]}\n" for s in shots)
    return "Answer these questions:\n\n" + block + f"Q: {doc['question']}?\nA:"


def score(doc, text):
    return {"exact_match": metrics.exact_match_any(text.strip(), doc["answer"], regexes_to_ignore=ARTICLES),
            "f1": metrics.max_f1(text, doc["answer"])}
