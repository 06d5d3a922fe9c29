"""The tables and the record of ``bench_inference.py``: one row per engine with ratios to the
peers, the details table, the targets met or not, and ``bench/results/NAME.{json,md}``.
Standard library only, like the rest of the parent side."""

from __future__ import annotations

import json
from pathlib import Path

from inference_engines import OWN_COLD_START, REFERENCE, SPECULATIVE, VARIANTS
from machine import BUSY_CORES

HERE = Path(__file__).resolve().parent
PEERS = ("llama.cpp", "transformers")  # the ratio columns


def agreement(ref: list[int] | None, other: list[int] | None) -> str:
    if not ref or not other:
        return "n/a"
    total = min(len(ref), len(other))
    n = next((i for i, (a, b) in enumerate(zip(ref, other)) if a != b), total)  # equal before the first diff
    return f"{n}/{total}"


def fmt(v, nd=1) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    return f"{v:,.{nd}f}"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _ids_cell(report: dict, e: str) -> str:
    """Whether the engine's own tokenizer gave the id reference's prompt (and perplexity text) ids."""
    if e == report.get("id_reference"):
        return "(reference)"
    r = report["results"][e]
    prompt, ppl = r.get("prompt_ids_match_reference"), r.get("ppl_ids_match_reference")
    if prompt is None:
        return "n/a"
    if ppl is False:
        return ("yes" if prompt else "NO") + "; perplexity text NO"
    return "yes" if prompt else "NO"


def make_table(report: dict) -> str:
    """One row per engine: speed with ratios to the peers, start-up, perplexity, agreement."""
    res = report["results"]
    S = {e: res[e]["summary"] for e in report["engines"] if "summary" in res[e]}
    ref_ids = res.get(REFERENCE, {}).get("decode_ids")
    head = ["engine", "decode tok/s", "×llama.cpp", "×transformers", "prefill tok/s", "×llama.cpp",
            "×transformers", "cold start (s)", "cold-start peak RSS (MiB)", "load (s)", "perplexity",
            f"greedy tokens agreeing with {REFERENCE} fp32", "prompt ids = opengemma's",
            "other processes' CPU, bench / cold start (cores)"]
    lines = [_md_row(head), "|" + "---|" * len(head)]
    for e in report["engines"]:
        if e not in S:
            why = f"skipped: {res[e]['skipped']}" if "skipped" in res[e] else "FAILED (see the log / JSON)"
            lines.append(_md_row([e, why] + [""] * (len(head) - 2)))
            continue
        s = S[e]

        def ratio(key: str, peer: str) -> str:
            if peer == e or peer not in S:
                return ""
            a, b = s.get(key), S[peer].get(key)
            return f"{a / b:.2f}×" if a and b else "—"

        ppl = fmt(s.get("ppl"), 2) if "ppl_error" not in res[e] else "error"
        agree = "(reference)" if e == REFERENCE else agreement(ref_ids, res[e].get("decode_ids"))
        base = SPECULATIVE.get(e)
        if base and base != REFERENCE and res.get(base, {}).get("decode_ids"):  # lossless: as its variant
            agree += f"; {agreement(res[base]['decode_ids'], res[e].get('decode_ids'))} with {base}"
        lines.append(_md_row([
            e, fmt(s["decode_tps"], 1), *(ratio("decode_tps", p) for p in PEERS),
            fmt(s["prefill_tps"], 0), *(ratio("prefill_tps", p) for p in PEERS),
            fmt(s.get("cold_s"), 2), fmt(s.get("cold_peak_rss_mib"), 0), fmt(s["load_s"], 2), ppl,
            agree, _ids_cell(report, e),
            f"{fmt(s.get('other_load_cores'), 2)} / {fmt(s.get('cold_other_load_cores'), 2)}"]))
    return "\n".join(lines)


