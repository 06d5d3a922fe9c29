"""TriviaQA (report Table 6: 5-shot): closed-book QA by greedy generation and exact match.

lm-eval ``triviaqa/default.yaml``: ``"Question: {question}?\\nAnswer:"``, greedy until ``\\n``, ``.``
or ``,``; exact match against any of ``answer.aliases`` ignoring case and punctuation.
"""

from .. import metrics

NAME, KIND, SHOTS, MAIN = "triviaqa", "gen", 5, "exact_match"
STOP, MAX_TOKENS = ("\n", ".", ","), 32
PROTOCOL = ("triviaqa rc.wikipedia.nocontext validation (7993, the Wiki dev subset); 'Question: {question}?\\nAnswer:'"
            "; 5 shots (fixed seeded set from validation, item excluded; target answer.value) joined by '\\n\\n'; "
            "greedy until '\\n' '.' ','; exact match vs any alias, case and punctuation ignored")


def load(src):
    docs = src.jsonl("triviaqa/validation_rc.wikipedia.nocontext.jsonl",
                     ("mandarjoshi/trivia_qa", "rc.wikipedia.nocontext", "validation"))
    return docs, docs, True


def prompt(doc, shots):
    block = "".join(f"Question: {s['question']}?\nAnswer: {s['answer']['value']}\n\n" for s in shots)
    return block + f"Question: {doc['question']}?\nAnswer:"


def score(doc, text):
    golds = list(doc["answer"]["aliases"]) or [doc["answer"]["value"]]
    return {"exact_match": metrics.exact_match_any(text.strip(), golds),
            "f1": metrics.max_f1(text, golds)}
