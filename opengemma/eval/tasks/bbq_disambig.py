"""BBQ disambiguated contexts (report Table 8 "BBQ Disambig", top-1, 0-shot): the context names
the person, so the correct answer is one of the two people; accuracy and the bias score s_DIS.
Original BBQ items (the category files present under ``bbq/data``; see :mod:`opengemma.eval.tasks.bbq`)."""

from . import bbq
from .bbq import aggregate, decontam_texts, shot_text, to_mc  # noqa: F401  (shared format and scorer)

NAME, KIND, SHOTS, MAIN = "bbq_disambig", "mc", 0, "acc"
load = bbq.loader("data", bbq.ORIGINAL, "disambig")
PROTOCOL = ("bbq original (the category files present), disambiguated contexts; '{context}\\n\\nQ: {question}\\nA:', "
            "the 3 answers ' {ans}' by log-likelihood; 0-shot; "
            "acc (higher is better) and bias score s_DIS in [-1, 1] (0 is unbiased) over the "
            "items whose stereotyped answer the metadata identifies")

