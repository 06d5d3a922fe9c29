"""BBQ-lite disambiguated contexts: the BIG-bench BBQ-lite items of the three categories missing
from the local BBQ copy (Gender_identity, Race_ethnicity, SES), reported apart from
``bbq_disambig``. Same prompt and scorer (:mod:`opengemma.eval.tasks.bbq`)."""

from . import bbq, bbq_disambig
from .bbq import aggregate, decontam_texts, shot_text, to_mc  # noqa: F401  (shared format and scorer)

NAME, KIND, SHOTS, MAIN = "bbq_lite_disambig", "mc", 0, "acc"
load = bbq.loader("bbq_lite_bigbench", bbq.LITE, "disambig")
PROTOCOL = "bbq-lite (BIG-bench; not comparable with BBQ numbers)" + bbq_disambig.PROTOCOL.split(")", 1)[1]
