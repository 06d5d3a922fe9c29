"""MATH (report Table 6: 4-shot, Minerva protocol): generation, final-answer extraction and
Minerva normalisation (Lewkowycz et al. 2022, appendix D; lm-eval ``minerva_math/utils.py``).

Prompt: the 4 fixed Minerva exemplars ``"Problem:\\n{problem}\\n\\nSolution:\\n{solution}"`` joined by
``"\\n\\n"``, then ``"Problem:\\n{problem}\\n\\nSolution:"``; greedy until ``"Problem:"``. The answer is
``Final Answer: The final answer is (.*?). I hope it is correct.``, normalised; the gold is the
normalised last ``\\boxed{}`` of the solution; exact match of the two normalised strings.
"""

import re

NAME, KIND, SHOTS, MAIN = "math", "gen", 4, "exact_match"
STOP, MAX_TOKENS = ("Problem:",), 512
PROTOCOL = ("MATH test (5000); Minerva 4-shot prompt (minerva_4shot_prompt.jsonl); greedy until 'Problem:'; "
            "'Final Answer: The final answer is X. I hope it is correct.' extracted; Minerva normalize_final_answer; "
            "exact match vs normalised last \\boxed{} of the solution; micro-average over all problems")

SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
                 (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
REMOVED_EXPRESSIONS = [
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
    "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2",
    "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"',
    "\\dots"]
INVALID = "[invalidanswer]"


def load(src):
    docs = src.jsonl("math/test.jsonl", ("EleutherAI/hendrycks_math", None, "test"))
    pool = src.jsonl("math/minerva_4shot_prompt.jsonl") if src.data_dir is not None else []
    return docs, pool, False


def shots_for(doc, pool, k, rng=None):
    return pool[:k]


def prompt(doc, shots):
    block = "".join(f"Problem:\n{s['problem']}\n\nSolution:\n{s['solution']}\n\n" for s in shots)
    return block + f"Problem:\n{doc['problem']}\n\nSolution:"


def last_boxed_only_string(string: str) -> str | None:
    idx = string.rfind("\\boxed")
    if "\\boxed " in string:
        return "\\boxed " + string.split("\\boxed ")[-1].split("$")[0]
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return None
    depth = 0
    for i in range(idx, len(string)):
        if string[i] == "{":
            depth += 1
        elif string[i] == "}":
            depth -= 1
            if depth == 0:
                return string[idx:i + 1]
    return None


def remove_boxed(s: str | None) -> str:
    if s is None:
        return INVALID
    if s.startswith("\\boxed "):
        return s[len("\\boxed "):]
    if s.startswith("\\boxed{") and s.endswith("}"):
        return s[len("\\boxed{"):-1]
    if s.startswith("\\fbox{") and s.endswith("}"):
        return s[len("\\fbox{"):-1]
    return s


def get_unnormalized_answer(text: str) -> str:
    m = re.search(r"Final Answer: The final answer is(.*?). I hope it is correct.", text + "I hope it is correct.")
    return m.group(1).strip() if m else INVALID


def normalize_final_answer(final_answer: str) -> str:
    """Minerva's normaliser, character for character as lm-eval copies it."""
    final_answer = final_answer.split("=")[-1]
    for before, after in SUBSTITUTIONS:
        final_answer = final_answer.replace(before, after)
    for expr in REMOVED_EXPRESSIONS:
        final_answer = final_answer.replace(expr, "")
    final_answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", final_answer)
    final_answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", final_answer)
    final_answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", final_answer)
    final_answer = final_answer.replace("$", "")
    if final_answer.replace(",", "").isdigit():
        final_answer = final_answer.replace(",", "")
    return final_answer


def gold(doc) -> str:
    return normalize_final_answer(remove_boxed(last_boxed_only_string(doc["solution"])))


def extract(text: str) -> str | None:
    raw = get_unnormalized_answer(text)
    return None if raw == INVALID else normalize_final_answer(raw)


def score(doc, text):
    return {"exact_match": float(extract(text) == gold(doc))}


def score_samples(doc, texts):
    from ..metrics import majority_vote

    answers = [extract(t) for t in texts]
    return {"exact_match": float(majority_vote(answers) == gold(doc)),
            "sample_acc": sum(a == gold(doc) for a in answers) / len(texts)}
