"""MBPP (report Table 6: 3-shot): write a Python function from a description and three asserts.

lm-eval ``mbpp/mbpp.yaml``: ``"You are an expert Python programmer, and here is your task: {text} Your
code should pass these tests:\\n\\n{tests}\\n[BEGIN]\\n"``, few-shot targets ``"{code}\\n[DONE]"`` (task
ids 2, 3, 4), greedy until ``[DONE]``; pass@1 by running ``test_setup_code`` and the three
``test_list`` asserts in the sandbox.
"""

from .. import metrics
from ..sandbox import check_program

NAME, KIND, SHOTS, MAIN = "mbpp", "gen", 3, "pass@1"
STOP, MAX_TOKENS = ("[DONE]",), 512
TIMEOUT = 10.0
FEWSHOT_DELIMITER = "\n"
PROTOCOL = ("MBPP full test (task 11-510, 500); original MBPP prompt with 3 tests, 3 shots = task ids 2,3,4 with "
            "'{code}\\n[DONE]'; greedy until [DONE]; test_setup_code + test_list asserts in a sandboxed process "
            "(10 s); pass@1")


def load(src):
    docs = src.jsonl("mbpp/test.jsonl", ("google-research-datasets/mbpp", "full", "test"))
    pool = src.jsonl("mbpp/prompt_task_2_3_4.jsonl") if src.data_dir is not None else []
    return docs, pool, False


def shots_for(doc, pool, k, rng=None):
    return pool[:k]


def _question(doc):
    tests = "\n".join(doc["test_list"][:3])
    return (f"You are an expert Python programmer, and here is your task: {doc['text']} Your code should pass "
            f"these tests:\n\n{tests}\n[BEGIN]\n")


def prompt(doc, shots):
    return "".join(_question(s) + s["code"] + "\n[DONE]" + FEWSHOT_DELIMITER for s in shots) + _question(doc)


def passes(doc, completion: str) -> bool:
    test = (doc.get("test_setup_code") or "") + "\n" + "\n".join(doc["test_list"])
    return check_program(completion, test, timeout=TIMEOUT).passed


def score(doc, text):
    return {"pass@1": float(passes(doc, text))}


def score_samples(doc, texts):
    c = sum(passes(doc, t) for t in texts)
    return {"pass@1": metrics.pass_at_k(len(texts), c, 1)}
