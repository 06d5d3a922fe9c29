"""Heuristic filters: ours (opengemma.data.filters) against datatrove's blocks of the same rules,
on the same documents, one core each: keep/drop agreement per filter (the issue asks >= 99%) and
throughput side by side, with the ratio.

    python bench/bench_data.py [--data FILE.jsonl ...] [--limit N] [--out bench/results/data-filters.md]

Defaults to the shared C4 slice (../shared/datasets/pretrain_web_c4_sample, 1,300 documents).
datatrove's filters split words and sentences with spaCy's English tokenizer; ours with one
regular expression that follows it (see opengemma/data/filters.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from opengemma.data import filters as F

C4 = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "pretrain_web_c4_sample"


def _datatrove_pairs():
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    return [("gopher_quality", GopherQualityFilter(), F.GopherQuality()),
            ("gopher_repetition", GopherRepetitionFilter(), F.GopherRepetition()),
            ("c4", C4QualityFilter(), F.C4Quality())]


def run(docs: list[str]) -> list[dict]:
    from datatrove.data import Document
    from loguru import logger

    logger.remove()  # datatrove's per-document log lines would dominate the timing
    rows = []
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    for name, theirs, ours in _datatrove_pairs():
        theirs.filter(Document(text=docs[0], id="warmup"))  # load spaCy outside the timing
        t0 = time.perf_counter()
        keep_dt = []
        for i, text in enumerate(docs):
            r = theirs.filter(Document(text=text, id=str(i)))
            keep_dt.append(r if isinstance(r, bool) else r[0])
        t_dt = time.perf_counter() - t0
        t0 = time.perf_counter()
        keep_ours = [ours(text)[0] is not None for text in docs]
        t_ours = time.perf_counter() - t0
        agree = sum(a == b for a, b in zip(keep_dt, keep_ours))
        rows.append({"filter": name, "docs": len(docs), "agree": agree, "agreement": agree / len(docs),
                     "kept_datatrove": sum(keep_dt), "kept_ours": sum(keep_ours),
                     "datatrove_mb_s": mb / t_dt, "ours_mb_s": mb / t_ours, "speedup": t_dt / t_ours,
                     "disagree": [i for i, (a, b) in enumerate(zip(keep_dt, keep_ours)) if a != b][:10]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", type=Path,
                    default=[C4 / "c4_en_train_first1000.jsonl", C4 / "c4_demo.jsonl"])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    docs = [json.loads(line)["text"] for p in args.data for line in p.open(encoding="utf-8") if line.strip()]
    docs = docs[: args.limit] if args.limit else docs
    rows = run(docs)
    import datatrove

    lines = [f"# Heuristic filters: opengemma vs datatrove {getattr(datatrove, '__version__', '')}".rstrip(), "",
             f"{len(docs):,} documents ({sum(len(d.encode()) for d in docs) / 1e6:.2f} MB) of "
             f"{', '.join(p.name for p in args.data)}; one core each, same process, same documents.", "",
             "| filter | agreement | kept (datatrove) | kept (ours) | datatrove MB/s | ours MB/s | speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['filter']} | {r['agree']}/{r['docs']} = {r['agreement']:.2%} | {r['kept_datatrove']} | "
                     f"{r['kept_ours']} | {r['datatrove_mb_s']:.3f} | {r['ours_mb_s']:.3f} | {r['speedup']:.1f}x |")
    lines += ["", "Documents where the decisions differ (indices): " +
              "; ".join(f"{r['filter']}: {r['disagree']}" for r in rows)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
