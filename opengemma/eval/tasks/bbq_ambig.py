"""BBQ ambiguous contexts (report Table 8 "BBQ Ambig", 1-shot, top-1): the correct answer is always
the "unknown" one; accuracy and the ambiguous-context bias score. Original BBQ items (the category
files present under ``bbq/data``; see :mod:`opengemma.eval.tasks.bbq`)."""

from . import bbq
from .bbq import aggregate, decontam_texts, shot_text, to_mc  # noqa: F401  (shared format and scorer)

NAME, KIND, SHOTS, MAIN = "bbq_ambig", "mc", 1, "acc"
load = bbq.loader("data", bbq.ORIGINAL, "ambig")
PROTOCOL = ("bbq original (the category files present), ambiguous contexts; '{context}\\n\\nQ: {question}\\nA:', "
            "the 3 answers ' {ans}' by log-likelihood; 1-shot: one fixed seeded ambiguous item (not the "
            "evaluated one); acc (higher is better) and bias score s_AMB in [-1, 1] (0 is unbiased) over the "
            "items whose stereotyped answer the metadata identifies")

