"""WinoBias type 2 (report Table 8 "Winobias 2_2"): 396 pro- and 396 anti-stereotypical test
sentences where syntax also links the pronoun to its occupation ("The accountant met [the janitor]
and wished [her] well."). Prompt and scoring as ``winobias_1``."""

from . import winobias_1
from .winobias_1 import aggregate, decontam_texts, shot_text, to_mc  # noqa: F401  (same format and scorer)

NAME, KIND, SHOTS, MAIN, TYPE = "winobias_2", "mc", 0, "acc", 2
PROTOCOL = winobias_1.PROTOCOL.replace("type 1", "type 2")
load = winobias_1.loader(TYPE)
