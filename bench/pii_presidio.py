"""Precision and recall of the PII detector (:mod:`opengemma.data.pii`) per entity on Microsoft
Presidio's synthetic sentences with gold spans (``../shared/datasets/pii_presidio_synth``).

A gold span counts as found when a finding of the mapped kind overlaps it (lenient, as Presidio's
own evaluator's token-level scores); ``exact`` also needs the same start and end. A finding is a
true positive when it overlaps a gold span of its kind. Gold entities the detector does not
cover (PERSON, GPE, DATE_TIME, ...) are not scored; findings that overlap them count as false
positives of the finding's kind.

    python bench/pii_presidio.py [--data PATH] [--out bench/results/pii.md]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from opengemma.data import pii

GOLD = {"CREDIT_CARD": "credit_card", "US_SSN": "ssn", "IBAN_CODE": "iban", "EMAIL_ADDRESS": "email",
        "PHONE_NUMBER": "phone", "STREET_ADDRESS": "address", "IP_ADDRESS": "ip"}
DEFAULT = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "pii_presidio_synth" / "synth_dataset_v2.jsonl"


def evaluate(records):
    tp_gold, exact, gold_n, tp_pred, pred_n = Counter(), Counter(), Counter(), Counter(), Counter()
    misses: dict[str, list[str]] = {}
    false: dict[str, list[str]] = {}
    for rec in records:
        text = rec["full_text"]
        found = pii.scan(text)
        gold = [(GOLD[s["entity_type"]], s["start_position"], s["end_position"]) for s in rec["spans"]
                if s["entity_type"] in GOLD]
        for kind, a, b in gold:
            gold_n[kind] += 1
            hit = [f for f in found if f.kind == kind and f.start < b and a < f.end]
            if hit:
                tp_gold[kind] += 1
                exact[kind] += any(f.start == a and f.end == b for f in hit)
            else:
                misses.setdefault(kind, []).append(text[a:b])
        for f in found:
            pred_n[f.kind] += 1
            if any(k == f.kind and f.start < b and a < f.end for k, a, b in gold):
                tp_pred[f.kind] += 1
            else:
                false.setdefault(f.kind, []).append(f.text)
    rows = []
    for kind in GOLD.values():
        p = tp_pred[kind] / pred_n[kind] if pred_n[kind] else float("nan")
        r = tp_gold[kind] / gold_n[kind] if gold_n[kind] else float("nan")
        rows.append({"kind": kind, "severity": pii.SEVERITY[kind], "gold": gold_n[kind], "found": tp_gold[kind],
                     "exact": exact[kind], "predicted": pred_n[kind], "precision": p, "recall": r,
                     "misses": misses.get(kind, [])[:3], "false_positives": false.get(kind, [])[:3]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    records = [json.loads(line) for line in args.data.open(encoding="utf-8") if line.strip()]
    t0 = time.perf_counter()
    rows = evaluate(records)
    dt = time.perf_counter() - t0
    lines = [f"# PII detector on pii_presidio_synth ({len(records)} sentences)", "",
             "Detector: `opengemma.data.pii` (regular expressions + Luhn / SSN / IBAN / IPv6 checks). "
             "Lenient match: a finding overlapping a gold span of the same kind. "
             f"Scan time {dt:.2f} s on one core.", "",
             "| kind | severity | gold | recall | exact-span recall | precision | predicted |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['severity']} | {r['gold']} | {r['recall']:.3f} | "
                     f"{r['exact'] / max(r['gold'], 1):.3f} | {r['precision']:.3f} | {r['predicted']} |")
    lines += ["", "Notes: Presidio's STREET_ADDRESS spans are often fragments (a bare ZIP code, \"Suite 501\") or "
              "whole multi-line addresses with city and country, and many are non-US layouts; the detector "
              "finds street lines (number + name + street word, or European name-street + number) with no "
              "false positives. Phone layouts without a country code, area-code brackets, North American "
              "grouping or a trunk 0 are left alone on purpose: on real web and math text such shapes are "
              "mostly arithmetic, year ranges and statute numbers.", "",
              "Examples of misses and false positives:", ""]
    for r in rows:
        lines.append(f"* {r['kind']}: missed {r['misses']!r}; false {r['false_positives']!r}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
