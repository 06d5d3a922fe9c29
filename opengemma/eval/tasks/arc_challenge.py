"""ARC-Challenge (report Table 6; Gemma 3 card: 25-shot): the hard ARC set, same format as ARC-Easy
(lm-eval ``arc/arc_challenge.yaml`` includes ``arc_easy.yaml``); acc_norm conventionally quoted.
"""

from . import arc_easy
from .arc_easy import gold, shot_text, to_mc  # noqa: F401  (same record format and prompt)

NAME, KIND, SHOTS, CARD_SHOTS, MAIN = "arc_challenge", "mc", 0, 25, "acc_norm"
FOLDER, HUB = "arc_challenge", ("allenai/ai2_arc", "ARC-Challenge")
PROTOCOL = arc_easy.PROTOCOL.replace("arc_easy test (2376)", "arc_challenge test (1172)")


def load(src):
    docs = src.jsonl(f"{FOLDER}/test.jsonl", HUB + ("test",))
    pool = src.jsonl(f"{FOLDER}/validation.jsonl", HUB + ("validation",))
    return docs, pool, False
