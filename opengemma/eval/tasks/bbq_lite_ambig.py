"""BBQ-lite ambiguous contexts: the BIG-bench BBQ-lite items of the three categories missing from
the local BBQ copy (Gender_identity, Race_ethnicity, SES). A separate, smaller generation from the
same templates with other "unknown" wordings: reported apart from ``bbq_ambig``, never averaged into
it. Same prompt and scorer (:mod:`opengemma.eval.tasks.bbq`)."""

from . import bbq, bbq_ambig
from .bbq import aggregate, decontam_texts, shot_text, to_mc  # noqa: F401  (shared format and scorer)

NAME, KIND, SHOTS, MAIN = "bbq_lite_ambig", "mc", 1, "acc"
load = bbq.loader("bbq_lite_bigbench", bbq.LITE, "ambig")
PROTOCOL = "bbq-lite (BIG-bench; not comparable with BBQ numbers)" + bbq_ambig.PROTOCOL.split(")", 1)[1]
