"""The benchmark suite of report Table 6: one small module per task, collected in a plain dict.

Each module says how to read its records (original field names), how to build the prompt and
few-shot context, and how to score; see :mod:`opengemma.eval.tasks.base`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ...errors import OpenGemmaError

# name -> module (imported on first use; a plain dict, no registration magic)
TASKS = {name: f"opengemma.eval.tasks.{name}" for name in (
    "mmlu", "hellaswag", "piqa", "siqa", "boolq", "winogrande", "commonsense_qa", "openbookqa", "arc_easy",
    "arc_challenge", "triviaqa", "natural_questions", "humaneval", "mbpp", "gsm8k", "math", "agieval", "bbh")}
ALIASES = {"arc_e": "arc_easy", "arc_c": "arc_challenge", "nq": "natural_questions", "csqa": "commonsense_qa",
           "obqa": "openbookqa", "wg": "winogrande"}


def get_task(name: str) -> ModuleType:
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in TASKS:
        raise OpenGemmaError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[key])
