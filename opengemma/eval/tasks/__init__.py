"""The benchmark tasks of the report's evaluation section, one small module per task, collected
in a plain dict, and the suites that run them together.

* ``table6``: report Table 6 (the report's shot counts);
* ``safety``: report Table 8, "Safety academic benchmark results", in its row order;
* ``h6``: report Table 7, the Hugging Face Open LLM Leaderboard's "H6" suite with the
  leaderboard's shot counts (ARC 25, HellaSwag 10, MMLU 5, TruthfulQA 0, WinoGrande 5, GSM8K 5).

Each module says how to read its records (original field names), how to build the prompt and
few-shot context, and how to score; see :mod:`opengemma.eval.tasks.base`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ...errors import OpenGemmaError

TABLE6 = ("mmlu", "hellaswag", "piqa", "siqa", "boolq", "winogrande", "commonsense_qa", "openbookqa", "arc_easy",
          "arc_challenge", "triviaqa", "natural_questions", "humaneval", "mbpp", "gsm8k", "math", "agieval", "bbh")
SAFETY = ("real_toxicity_prompts", "bold", "crows_pairs", "bbq_ambig", "bbq_disambig", "winogender", "truthfulqa_mc2",
          "winobias_1", "winobias_2", "toxigen")
EXTRA = ("truthfulqa_mc1", "bbq_lite_ambig", "bbq_lite_disambig")

# name -> module (imported on first use; a plain dict, no registration magic)
TASKS = {name: f"opengemma.eval.tasks.{name}" for name in TABLE6 + SAFETY + EXTRA}
ALIASES = {"arc_e": "arc_easy", "arc_c": "arc_challenge", "nq": "natural_questions", "csqa": "commonsense_qa",
           "obqa": "openbookqa", "wg": "winogrande", "truthfulqa": "truthfulqa_mc2", "rtp": "real_toxicity_prompts",
           "realtoxicityprompts": "real_toxicity_prompts", "crows": "crows_pairs", "winobias_1_2": "winobias_1",
           "winobias_2_2": "winobias_2", "bbq": "bbq_ambig"}

# suite -> ((task, shots or None for the task's own count), ...)
SUITES = {
    "table6": tuple((t, None) for t in TABLE6),
    "safety": tuple((t, None) for t in SAFETY),
    "h6": (("arc_challenge", 25), ("hellaswag", 10), ("mmlu", 5), ("truthfulqa_mc2", 0), ("winogrande", 5),
           ("gsm8k", 5)),
}


def get_task(name: str) -> ModuleType:
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in TASKS:
        raise OpenGemmaError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}; suites: {', '.join(SUITES)}")
    return importlib.import_module(TASKS[key])


def resolve(spec: str) -> list[tuple[ModuleType, int | None, str | None]]:
    """``--tasks``: comma-separated task names, suites or ``all`` -> [(task module, suite shot count
    or None, suite name or None)], in order, each (task, shots) once."""
    out, seen = [], set()
    for name in (n.strip().lower() for n in spec.split(",") if n.strip()):
        if name == "all":
            entries, suite = [(t, None) for t in TASKS], None
        elif name in SUITES:
            entries, suite = list(SUITES[name]), name
        else:
            entries, suite = [(name, None)], None
        for task_name, shots in entries:
            task = get_task(task_name)
            key = (task.NAME, task.SHOTS if shots is None else shots)
            if key not in seen:
                seen.add(key)
                out.append((task, shots, suite))
    if not out:
        raise OpenGemmaError(f"--tasks {spec!r}: no task named")
    return out