DETAILS = (  # (summary key, header, digits): the second, smaller table
    ("import_s", "import (s)", 2),
    ("warmup_decode_s", "first decode call: prefill + 8 steps (s)", 2),
    ("prefill_ms", "prefill {P} tok, median (ms)", 1),
    ("decode_ms_per_token_median", "decode per token, median (ms)", 2),
    ("decode_ms_per_token_p90", "decode per token, p90 (ms)", 2),
    ("rss_after_load_mib", "RSS after load (MiB)", 0),
    ("peak_rss_mib", "peak RSS of the bench worker (MiB)", 0),
    ("decode_weight_mb", "weights read per token (MB)", 0),
    ("decode_gbps", "weights read (GB/s)", 1),
    ("acceptance", "speculation: drafts accepted", 2),
    ("tokens_per_forward", "speculation: tokens per forward", 2),
)


def make_details(report: dict) -> str:
    P = report["settings"]["prompt_tokens"]
    res = report["results"]
    lines = [_md_row(["engine"] + [h.format(P=P) for _, h, _ in DETAILS]), "|" + "---|" * (len(DETAILS) + 1)]
    for e in report["engines"]:
        if "summary" in res[e]:
            lines.append(_md_row([e] + [fmt(res[e]["summary"].get(k), nd) for k, _, nd in DETAILS]))
    return "\n".join(lines)


def targets(report: dict) -> list[str]:
    """For each measured opengemma variant: the targets, met or not, from the figures."""
    S = {e: r["summary"] for e, r in report["results"].items() if "summary" in r}
    ll = S.get("llama.cpp", {})
    out = []
    for e in (e for e in report["engines"] if (e in VARIANTS or e in SPECULATIVE) and e in S):
        s, parts = S[e], []

        def check(what: str, value, limit: float, higher: bool, text: str) -> None:
            if value is None:
                parts.append(f"{what}: n/a")
            else:
                ok = value >= limit if higher else value <= limit
                parts.append(f"{text}: {'met' if ok else 'NOT met'}")

        moonshot = e in SPECULATIVE  # issue 19: lossless speculation at >= 1.5x llama.cpp's decode
        for key, what, limit in (("decode_tps", "decode", 1.5 if moonshot else 1.0), ("prefill_tps", "prefill", 1.5)):
            r = s[key] / ll[key] if ll.get(key) else None
            check(f"{what} vs llama.cpp", r, limit, True, f"{what} {fmt(r, 2)}× llama.cpp (≥ {limit}×)")
        c, lc = s.get("cold_s"), ll.get("cold_s")
        r = c / lc if c and lc else None
        check("cold start vs llama.cpp", r, 1.5, False,
              f"cold start {fmt(c, 2)} s = {fmt(r, 2)}× llama.cpp's (≤ 1.5×{_floor(report, lc)})")
        a, b = s.get("cold_peak_rss_mib"), ll.get("cold_peak_rss_mib")
        r = a / b if a and b else None
        check("cold-start peak RSS vs llama.cpp", r, 2.0, False,
              f"cold-start peak RSS {fmt(a, 0)} MiB = {fmt(r, 2)}× llama.cpp's (≤ 2×)")
        met, na = sum(p.endswith(": met") for p in parts), sum(p.endswith(": n/a") for p in parts)
        out.append(f"- {e}: " + "; ".join(parts) + f" ({met}/{len(parts)} met" + (f", {na} n/a)" if na else ")"))
    return out


def _floor(report: dict, llama_cold_s: float | None) -> str:
    """The cold-start floor of a PyTorch engine, for the targets: ``import torch`` alone."""
    t = report.get("torch_import", {}).get("s")
    if t is None:
        return ""
    return f"; import torch alone: {fmt(t, 2)} s" + (f" = {fmt(t / llama_cold_s, 2)}×" if llama_cold_s else "")


def contended(report: dict, threshold: float = BUSY_CORES) -> list[str]:
    """Measurements during which other processes used more than ``threshold`` cores."""
    out = []
    for e in report["engines"]:
        summ = report["results"][e].get("summary", {})
        for key, what in (("other_load_cores", "bench"), ("cold_other_load_cores", "cold start")):
            v = summ.get(key)
            if v is not None and v > threshold:
                out.append(f"{e} {what} ({v:.2f} cores)")
    return out


