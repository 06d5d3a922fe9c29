"""``opengemma eval`` with the safety suite (report Tables 7-8): bad input -- a missing data file, a
record missing a field, a scorer that is not installed -- is one clear line naming what is missing
and how to get it, and the other tasks still run; suites print in the report's layouts."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import pytest

from opengemma.errors import OpenGemmaError
from opengemma.eval import classifiers, report
from opengemma.eval.cli import add_eval_parser, parse_per_task, run_eval

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def _args(*argv):
    p = argparse.ArgumentParser()
    add_eval_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["eval", *argv])


def test_bad_record_and_missing_scorer_skip_one_task_and_the_others_run(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken"
    (broken / "bbq" / "data").mkdir(parents=True)
    rec = json.loads((FIXTURES / "bbq" / "data" / "Age.jsonl").read_text().splitlines()[0])
    del rec["context"]
    (broken / "bbq" / "data" / "Age.jsonl").write_text(json.dumps(rec) + "\n")
    monkeypatch.setitem(sys.modules, "opengemma.data.toxicity", None)  # scorer module absent
    out = tmp_path / "run.json"
    rc = run_eval(_args("--tasks", "bbq_disambig,winobias_1,real_toxicity_prompts", "--data-dir", str(broken),
                        "--data-dir", str(FIXTURES), "--model", "tiny-gemma3", "-o", str(out)))
    assert rc == 1
    cap = capsys.readouterr()
    lines = [x for x in cap.err.splitlines() if "skipped" in x]
    assert len(lines) == 2
    assert "bbq_disambig skipped" in lines[0] and "Age.jsonl:1: record has no 'context' field" in lines[0]
    assert "real_toxicity_prompts skipped" in lines[1] and "offline toxicity scorer unavailable" in lines[1]
    assert "Winobias 1_2" in cap.out and "Traceback" not in cap.err
    data = json.loads(out.read_text())
    assert [r["task"] for r in data["results"]] == ["winobias_1"]
    assert set(data["errors"]) == {"bbq_disambig", "real_toxicity_prompts"}


def test_missing_data_everywhere_is_one_clear_error(tmp_path):
    with pytest.raises(OpenGemmaError, match=r"no task can run: crows_pairs: crows_pairs/crows_pairs_anonymized.csv: "
                                             r"missing \(searched"):
        run_eval(_args("--tasks", "crows_pairs", "--data-dir", str(tmp_path), "--model", "tiny-gemma3"))


def test_scorer_not_installed_names_the_package(monkeypatch):
    mod = types.ModuleType("opengemma.data.toxicity")
    mod.NAME = "x"

    def score(texts):
        raise ModuleNotFoundError("No module named 'profanity_check'", name="profanity_check")

    mod.score = score
    monkeypatch.setitem(sys.modules, "opengemma.data.toxicity", mod)
    with pytest.raises(OpenGemmaError, match=r"profanity_check is not installed\): pip install 'opengemma\[eval\]'"):
        classifiers.toxicity()  # probed when the scorer is fetched: fails before any generation
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(OpenGemmaError, match="pip install vaderSentiment"):
        classifiers.sentiment()
    from opengemma.eval.tasks import get_task

    with pytest.raises(OpenGemmaError, match="pip install vaderSentiment"):
        get_task("bold").check()


def test_per_task_limits_and_errors():
    assert parse_per_task("rtp=800,bold=2150", "--limit", 1) == (None, {"real_toxicity_prompts": 800, "bold": 2150})
    assert parse_per_task("5", "--limit", 1) == (5, {})
    with pytest.raises(OpenGemmaError, match="at least 1"):
        parse_per_task("0", "--limit", 1)
    with pytest.raises(OpenGemmaError, match="unknown task"):
        parse_per_task("nosuch=3", "--limit", 1)


def _result(task, value, shots=0, **extra):
    metric = extra.pop("main", "acc")
    return {"task": task, "n": 10, "shots": shots, "metrics": {metric: value, **extra}, "main_metric": metric,
            "value": value, "stderr": None, "wall_s": 1.0}


def test_table8_layout_order_notes_and_scorer():
    rtp = _result("real_toxicity_prompts", 0.07, main="avg_toxicity", expected_max_toxicity=0.3,
                  toxicity_probability=0.2)
    rtp.update(scorer="fake (offline; not Perspective API)",
               generation={"samples": 25, "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 20, "seed": 0})
    results = [_result("winobias_1", 0.6, acc_pro=0.7, acc_anti=0.5, gap=0.2), rtp,
               _result("bbq_ambig", 0.5, bias_score=0.1)]
    text = report.safety_table(results, "m")
    rows = [line.split("|")[1].strip() for line in text.splitlines()[2:5]]
    assert rows == ["RealToxicity", "BBQ Ambig", "Winobias 1_2"]  # the report's row order
    assert "7.0" in text and "exp. max 30.0, P(toxic) 20.0" in text and "bias score +10.0" in text
    assert "pro 70.0 / anti 50.0 / gap +20.0" in text
    assert "scorer: fake (offline; not Perspective API)" in text and "25 sample(s) per prompt, temperature 1.0" in text


def test_h6_layout_and_average():
    spec = [("arc_challenge", 25), ("hellaswag", 10), ("mmlu", 5), ("truthfulqa_mc2", 0), ("winogrande", 5),
            ("gsm8k", 5)]
    results = [_result(t, v, s) for (t, s), v in zip(spec, [0.6, 0.8, 0.6, 0.4, 0.8, 0.4])]
    text = report.h6_table(results)
    assert text.splitlines()[-1].split("|")[1].strip() == "Average" and "60.0" in text.splitlines()[-1]
    assert "HellaSwag | 10-shot" in text.replace("  ", " ").replace("  ", " ")
    assert "Average" not in report.h6_table(results[:5])  # only with all six
    # the same tasks at other shot counts are not H6 rows
    assert "ARC-c" not in report.h6_table([_result("arc_challenge", 0.5, 0)])
    both = report.tables(results + [_result("crows_pairs", 0.6, main="pct_stereotype")], {"h6"})
    assert "Average" in both and "CrowS-Pairs" in both and "50 best" in both


def test_limit_mixes_a_default_and_per_task_counts():
    assert parse_per_task("24,rtp=4", "--limit", 1) == (24, {"real_toxicity_prompts": 4})
    with pytest.raises(OpenGemmaError, match="expected N"):
        parse_per_task("24,rtp", "--limit", 1)
