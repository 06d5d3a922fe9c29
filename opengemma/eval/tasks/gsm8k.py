"""GSM8K (report Table 6: maj@1, 8-shot chain of thought) with answer extraction.

lm-eval ``gsm8k/gsm8k-cot.yaml``: the 8 Wei et al. (2022) exemplars ``"Q: ...\\nA: ... The answer is N."``,
greedy until ``"Q:"``; ``strict-match`` regex ``The answer is (\\-?[0-9\\.\\,]+).`` and
``flexible-extract`` (last number); compared with ``answer.split('####')[-1]`` after removing ``,``
``$`` and a final ``.``. maj@k: majority vote over k sampled chains (``--samples k``).
"""

import re

from .. import metrics

NAME, KIND, SHOTS, MAIN = "gsm8k", "gen", 8, "exact_match"
STOP, MAX_TOKENS = ("Q:", "</s>", "<|im_end|>"), 256
PROTOCOL = ("gsm8k test (1319); 8-shot CoT (Wei et al. exemplars, lm-eval gsm8k-cot) 'Q: {question}\\nA:' joined by "
            "'\\n\\n'; greedy until 'Q:'; strict-match 'The answer is N.' (exact_match) and flexible-extract "
            "(last number); maj@1 = greedy; maj@k = majority of k samples at T=0.2")

EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there "
     "will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been "
     "21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they "
     "had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason "
     "give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The "
     "answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The "
     "answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls "
     "did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he "
     "had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]
STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def load(src):
    docs = src.jsonl("gsm8k/test.jsonl", ("openai/gsm8k", "main", "test"))
    return docs, [{"question": q, "target": a} for q, a in EXEMPLARS], False


def shots_for(doc, pool, k, rng=None):
    return pool[:k]


def prompt(doc, shots):
    return "".join(f"Q: {s['question']}\nA: {s['target']}\n\n" for s in shots) + f"Q: {doc['question']}\nA:"


def clean(text: str | None) -> str | None:
    """lm-eval's regexes_to_ignore for gsm8k: ',', '$', everything up to '#### ', a final '.'."""
    if text is None:
        return None
    text = re.sub(r"(?s).*#### ", "", text)
    text = text.replace(",", "").replace("$", "")
    return re.sub(r"\.$", "", text.strip()).strip()


def extract_strict(text: str) -> str | None:
    m = STRICT.search(text)
    return clean(m.group(1)) if m else None


def extract_flexible(text: str) -> str | None:
    found = FLEXIBLE.findall(text)
    if not found:
        return None
    last = found[-1]
    return clean(last[0] or last[1])


def gold(doc) -> str:
    return clean(doc["answer"].split("####")[-1].strip())


def score(doc, text):
    g = gold(doc)
    return {"exact_match": float(extract_strict(text) == g), "flexible_extract": float(extract_flexible(text) == g)}


def score_samples(doc, texts):
    """maj@k over the samples (strict and flexible extraction), and the mean single-sample accuracy."""
    g = gold(doc)
    strict = [extract_strict(t) for t in texts]
    flex = [extract_flexible(t) for t in texts]
    return {"exact_match": float(metrics.majority_vote(strict) == g),
            "flexible_extract": float(metrics.majority_vote(flex) == g),
            "sample_acc": sum(a == g for a in strict) / len(texts)}
