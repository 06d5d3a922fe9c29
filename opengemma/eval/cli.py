"""``opengemma eval``: the report's evaluation section from the command line (report section
"Evaluation": Table 6 benchmarks, Table 7 H6 suite, Table 8 safety benchmarks, Table 5
side-by-side, "Memorization Evaluations").

  opengemma eval --tasks hellaswag,piqa --limit 100 --data-dir ../shared/benchmarks -o run.json
  opengemma eval --tasks arc_challenge,hellaswag,winogrande --card-shots      # Gemma 3 card shots
  opengemma eval --tasks table6,h6,safety -o all.json                          # the whole section
  opengemma eval --tasks safety --chat --limit real_toxicity_prompts=800 -m it.gguf
  opengemma eval --memorization web=corpus.jsonl --memorization-n 1000
  opengemma eval --sxs prompts.jsonl --baseline gemma-2b --judge http://localhost:8000/v1 --judge-model m
  opengemma eval --compare a.json b.json                                       # runs side by side

``cli.py`` of the package wires it in with ``add_eval_parser(sub)`` and ``COMMANDS["eval"] = run_eval``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

from ..cli import float_range, int_range, seed_type
from ..errors import OpenGemmaError

_positive = int_range(1)
DESCRIPTION = ("Evaluate a model as the Gemma report does: the Table 6 benchmarks (log-likelihood multiple "
               "choice with prefix reuse, generation with answer extraction, sandboxed code execution), the "
               "Table 7 H6 suite, the Table 8 safety benchmarks (toxicity and sentiment by offline scorers), "
               "memorization rates with a personal-data scan, and Table 5 side-by-side win rates. Prints "
               "tables and writes JSON (--output).")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="benchmarks, memorization and side-by-side evaluation",
                              description=DESCRIPTION)
    p.add_argument("--model", "-m", default=None, metavar="MODEL", help="model to evaluate (default: embedded 270M)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quantize", "-q", choices=["none", "int8", "int4", "mixed"], default="none",
                   help="weight-only quantization of the evaluated model (and of --baseline / --judge)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter (`opengemma train adapter`) merged into MODEL")
    p.add_argument("--tasks", default=None,
                   help="comma-separated tasks and suites: table6 (report Table 6), h6 (Table 7, leaderboard "
                        "shots), safety (Table 8: real_toxicity_prompts, bold, crows_pairs, bbq_ambig, bbq_disambig, "
                        "winogender, truthfulqa_mc2, winobias_1, winobias_2, toxigen), or 'all'; also "
                        "truthfulqa_mc1, bbq_lite_ambig, bbq_lite_disambig and each Table 6 task by name")
    p.add_argument("--shots", default=None,
                   help="few-shot count for every task (N), per task (hellaswag=10,arc_challenge=25) or both; "
                        "default: the report's Table 6 counts")
    p.add_argument("--card-shots", action="store_true",
                   help="use the Gemma 3 model card's shot counts where they differ (HellaSwag 10, ARC-c 25, "
                        "WinoGrande 5)")
    p.add_argument("--limit", default=None,
                   help="only the first N items of each task (N), per task (real_toxicity_prompts=800,bold=2150) or both "
                        "(100,bold=50); "
                        "the safety generation tasks interleave their groups, so the first N are a balanced subset")
    p.add_argument("--batch-size", "-b", type=int_range(1, 1 << 16), default=16,
                   help="rows per forward pass (default 16)")
    p.add_argument("--data-dir", action="append", default=None,
                   help="local data directory (original field names, laid out as ../shared/benchmarks or "
                        "../shared/datasets); repeatable, searched in order; default $OPENGEMMA_EVAL_DATA "
                        "(os.pathsep-separated), else ../shared/benchmarks and ../shared/datasets where present, "
                        "else the hub")
    p.add_argument("--hub", action="store_true",
                   help="read the benchmarks from the Hugging Face hub through `datasets` (pip install "
                        "'opengemma[eval]')")
    p.add_argument("--samples", type=int_range(1, 1 << 16), default=None,
                   help="samples per item: maj@k (GSM8K, MATH), pass@k (code); default 1, or the task's own "
                        "(RealToxicityPrompts 25)")
    # -t is --temperature in every verb; it was --tasks here, so a task list after -t gets a hint.
    p.add_argument("--temperature", "-t", type=float_range(0.0, hint=" (-t is --temperature; tasks go after --tasks)"),
                   default=None, help="sampling temperature (default: the task's own -- RealToxicityPrompts 1.0, "
                                      "ToxiGen/BOLD 0.1 -- else greedy, or 0.2 when --samples > 1)")
    p.add_argument("--top-p", type=float_range(0.0, 1.0), default=None,
                   help="nucleus sampling (default: the task's own -- 0.9 for the toxicity and BOLD tasks -- else off)")
    p.add_argument("--seed", type=seed_type, default=0, help="random seed (default 0)")
    p.add_argument("--chat", action="store_true",
                   help="instruction-tuned models: each prompt (few-shot examples + question) becomes a user turn "
                        "and the answer is generated or scored in the model turn (CrowS-Pairs stays raw text)")
    p.add_argument("--output", "-o", default=None, metavar="JSON", help="write the results here")
    p.add_argument("--log-samples", action="store_true",
                   help="keep every item's outputs (with finish reason and token count) or choice "
                        "log-likelihoods, and its score, in the JSON's per-task \"log\"")
    p.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                   help="print these result files (and this run, if any) side by side")
    p.add_argument("--memorization", action="append", default=None, metavar="NAME=PATH",
                   help="memorization on a corpus (.jsonl with a text field, or .txt one document per line); "
                        "repeatable")
    p.add_argument("--memorization-n", type=_positive, default=10_000, help="documents sampled per corpus (10,000)")
    p.add_argument("--text-field", default="text", help="JSONL field holding a corpus document")
    p.add_argument("--sxs", default=None, metavar="PROMPTS",
                   help="side-by-side on these prompts (.jsonl with 'prompt', or .txt one per line)")
    p.add_argument("--baseline", default=None, metavar="MODEL", help="the side-by-side baseline model")
    p.add_argument("--judge", default=None, metavar="MODEL|URL",
                   help="judge: an opengemma model, a reward model directory (`opengemma train rm` + `train "
                        "export`: the higher reward wins), or the base URL of an OpenAI-compatible endpoint")
    p.add_argument("--judge-tie-margin", type=float, default=0.0, metavar="R",
                   help="with a reward-model judge: rewards closer than R are a tie (0)")
    p.add_argument("--judge-model", default=None, help="model name to send to an endpoint judge")
    p.add_argument("--max-new-tokens", "-n", type=_positive, default=256, help="response length for side-by-side")
    return p


def parse_shots(text: str | None) -> tuple[int | None, dict[str, int]]:
    """'5' -> (5, {}); 'hellaswag=10,arc_c=25' -> (None, {...})."""
    return parse_per_task(text, "--shots", 0)


def parse_per_task(text: str | None, flag: str, least: int) -> tuple[int | None, dict[str, int]]:
    """``flag``'s value: 'N' -> (N, {}); 'task=N,task=N' -> (None, {task: N}); 'N,task=M' -> both;
    every count >= ``least``."""
    if not text:
        return None, {}
    from .tasks import ALIASES, TASKS

    every, per = None, {}
    try:
        for part in text.split(","):
            if "=" not in part:  # a bare N: every task not named
                every = int(part)
                continue
            k, v = part.split("=")
            per[ALIASES.get(k.strip(), k.strip())] = int(v)
    except ValueError:
        raise OpenGemmaError(f"{flag} {text!r}: expected N, task=N,task=N or both (N,task=N)") from None
    if unknown := sorted(set(per) - set(TASKS)):
        raise OpenGemmaError(f"{flag} {text!r}: unknown task(s) {', '.join(map(repr, unknown))}")
    if any(n < least for n in ([every] if every is not None else []) + list(per.values())):
        raise OpenGemmaError(f"{flag} {text!r}: counts must be at least {least}")
    return every, per


def default_data_dir(args) -> list[str] | None:
    """--data-dir (repeatable), else $OPENGEMMA_EVAL_DATA (os.pathsep-separated), else
    ../shared/benchmarks and ../shared/datasets where present; None = the hub."""
    if args.hub:
        return None
    if args.data_dir:
        return [d for spec in args.data_dir for d in spec.split(os.pathsep) if d]
    if os.environ.get("OPENGEMMA_EVAL_DATA"):
        return [d for d in os.environ["OPENGEMMA_EVAL_DATA"].split(os.pathsep) if d]
    local = [os.path.join(os.pardir, "shared", name) for name in ("benchmarks", "datasets")]
    return [d for d in local if os.path.isdir(d)] or None


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=None)  # None: off when stderr is not a terminal


def _read_lines(path: str, field: str) -> list[str]:
    from .memorization import read_corpus

    return read_corpus(path, field)


def run_eval(args) -> int:
    from . import report

    if not (args.tasks or args.memorization or args.sxs or args.compare):
        raise OpenGemmaError("nothing to do: give --tasks, --memorization, --sxs or --compare")
    if args.batch_size < 1 or (args.samples is not None and args.samples < 1):
        raise OpenGemmaError("--batch-size and --samples must be at least 1")
    out: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "argv": sys.argv[1:]}
    failed: dict[str, str] = {}
    if args.tasks:  # unknown task names, shots, limits and data directories fail before any work
        from .runner import run_task
        from .tasks import resolve
        from .tasks.base import DataSource

        planned = resolve(args.tasks)
        every, per = parse_shots(args.shots)
        limit_every, limit_per = parse_per_task(args.limit, "--limit", 1)
        source = DataSource(default_data_dir(args))
        loaded = _preflight(planned, source, failed)
    g = None
    if (args.tasks and loaded) or args.memorization or args.sxs:
        from ..process import load_for_command

        g = load_for_command(args.model, adapter=args.adapter, dtype=args.dtype, device=args.device,
                             quantize=args.quantize)
        out.update(model=g.name, adapter=args.adapter, config=g.config.name, dtype=str(g.dtype), device=str(g.device),
                   quantize=args.quantize)
    if args.tasks:
        out["data"] = [str(r) for r in source.roots] if source.roots else "huggingface hub"
        out["results"] = []
        for task, suite_shots, _ in planned:
            if task.NAME not in loaded:
                continue
            shots = per.get(task.NAME, every)
            if shots is None:
                shots = suite_shots if suite_shots is not None else (
                    getattr(task, "CARD_SHOTS", None) if args.card_shots else None)
            try:
                res = run_task(g, task, source, shots=shots, limit=limit_per.get(task.NAME, limit_every),
                               batch_size=args.batch_size, samples=args.samples, temperature=args.temperature,
                               top_p=args.top_p, seed=args.seed, chat=args.chat, progress_factory=_bar,
                               loaded=loaded[task.NAME], log_samples=args.log_samples)
            except OpenGemmaError as e:  # one task's bad data or missing scorer; the others still run
                _skip(failed, task.NAME, e)
                continue
            out["results"].append(res)
            if args.output:
                report.write_json(args.output, out)  # after every task: partial results survive
        if failed:
            out["errors"] = failed
        if out["results"]:
            print(report.tables(out["results"], {s for _, _, s in planned if s}, title=g.name))
    if args.memorization:
        from .memorization import evaluate_corpus, read_corpus

        out["memorization"] = {}
        for spec in args.memorization:
            name, _, path = spec.partition("=")
            if not path:
                name, path = os.path.splitext(os.path.basename(spec))[0], spec
            docs = read_corpus(path, args.text_field)
            bar = _bar(min(args.memorization_n, len(docs)), f"memorization {name}")
            out["memorization"][name] = evaluate_corpus(g.model, g.tokenizer, docs, n=args.memorization_n,
                                                        seed=args.seed, batch_size=args.batch_size,
                                                        progress=bar.update)
            bar.close()
        print(report.memorization_table(out["memorization"]))
    if args.sxs:
        out["side_by_side"] = _run_sxs(g, args)
        print(report.sxs_table(f"{g.name} vs {args.baseline}", out["side_by_side"]))
    if args.output:
        report.write_json(args.output, out)
        print(f"wrote {args.output}", file=sys.stderr)
    if args.compare:
        runs = [report.load_json(p) for p in args.compare]
        for r, p in zip(runs, args.compare):
            r.setdefault("label", os.path.basename(p))
        if out.get("results"):
            runs.append(dict(out, label="this run"))
        print(report.compare(runs))
    return 1 if failed else 0


def _preflight(planned, source, failed: dict) -> dict:
    """Read every task's data and check its scorers before the model loads: {name: loaded data}.
    A task that cannot run is reported in one line and skipped; the others still run."""
    loaded = {}
    for task, _, _ in planned:
        if task.NAME in loaded or task.NAME in failed:
            continue
        try:
            if hasattr(task, "check"):
                task.check()
            loaded[task.NAME] = task.load(source)
        except OpenGemmaError as e:
            _skip(failed, task.NAME, e)
    if not loaded and failed:
        raise OpenGemmaError("no task can run: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return loaded


def _skip(failed: dict, name: str, error: Exception) -> None:
    failed[name] = str(error)
    print(f"opengemma eval: {name} skipped: {error}", file=sys.stderr)


def _run_sxs(g, args) -> dict:
    from ..api import load
    from ..train.reward import is_reward_model
    from .sxs import EndpointJudge, ModelJudge, RewardJudge, reply_summary, respond, side_by_side

    if not args.baseline or not args.judge:
        raise OpenGemmaError("--sxs needs --baseline MODEL and --judge MODEL|URL")
    prompts = _read_lines(args.sxs, "prompt")
    test = respond(g, prompts, args.max_new_tokens)
    base = load(args.baseline, dtype=args.dtype, device=args.device, quantize=args.quantize)
    baseline = respond(base, prompts, args.max_new_tokens)
    if args.judge.startswith(("http://", "https://")):
        if not args.judge_model:
            raise OpenGemmaError("an endpoint judge needs --judge-model NAME")
        judge = EndpointJudge(args.judge, args.judge_model)
    elif is_reward_model(args.judge):
        judge = RewardJudge(args.judge, dtype=args.dtype, device=args.device, tie_margin=args.judge_tie_margin)
    else:
        judge = ModelJudge(load(args.judge, dtype=args.dtype, device=args.device, quantize=args.quantize))
    bar = _bar(len(prompts), "side-by-side")
    res = side_by_side(prompts, [r.text for r in test], [r.text for r in baseline], judge, seed=args.seed,
                       progress=bar.update)
    bar.close()
    for rec, t, b in zip(res["records"], test, baseline):
        rec["responses"] = {"test": t.text, "baseline": b.text}
    res["replies"] = {"test": reply_summary(test), "baseline": reply_summary(baseline),
                      "max_new_tokens": args.max_new_tokens}
    res["baseline"] = args.baseline
    res["judge"] = args.judge_model or args.judge
    return res
