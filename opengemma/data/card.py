"""The data card of a prepared directory: ``report.json`` (everything, machine-readable) and
``report.md`` (the same for people).

Per source and per step: documents and bytes in and out (tokens are counted where the text is
tokenized; earlier steps show bytes and an estimate in tokens from the source's measured bytes per
token), what each filter removed with a few examples, exact and near duplicates, contamination
hits per benchmark (with the matching n-gram), personal data found by severity and kind, the
held-out split, bytes per token; per stage the target token shares, the tokens available and how
many epochs of each source a stage needs; wall time and throughput (MB/s per core).
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

from .shards import _json_bytes, write_atomic


def _merge_steps(acc: dict, steps: dict) -> None:
    for name, st in steps.items():
        a = acc.setdefault(name, {"docs_in": 0, "docs_out": 0, "bytes_in": 0, "bytes_out": 0, "removed": Counter(),
                                  "examples": {}})
        for key in ("docs_in", "docs_out", "bytes_in", "bytes_out"):
            a[key] += st[key]
        a["removed"].update(st["removed"])
        for reason, ex in st["examples"].items():
            have = a["examples"].setdefault(reason, [])
            have += ex[: max(0, 3 - len(have))]


def _load(folder: Path) -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _near_examples(work: Path, chunks) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    folder = work / "minhash" / "removed"
    for path in sorted(folder.glob("*.jsonl.gz")) if folder.is_dir() else []:
        try:
            source = chunks[int(path.name.split(".")[0])].source
        except (ValueError, IndexError):
            continue
        have = out.setdefault(source, [])
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if len(have) >= 3:
                    break
                text = " ".join(json.loads(line).get("text", "").split())
                have.append(text[:240] + ("..." if len(text) > 240 else ""))
    return out


def build(mix, out: Path, chunks, sources: dict, tokenizer: dict, decontam_tasks: list[dict],
          quality: dict | None, timing: dict) -> dict:
    work = out / "work"
    per_source: dict[str, dict] = {}
    for st in _load(work / "stats" / "filter"):
        s = per_source.setdefault(st["source"], {"steps": {}, "contamination": {}, "pii": Counter(),
                                                 "pii_kinds": Counter(), "scores": {}})
        _merge_steps(s["steps"], st["steps"])
        for task, c in st["contamination"].items():
            have = s["contamination"].setdefault(task, {"docs": 0, "items": set(), "examples": []})
            have["docs"] += c["docs"]
            have["items"].update(c["items"])
            have["examples"] += c["examples"][: max(0, 3 - len(have["examples"]))]
        s["pii"].update({k: v for k, v in st["pii"].items() if k != "by_kind"})
        s["pii_kinds"].update(st["pii"]["by_kind"])
        for k, hist in st.get("scores", {}).items():
            s["scores"][k] = [a + b for a, b in zip(s["scores"].get(k, [0] * len(hist)), hist)]
    tok_stats: dict[str, Counter] = {}
    for st in _load(work / "stats" / "tokenize"):
        tok_stats.setdefault(st["source"], Counter()).update({k: v for k, v in st.items() if k != "source"})
    near_ex = _near_examples(work, chunks)
    report_sources = {}
    bytes_in_total = 0
    for name in mix.sources:
        s = per_source.get(name, {"steps": {}, "contamination": {}, "pii": Counter(), "pii_kinds": Counter(),
                                  "scores": {}})
        t = tok_stats.get(name, Counter())
        bpt = t["text_bytes"] / t["text_tokens"] if t["text_tokens"] else None
        steps = {}
        for step, a in s["steps"].items():
            steps[step] = {**{k: a[k] for k in ("docs_in", "docs_out", "bytes_in", "bytes_out")},
                           "removed": dict(a["removed"]), "examples": a["examples"]}
            if bpt:
                steps[step]["tokens_in_est"] = round(a["bytes_in"] / bpt)
                steps[step]["tokens_out_est"] = round(a["bytes_out"] / bpt)
        filtered = steps.get("pii", {}).get("docs_out", 0)
        exact = t["exact_removed"]
        near = max(filtered - exact - t["docs_in"], 0)
        steps["exact_dedup"] = {"docs_in": filtered, "docs_out": filtered - exact, "removed": {"exact_duplicate": exact}}
        steps["near_dedup"] = {"docs_in": filtered - exact, "docs_out": t["docs_in"],
                               "removed": {"near_duplicate": near}, "examples": {"near_duplicate": near_ex.get(name, [])}}
        steps["tokenize"] = {"docs_in": t["docs_in"], "train_docs": t["shards_docs"], "train_tokens": t["shards_tokens"],
                             "heldout_docs": t["heldout_docs"], "heldout_tokens": t["heldout_tokens"],
                             "bytes": t["text_bytes"]}
        bytes_in_total += steps.get("read", {}).get("bytes_in", 0)
        report_sources[name] = {
            "files": [str(f) for f in mix.sources[name].files], "steps": steps,
            "contamination": {k: {"docs": v["docs"], "items": len(v["items"]), "examples": v["examples"]}
                              for k, v in sorted(s["contamination"].items())},
            "pii": {**dict(s["pii"]), "by_kind": dict(s["pii_kinds"])}, "score_histograms": s["scores"],
            "bytes_per_token": bpt, "tokens": sources[name]["tokens"], "docs": sources[name]["docs"],
            "heldout_tokens": sources[name]["heldout_tokens"]}
    stages = []
    for stage in mix.stages:
        rows = {}
        for src, w in stage.weights.items():
            target = w * stage.tokens
            avail = sources[src]["tokens"]
            rows[src] = {"weight": w, "target_tokens": round(target), "available_tokens": avail,
                         "epochs": (target / avail) if avail else None}
        stages.append({**stage.as_dict(), "sources": rows})
    wall = timing["wall_s"]
    staged = sum(timing["stages_s"].values())  # the streaming stages, without the one-off index/model builds
    contamination_total: Counter = Counter()
    for s in report_sources.values():
        for task, c in s["contamination"].items():
            contamination_total[task] += c["docs"]
    return {"mixture": {"name": mix.name, "file": str(mix.path), "sha256": mix.sha256}, "tokenizer": tokenizer,
            "sources": report_sources, "stages": stages, "pii_policy": mix.pii, "dedup": mix.dedup,
            "decontamination": {"n": mix.decontam["n"], "min_words": mix.decontam["min_words"],
                                "roots": mix.decontam["roots"], "benchmarks": decontam_tasks,
                                "docs_removed_per_benchmark": dict(contamination_total)} if mix.decontam["enabled"]
            else None,
            "quality_model": quality,
            "toxicity_scorer": _toxicity_name(mix),
            "performance": {**timing, "input_bytes": bytes_in_total,
                            "mb_per_s": bytes_in_total / 1e6 / wall if wall else None,
                            "mb_per_s_per_core": bytes_in_total / 1e6 / wall / timing["workers"] if wall else None,
                            "stages_total_s": staged,
                            "stages_mb_per_s_per_core": bytes_in_total / 1e6 / staged / timing["workers"]
                            if staged else None}}


def _toxicity_name(mix) -> str | None:
    if not any(s.toxicity is not None for s in mix.sources.values()):
        return None
    from . import toxicity

    return toxicity.NAME


def write(out: Path, report: dict) -> None:
    write_atomic(out / "report.json", _json_bytes(report))
    write_atomic(out / "report.md", render(report).encode("utf-8"))


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else (f"{x:.3f}" if isinstance(x, float) else str(x))


def render(r: dict) -> str:
    """report.md from the report dict."""
    p = r["performance"]
    lines = [f"# Data card: {r['mixture']['name']}", "",
             f"Mixture `{r['mixture']['file']}` (sha256 `{r['mixture']['sha256'][:16]}...`); tokenizer "
             f"`{r['tokenizer'].get('source')}` ({r['tokenizer']['vocab_size']:,} pieces).",
             f"Wall time {p['wall_s']:.1f} s on {p['workers']} worker(s); input {p['input_bytes'] / 1e6:.1f} MB; "
             f"{_n(p['mb_per_s'])} MB/s, {_n(p['mb_per_s_per_core'])} MB/s per core overall; the streaming stages "
             f"alone ({p['stages_total_s']:.1f} s, without building the decontamination index and quality model) "
             f"{_n(p['stages_mb_per_s_per_core'])} MB/s per core. "
             "Stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in p["stages_s"].items()) + ".", "",
             "## Sources", "",
             "| source | docs in | docs out | tokens (train) | tokens (held-out) | bytes/token |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, s in r["sources"].items():
        read = s["steps"].get("read", {})
        lines.append(f"| {name} | {_n(read.get('docs_in', 0))} | {_n(s['docs'])} | {_n(s['tokens'])} | "
                     f"{_n(s['heldout_tokens'])} | {_n(s['bytes_per_token'])} |")
    for name, s in r["sources"].items():
        lines += ["", f"### {name}", "", "| step | docs in | docs out | MB in | MB out | ≈tokens out | removed |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for step, st in s["steps"].items():
            if step == "tokenize":
                continue
            removed = ", ".join(f"{k} {v:,}" for k, v in st.get("removed", {}).items() if v) or "-"
            mb_in = f"{st['bytes_in'] / 1e6:.2f}" if "bytes_in" in st else ""
            mb_out = f"{st['bytes_out'] / 1e6:.2f}" if "bytes_out" in st else ""
            lines.append(f"| {step} | {_n(st['docs_in'])} | {_n(st['docs_out'])} | {mb_in} | {mb_out} | "
                         f"{_n(st.get('tokens_out_est', ''))} | {removed} |")
        t = s["steps"]["tokenize"]
        lines.append(f"\nTokenized: {t['train_docs']:,} training documents ({t['train_tokens']:,} tokens with BOS/EOS), "
                     f"{t['heldout_docs']:,} held out ({t['heldout_tokens']:,} tokens).")
        examples = [(step, reason, ex) for step, st in s["steps"].items()
                    for reason, exs in st.get("examples", {}).items() for ex in exs]
        if examples:
            lines += ["", "Examples of removed documents:", ""]
            lines += [f"* {step} / {reason}: {ex}" for step, reason, ex in examples]
        if s["pii"]:
            kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(s["pii"]["by_kind"].items())) or "none"
            lines.append(f"\nPersonal data: {s['pii'].get('docs_sensitive', 0):,} documents with sensitive data, "
                         f"{s['pii'].get('docs_personal', 0):,} with personal data only; matches by kind: {kinds}; "
                         f"{s['pii'].get('docs_dropped', 0):,} documents dropped, "
                         f"{s['pii'].get('spans_redacted', 0):,} spans redacted.")
        if s["contamination"]:
            lines += ["", "Contamination (documents removed, benchmark items matched, an example n-gram):", ""]
            for task, c in s["contamination"].items():
                ex = c["examples"][0] if c["examples"] else {}
                lines.append(f"* {task}: {c['docs']:,} documents, {c['items']:,} items; e.g. doc `{ex.get('doc')}` "
                             f"item {ex.get('item')}: \"{ex.get('ngram')}\"")
    d = r.get("decontamination")
    if d:
        lines += ["", "## Decontamination", "",
                  f"{d['n']}-gram overlap (whole item if shorter, at least {d['min_words']} words) against every task "
                  f"of `opengemma eval` found under {', '.join(d['roots'])}.", "",
                  "| benchmark | items indexed | n-grams | items too short | documents removed | note |",
                  "|---|---:|---:|---:|---:|---|"]
        for b in d["benchmarks"]:
            note = f"data missing: {b['missing']}" if b["missing"] else ""
            lines.append(f"| {b['name']} | {b['items']:,} | {b['grams']:,} | {b['skipped_short']:,} | "
                         f"{d['docs_removed_per_benchmark'].get(b['name'], 0):,} | {note} |")
    q = r.get("quality_model")
    if q:
        lines += ["", "## Quality classifier", "",
                  f"Linear model (hashed word 1-2-grams, logistic regression), curated = {q.get('positive')}, "
                  f"web = {q.get('negative')}: held-out precision {_n(q.get('heldout_precision'))}, recall "
                  f"{_n(q.get('heldout_recall'))}, F1 {_n(q.get('heldout_f1'))} on {q.get('heldout_windows')} "
                  "held-out windows."]
    if r.get("toxicity_scorer"):
        lines += ["", f"Toxicity scorer: {r['toxicity_scorer']} (offline; not the Perspective API)."]
    lines += ["", "## Stages", ""]
    for st in r["stages"]:
        ramp = f", ramp over the first {st['ramp_tokens']:,} tokens" if st.get("ramp_tokens") else ""
        lines += [f"**{st['name']}**: {st['tokens']:,} tokens{ramp}", "",
                  "| source | share | target tokens | available tokens | epochs |", "|---|---:|---:|---:|---:|"]
        for src, row in st["sources"].items():
            lines.append(f"| {src} | {row['weight']:.3f} | {row['target_tokens']:,} | {row['available_tokens']:,} | "
                         f"{_n(row['epochs'])} |")
        lines.append("")
    return "\n".join(lines) + "\n"
