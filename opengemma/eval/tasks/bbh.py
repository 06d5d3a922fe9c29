"""BIG-Bench Hard (report Table 6): 27 tasks, 3-shot chain of thought, exact match.

lm-eval ``bbh/cot_fewshot``: the task's ``cot-prompts/<task>.txt`` (description + 3 CoT exemplars,
canary header removed) then ``"\\n\\nQ: {input}\\nA: Let's think step by step.\\n"``; greedy until
``</s>``, ``Q``, ``\\n\\n`` (max 1024 tokens); the answer is ``(?<=the answer is )(.*)(?=.)`` (first
match) compared with ``target``; micro-average over the 6,511 items.
"""

import re

NAME, KIND, SHOTS, MAIN = "bbh", "gen", 3, "exact_match"
INLINE_SHOTS = True  # the 3 exemplars live in the CoT prompt file
STOP, MAX_TOKENS = ("</s>", "Q", "\n\n"), 1024
TASKS = ("boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
         "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
         "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
         "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
         "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
         "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
         "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
         "word_sorting")
ANSWER = re.compile(r"(?<=the answer is )(.*)(?=.)")
PROTOCOL = ("BBH test (27 tasks, 6511); cot-prompts/<task>.txt (3 CoT exemplars) + 'Q: {input}\\nA: Let's think step "
            "by step.\\n'; greedy until </s> Q \\n\\n; regex '(?<=the answer is )(.*)(?=.)'; exact match vs target; "
            "micro-average (--shots only 3 is supported: the exemplars are fixed)")


def load(src):
    docs = []
    for task in TASKS:
        header = cot_prompt(src.text(f"bbh/cot-prompts/{task}.txt"))
        docs += [dict(d, _task=task, _cot=header) for d in src.jsonl(f"bbh/{task}.jsonl")]
    return docs, [], False


def cot_prompt(text: str) -> str:
    """The prompt file minus its canary header (everything up to the '-----' line)."""
    return text.split("-----\n", 1)[1] if "-----\n" in text else text


def shots_for(doc, pool, k, rng=None):
    return []  # the exemplars are inlined in the task's CoT prompt


def prompt(doc, shots):
    return doc["_cot"].rstrip("\n") + f"\n\nQ: {doc['input']}\nA: Let's think step by step.\n"


def extract(text: str) -> str | None:
    m = ANSWER.search(text)
    return m.group(1).strip() if m else None


def score(doc, text):
    return {"exact_match": float(extract(text) == doc["target"].strip())}
