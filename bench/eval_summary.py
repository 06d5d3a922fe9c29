"""Markdown summary of recorded evaluation runs (report section "Evaluation", Table 6 layout), with
the Gemma 3 270M (pretrained) model card's published figure beside ours where the card gives one
for the same task and shot count.

Usage: python bench/eval_summary.py RECORD.json [RECORD.json ...] > summary.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opengemma.eval.report import DISPLAY  # noqa: E402

# google/gemma-3-270m model card, pretrained model: (task, shots) -> score (%). Only figures the card
# states for the same task and shot count; the card does not say acc or acc_norm.
CARD_270M_PT = {("hellaswag", 10): 40.9, ("boolq", 0): 61.4, ("piqa", 0): 67.7, ("arc_easy", 0): 57.7}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Markdown table (Table 6 layout) of eval_record.py JSON files.")
    p.add_argument("records", nargs="+", metavar="RECORD.json")
    args = p.parse_args(argv)
    print("| Benchmark | metric | shots | n / full set | score (%) ± stderr | acc | acc_norm | model card | wall time | dtype |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in args.records:
        try:
            rec = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            print(f"eval_summary: cannot read {path}: {e}", file=sys.stderr)
            return 2
        for r in sorted(rec["runs"], key=lambda r: (r["task"], r["shots"])):
            m = r["metrics"]
            card = CARD_270M_PT.get((r["task"], r["shots"]))
            print(f"| {DISPLAY.get(r['task'], r['task'])} | {r['main_metric']} | {r['shots']} | {r['n']} / "
                  f"{r['n_total']} | {100 * r['value']:.1f} ± {100 * r['stderr']:.1f} | {100 * m['acc']:.1f} | "
                  f"{100 * m['acc_norm']:.1f} | {'' if card is None else f'{card:.1f}'} | {r['wall_s']:.0f} s | "
                  f"{rec.get('dtype', '?')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
