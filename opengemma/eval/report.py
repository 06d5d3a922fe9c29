"""Result tables and JSON for the evaluation harness (report section "Evaluation": Table 6's layout
for benchmarks, Table 7's for the H6 suite, Table 8's for the safety benchmarks, Table 5's for
side-by-side, and the memorization rates).

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
           "mbpp": "MBPP", "gsm8k": "GSM8K", "math": "MATH", "agieval": "AGIEval", "bbh": "BBH",
           "real_toxicity_prompts": "RealToxicity", "bold": "BOLD", "crows_pairs": "CrowS-Pairs",
           "bbq_ambig": "BBQ Ambig", "bbq_disambig": "BBQ Disambig", "bbq_lite_ambig": "BBQ-lite Ambig",
           "bbq_lite_disambig": "BBQ-lite Disambig", "winogender": "Winogender", "truthfulqa_mc1": "TruthfulQA MC1",
           "truthfulqa_mc2": "TruthfulQA", "winobias_1": "Winobias 1_2", "winobias_2": "Winobias 2_2",
           "toxigen": "Toxigen"}
METRIC_NAMES = {"acc": "acc", "acc_norm": "acc_norm", "exact_match": "EM", "pass@1": "pass@1",
                "avg_toxicity": "avg toxicity", "avg_sentiment": "avg sentiment", "pct_stereotype": "% stereotype",
                "mc2": "MC2", "toxic_rate": "% toxic"}
# Table 8's rows in the report's order: (task, the report's metric column, which direction is better)
SAFETY_ROWS = (("real_toxicity_prompts", "avg", "lower"), ("bold", "avg sentiment", "higher"),
               ("crows_pairs", "top-1", "50 best"), ("bbq_ambig", "1-shot, top-1", "higher"),
               ("bbq_disambig", "top-1", "higher"), ("bbq_lite_ambig", "1-shot, top-1", "higher"),
               ("bbq_lite_disambig", "top-1", "higher"), ("winogender", "top-1", "higher"),
               ("truthfulqa_mc2", "MC2", "higher"), ("truthfulqa_mc1", "MC1", "higher"),
               ("winobias_1", "top-1", "higher"), ("winobias_2", "top-1", "higher"), ("toxigen", "% toxic", "lower"))
H6 = (("arc_challenge", 25), ("hellaswag", 10), ("mmlu", 5), ("truthfulqa_mc2", 0), ("winogrande", 5), ("gsm8k", 5))


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


def safety_table(results: list[dict], title: str = "") -> str:
    """Table 8 layout: Benchmark | metric | n | score | better | what else was measured; then the
    offline scorers and the sampling settings of the generation tasks (never a Perspective score)."""
    by_task = {r["task"]: r for r in results}
    rows = []
    for task, metric, better in SAFETY_ROWS:
        if (r := by_task.get(task)) is not None:
            rows.append([DISPLAY[task], metric, str(r["n"]), _cell(r), better, _notes(r)])
    lines = [_grid(["Benchmark", "metric", "n", title or "score", "better", "also measured"], rows)]
    scorers = sorted({r["scorer"] for r in results if r.get("scorer") and r["task"] in by_task})
    for name in scorers:
        lines.append(f"scorer: {name}")
    for r in results:
        if r.get("generation"):
            g = r["generation"]
            lines.append(f"{DISPLAY[r['task']]}: {g['samples']} sample(s) per prompt, temperature {g['temperature']}, "
                         f"top-p {g['top_p'] if g['top_p'] is not None else 1.0}, <= {g['max_new_tokens']} new "
                         f"tokens, seed {g['seed']}{', chat format' if r.get('chat') else ''}"
                         + (f"; {g['stopped']}/{g['generated']} ended before the cap, mean {g['mean_tokens']} tokens"
                            if "stopped" in g else ""))
    return "\n".join(lines)


def _notes(r: dict) -> str:
    """The task's secondary numbers (percent, except bias scores in [-1, 1] shown x100 too)."""
    m, out = r["metrics"], []
    if "bias_score" in m:
        out.append(f"bias score {100 * m['bias_score']:+.1f}")
    if "gap" in m:
        out.append(f"pro {_pct(m['acc_pro'])} / anti {_pct(m['acc_anti'])} / gap {100 * m['gap']:+.1f}")
    if "expected_max_toxicity" in m:
        out.append(f"exp. max {_pct(m['expected_max_toxicity'])}, P(toxic) {_pct(m['toxicity_probability'])}")
    if "likelihood_diff" in m:
        out.append(f"mean |dLL| {m['likelihood_diff']:.2f}")
    if "positive_rate" in m:
        gaps = ", ".join(f"{k[len('max_group_gap_'):]} {100 * v:.1f}" for k, v in m.items()
                         if k.startswith("max_group_gap_"))
        out.append(f"pos {_pct(m['positive_rate'])} / neg {_pct(m['negative_rate'])}; group gap {gaps}")
    kinds = (r.get("details") or {}).get("kinds")
    if kinds:
        out.append(", ".join(f"{k} {_pct(v['toxic_rate'])}" for k, v in kinds.items()))
    return "; ".join(out)


def h6_table(results: list[dict], title: str = "") -> str:
    """Table 7 layout: the six H6 benchmarks at the leaderboard's shot counts, and their average
    (only when all six were run)."""
    rows, values = [], []
    for task, shots in H6:
        hit = [r for r in results if r["task"] == task and r["shots"] == shots]
        if hit:
            r = hit[0]
            rows.append([DISPLAY[task], f"{shots}-shot", METRIC_NAMES.get(r["main_metric"], r["main_metric"]),
                         str(r["n"]), _cell(r)])
            values.append(r["value"])
    if len(values) == len(H6) and all(v is not None for v in values):
        rows.append(["Average", "", "", "", _pct(sum(values) / len(values))])
    return _grid(["Benchmark", "shots", "metric", "n", title or "score"], rows)


def tables(results: list[dict], suites: set[str], title: str = "") -> str:
    """What ``opengemma eval`` prints: the H6 layout when that suite was asked for, Table 8's for
    the safety tasks, and Table 6's for every other result."""
    parts, shown = [], set()
    if "h6" in suites:
        parts.append(h6_table(results, title))
        shown |= {id(r) for r in results if (r["task"], r["shots"]) in H6}
    safety = [r for r in results if r["task"] in {t for t, _, _ in SAFETY_ROWS} and id(r) not in shown]
    if safety:
        parts.append(safety_table(safety, title))
        shown |= {id(r) for r in safety}
    rest = [r for r in results if id(r) not in shown]
    if rest:
        parts.append(benchmark_table(rest, title))
    return "\n\n".join(parts)


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
    """Table 5 layout: model | win rate | win/tie/loss (with the 95% CI of the win rate); then, when
    the replies were counted, how many of each model's turns ended before the token cap."""
    lo, hi = res["ci95"]
    rows = [[name, f"{100 * res['win_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]",
             f"{res['win']}/{res['tie']}/{res['loss']}", str(res["n"])]]
    out = _grid(["Model", "Win rate [95% CI]", "Win/Tie/Loss", "n"], rows)
    if "replies" in res:
        cap = res["replies"].get("max_new_tokens")
        out += "\n\n" + _grid(["Replies", f"turn ended (before {cap} tokens)", "mean tokens"],
                               [[side, f"{r['ended']}/{r['n']}", f"{r['mean_tokens']:.1f}"]
                                for side, r in res["replies"].items() if isinstance(r, dict)])
    return out


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
