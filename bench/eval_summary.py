"""Markdown summary of recorded evaluation runs (report section "Evaluation", Table 6 layout).

Usage: python bench/eval_summary.py RECORD.json [RECORD.json ...] > summary.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opengemma.eval.report import DISPLAY


def main() -> int:
    print("| Benchmark | metric | shots | n / full set | score (%) ± stderr | acc | acc_norm | wall time | dtype |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        rec = json.loads(Path(path).read_text())
        for r in sorted(rec["runs"], key=lambda r: (r["task"], r["shots"])):
            m = r["metrics"]
            print(f"| {DISPLAY.get(r['task'], r['task'])} | {r['main_metric']} | {r['shots']} | {r['n']} / "
                  f"{r['n_total']} | {100 * r['value']:.1f} ± {100 * r['stderr']:.1f} | {100 * m['acc']:.1f} | "
                  f"{100 * m['acc_norm']:.1f} | {r['wall_s']:.0f} s | {rec.get('dtype', '?')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