RATIO_NOTE = ("Ratios are engine/peer on tokens/s (above 1: the engine is faster than llama.cpp / "
              "transformers); empty on the peer's own row or when the peer was not measured.")


def write_record(report: dict, text: str, name: str) -> tuple[Path, Path]:
    out_dir = HERE / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / f"{name}.json", out_dir / f"{name}.md"
    jpath.write_text(json.dumps(report, indent=1) + "\n")
    m, s, res = report["machine"], report["settings"], report["results"]
    notes = [f"- {e}: {res[e].get('skipped') or res[e].get('error', '').splitlines()[0]}"
             for e in report["engines"] if "summary" not in res[e]]
    peer_info = {e: res[e].get("info") for e in PEERS if e in res and res[e].get("info")}
    variants = [f"{e} = `opengemma.load({', '.join(f'{k}={v!r}' for k, v in VARIANTS[e].items())})`"
                for e in report["engines"] if e in VARIANTS]
    variants += [f"{e} = {SPECULATIVE[e]} decoding speculatively (prompt lookup, at most "
                 f"{report['settings'].get('speculate')} drafts per forward)"
                 + ("; cold start: `opengemma generate PROMPT -n 1`, the command itself" if e in OWN_COLD_START else "")
                 for e in report["engines"] if e in SPECULATIVE]
    md = [f"# bench_inference: {name}", "",
          f"- date: {report['date']}",
          f"- machine: {m['cpu']}, {m['usable_cores']} usable cores ({m['logical_cores']} logical), "
          f"{m.get('mem_total_gib', '?')} GiB RAM; {m['platform']}",
          f"- software: Python {m['python']}, torch {m['torch']}, threads {m['threads']}"
          + "".join(f"; {k} {v}" for i in peer_info.values() for k, v in i.items()),
          f"- model: {report['model']} (embedded Gemma 3 270M, Q4_K_M; transformers runs it in fp32, "
          "llama.cpp as it is)",
          "- opengemma variants: " + "; ".join(variants),
          f"- settings: batch 1, prompt {s['prompt_tokens']} tokens, decode {s['decode_tokens']} tokens greedy"
          + (" after each of the chat prompt set (inference_engines.CHAT_PROMPTS)"
             if s.get("decode_prompts") == "chat" else "") + ", "
          f"{s['prefill_reps']} prefill reps, {s['decode_reps']} decode reps, cold start "
          f"{_cold_runs_text(s['cold_runs'])}, perplexity on {s['ppl_tokens']} tokens of {s.get('ppl_source', '?')}"
          f"{', --quick' if s['quick'] else ''}",
          f"- command: `{report['command']}`",
          f"- opengemma: commit {report['git']['commit']}"
          + (" with uncommitted changes in opengemma/" if report["git"]["opengemma_uncommitted_changes"] else ""),
          f"- wall time of the whole run: {report['total_s']:.0f} s"
          + (f", of which {report['waited_idle_s']:.0f} s waiting for an idle machine (--wait-idle)"
             if report.get("waited_idle_s") else ""), "",
          text, "", RATIO_NOTE + " Raw timings (every repetition, every decode step) are in "
          f"`{jpath.name}`.", ""]
    if notes:
        md += ["Not measured:", ""] + notes + [""]
    if report["warnings"]:
        md += ["Warnings:", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    busy = contended(report)
    if busy:
        md += ["**Contended:** other processes used CPU during " + ", ".join(busy) +
               "; those figures are pessimistic.", ""]
    mpath.write_text("\n".join(md))
    return jpath, mpath


def _cold_runs_text(n: int) -> str:
    if n <= 1:
        return "1 run"
    return f"median of runs 2-{n} of {n}, engines in rounds" if n > 2 else "run 2 of 2"
