"""``opengemma eval`` (report section "Evaluation"): results table, JSON, --compare, clear errors;
side-by-side (Table 5) and memorization reports with stub models/judges."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from opengemma.errors import OpenGemmaError
from opengemma.eval import report, sxs
from opengemma.eval.cli import add_eval_parser, parse_shots, run_eval

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def _args(*argv):
    p = argparse.ArgumentParser()
    add_eval_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["eval", *argv])


@pytest.mark.slow
def test_eval_with_the_embedded_model_writes_json_and_compares(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert run_eval(_args("--tasks", "piqa,winogrande", "--limit", "1", "--data-dir", str(FIXTURES),
                          "-o", str(out), "--dtype", "float32", "--device", "cpu")) == 0
    table = capsys.readouterr().out
    assert "PIQA" in table and "WinoGrande" in table and "0-shot" in table
    data = json.loads(out.read_text())
    assert [r["task"] for r in data["results"]] == ["piqa", "winogrande"]
    r = data["results"][0]
    assert r["n"] == 1 and set(r["metrics"]) >= {"acc", "acc_norm", "acc_stderr"} and r["protocol"]
    assert data["model"] and data["date"] and "Question:" in r["prompt_example"]
    assert run_eval(_args("--compare", str(out), str(out))) == 0
    assert capsys.readouterr().out.count("run.json") == 2


def test_errors_are_one_clear_line(tmp_path):
    with pytest.raises(OpenGemmaError, match="nothing to do"):
        run_eval(_args())
    with pytest.raises(OpenGemmaError, match="unknown task"):
        run_eval(_args("--model", "tiny-gemma1", "--tasks", "nosuch", "--data-dir", str(FIXTURES)))
    with pytest.raises(OpenGemmaError, match="no such directory"):
        run_eval(_args("--model", "tiny-gemma1", "--tasks", "piqa", "--data-dir", str(tmp_path / "missing")))
    with pytest.raises(OpenGemmaError, match="no such results file"):
        run_eval(_args("--compare", str(tmp_path / "none.json")))
    assert parse_shots("hellaswag=10,arc_c=25") == (None, {"hellaswag": 10, "arc_challenge": 25})
    assert parse_shots("5") == (5, {})


def test_side_by_side_counts_swaps_and_ties():
    # A judge that always prefers the test model's text (it contains "good"): wins both orders.
    judge_fair = lambda p: "A" if "good" in p.split("[Response A]")[1].split("[Response B]")[0] else "B"
    res = sxs.side_by_side(["q1", "q2", "q3"], ["good 1", "good 2", "good 3"], ["bad", "bad", "bad"], judge_fair)
    assert (res["win"], res["tie"], res["loss"]) == (3, 0, 0) and res["win_rate"] == 1.0
    # A position-biased judge (always "A") disagrees with itself after the swap: all ties.
    res = sxs.side_by_side(["q1", "q2"], ["x", "y"], ["z", "w"], lambda p: "A")
    assert (res["win"], res["tie"], res["loss"]) == (0, 2, 0) and res["win_rate"] == 0.5
    assert sxs.parse_verdict("Response B is better: B") == "B" and sxs.parse_verdict("???") == "tie"
    assert sxs.combine("A", "B", test_first=True) == "win" and sxs.combine("A", "A", test_first=True) == "tie"
    assert "Win/Tie/Loss" in report.sxs_table("m vs b", res)


def test_tables():
    results = [{"task": "hellaswag", "main_metric": "acc_norm", "shots": 10, "n": 100, "value": 0.5,
                "stderr": 0.05, "wall_s": 3}]
    t = report.benchmark_table(results)
    assert "HellaSwag" in t and "50.0 ±5.0" in t and "10-shot" in t
    c = report.compare([{"label": "a", "results": results}, {"label": "b", "results": []}])
    assert "| a" in c.splitlines()[0] or " a " in c.splitlines()[0]


def test_endpoint_judge_speaks_the_openai_chat_protocol():
    import http.server
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body, self.headers.get("Authorization")))
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "B"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judge = sxs.EndpointJudge(f"http://127.0.0.1:{server.server_address[1]}/v1", "judge-model",
                                  api_key_env="OPENGEMMA_TEST_JUDGE_KEY")
        assert judge("which is better?") == "B"
    finally:
        server.shutdown()
    path, body, _ = seen[0]
    assert path == "/v1/chat/completions" and body["model"] == "judge-model"
    assert body["messages"] == [{"role": "user", "content": "which is better?"}]


def test_hub_without_datasets_is_a_clear_error(monkeypatch):
    import sys

    from opengemma.eval.tasks import get_task
    from opengemma.eval.tasks.base import DataSource

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(OpenGemmaError, match="datasets"):
        get_task("piqa").load(DataSource(None))


def test_respond_counts_turns_that_end_and_the_table_shows_them():
    class Scripted:  # chat() fills the stats as opengemma's generation does
        def __init__(self, ends):
            self.ends = iter(ends)

        def chat(self, messages, *, max_new_tokens, stats):
            ended, n = next(self.ends)
            stats.generated_tokens, stats.stopped = n, int(ended)
            return f"reply to {messages[-1]['content']}"

    replies = sxs.respond(Scripted([(True, 5), (False, 16), (True, 3)]), ["a", "b", "c"], max_new_tokens=16)
    assert [(r.text, r.ended, r.tokens) for r in replies] == [("reply to a", True, 5), ("reply to b", False, 16),
                                                              ("reply to c", True, 3)]
    summary = sxs.reply_summary(replies)
    assert summary == {"n": 3, "ended": 2, "ended_share": 2 / 3, "mean_tokens": 8.0}
    res = sxs.side_by_side(["a", "b", "c"], ["x", "y", "z"], ["u", "v", "w"], lambda p: "tie")
    res["replies"] = {"test": summary, "baseline": sxs.reply_summary([]), "max_new_tokens": 16}
    table = report.sxs_table("m vs b", res)
    assert "turn ended (before 16 tokens)" in table and "| test     | 2/3" in table and "8.0" in table


def test_log_samples_keeps_each_items_outputs_and_scores(tmp_path):
    out = tmp_path / "log.json"
    assert run_eval(_args("--model", "tiny-gemma3", "--tasks", "triviaqa,piqa", "--limit", "2", "--shots", "0",
                          "--data-dir", str(FIXTURES), "--device", "cpu", "--dtype", "float32",
                          "--log-samples", "-o", str(out))) == 0
    gen, piqa = json.loads(out.read_text())["results"]
    assert [e["doc"] for e in gen["log"]] == [0, 1]
    for e in gen["log"]:
        assert len(e["outputs"]) == len(e["finish"]) == len(e["tokens"]) == 1
        assert e["finish"][0] in ("stop", "length") and e["score"]["exact_match"] in (0.0, 1.0)
    g = gen["generation"]
    assert g["generated"] == 2 and g["stopped"] == sum(e["finish"][0] == "stop" for e in gen["log"])
    assert gen["value"] == sum(e["score"]["exact_match"] for e in gen["log"]) / 2
    for e in piqa["log"]:
        lls = e["loglikelihoods"]
        assert len(lls) == 2 and e["pred"] == max(range(2), key=lambda i: lls[i])
    assert piqa["metrics"]["acc"] == sum(e["pred"] == e["gold"] for e in piqa["log"]) / 2
