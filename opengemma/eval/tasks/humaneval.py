"""HumanEval (report Table 6: pass@1): complete a Python function, run its tests in the sandbox.

lm-eval ``humaneval/humaneval.yaml``: the raw ``prompt``, 0-shot, greedy, up to 1024 new tokens, until
``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif``, ``\\nprint``; the program is ``prompt + completion``, the
check ``test + "\\ncheck(entry_point)"``; pass@1 (the unbiased estimator over ``--samples`` n).
"""

from .. import metrics
from ..sandbox import check_program

NAME, KIND, SHOTS, MAIN = "humaneval", "gen", 0, "pass@1"
STOP, MAX_TOKENS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint"), 1024
TIMEOUT = 10.0
PROTOCOL = ("HumanEval (164); raw prompt, 0-shot; greedy until \\nclass \\ndef \\n# \\nif \\nprint (max 1024 tokens); "
            "prompt+completion run with test + check(entry_point) in a sandboxed process (10 s); pass@1 by the "
            "unbiased estimator (n = --samples)")


def load(src):
    docs = src.jsonl("humaneval/HumanEval.jsonl", ("openai/openai_humaneval", None, "test"))
    return docs, [], False


def prompt(doc, shots):
    return doc["prompt"]


def passes(doc, completion: str) -> bool:
    test = doc["test"] + f"\ncheck({doc['entry_point']})\n"
    return check_program(doc["prompt"] + completion, test, timeout=TIMEOUT).passed


def score(doc, text):
    return {"pass@1": float(passes(doc, text))}


def score_samples(doc, texts):
    c = sum(passes(doc, t) for t in texts)
    n = len(texts)
    out = {"pass@1": metrics.pass_at_k(n, c, 1)}
    if n >= 10:
        out["pass@10"] = metrics.pass_at_k(n, c, 10)
    return out
