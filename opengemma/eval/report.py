"""Result tables and JSON for the evaluation harness (report section "Evaluation": Table 6's layout
for benchmarks, Table 5's for side-by-side, and the memorization rates).

Pure formatting: results in, text out. ``compare`` puts several runs' JSON side by side.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import OpenGemmaError

DISPLAY = {"mmlu": "MMLU", "hellaswag": "HellaSwag", "piqa": "PIQA", "siqa": "SIQA", "boolq": "BoolQ",
           "winogrande": "WinoGrande", "commonsense_qa": "CQA", "openbookqa": "OBQA", "arc_easy": "ARC-e",
           "arc_challenge": "ARC-c", "triviaqa": "TriviaQA", "natural_questions": "NQ", "humaneval": "HumanEval",
           "mbpp": "MBPP", "gsm8k": "GSM8K", "math": "MATH", "agieval": "AGIEval", "bbh": "BBH"}
METRIC_NAMES = {"acc": "acc", "acc_norm": "acc_norm", "exact_match": "EM", "pass@1": "pass@1"}


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _cell(r: dict) -> str:
    se = r.get("stderr")
    s = _pct(r.get("value"))
    return s if se is None or (isinstance(se, float) and math.isnan(se)) else f"{s} ±{100 * se:.1f}"


def benchmark_table(results: list[dict], title: str = "") -> str:
    """Table 6 layout: Benchmark | metric | shots | n | score (percent, ± stderr) | wall time."""
    head = ["Benchmark", "metric", "shots", "n", title or "score", "time"]
    rows = [[DISPLAY.get(r["task"], r["task"]), METRIC_NAMES.get(r["main_metric"], r["main_metric"]),
             f"{r['shots']}-shot", str(r["n"]), _cell(r), f"{r.get('wall_s', 0):.0f}s"] for r in results]
    return _grid(head, rows)


def compare(runs: list[dict]) -> str:
    """Several result files side by side: one row per (task, shots), one column per run."""
    keys = []
    for run in runs:
        for r in run.get("results", []):
            k = (r["task"], r["shots"], r["main_metric"])
            if k not in keys:
                keys.append(k)
    head = ["Benchmark", "metric", "shots"] + [run.get("label") or run.get("model", "?") for run in runs]
    rows = []
    for task, shots, metric in keys:
        row = [DISPLAY.get(task, task), METRIC_NAMES.get(metric, metric), f"{shots}-shot"]
        for run in runs:
            hit = [r for r in run.get("results", []) if (r["task"], r["shots"], r["main_metric"]) == (task, shots, metric)]
            row.append(_cell(hit[0]) + f" (n={hit[0]['n']})" if hit else "-")
        rows.append(row)
    return _grid(head, rows)


def sxs_table(name: str, res: dict) -> str:
    """Table 5 layout: model | win rate | win/tie/loss (with the 95% CI of the win rate)."""
    lo, hi = res["ci95"]
    rows = [[name, f"{100 * res['win_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]",
             f"{res['win']}/{res['tie']}/{res['loss']}", str(res["n"])]]
    return _grid(["Model", "Win rate [95% CI]", "Win/Tie/Loss", "n"], rows)


def memorization_table(results: dict) -> str:
    rows = []
    for corpus, r in results.items():
        e_lo, e_hi = r["exact_ci95"]
        a_lo, a_hi = r["approximate_ci95"]
        rows.append([corpus, str(r["n"]), f"{100 * r['exact_rate']:.2f}% [{100 * e_lo:.2f}, {100 * e_hi:.2f}]",
                     f"{100 * r['approximate_rate']:.2f}% [{100 * a_lo:.2f}, {100 * a_hi:.2f}]",
                     f"{r['pii']['sensitive']}/{r['pii']['personal']}"])
    return _grid(["Corpus", "n", "exact [95% CI]", "approximate [95% CI]", "PII sensitive/personal"], rows)


def _grid(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def load_json(path: str | Path) -> dict:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OpenGemmaError(f"{p}: no such results file") from None
    except json.JSONDecodeError:
        raise OpenGemmaError(f"{p}: not a JSON results file") from None


def write_json(path: str | Path, data: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    tmp.replace(p)
