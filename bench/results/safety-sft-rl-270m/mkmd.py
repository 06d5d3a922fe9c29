"""How base.json, sft.json and rl.json here were made from the raw `opengemma eval` outputs (issue 18).

    python mkmd.py RAW_DIR    # RAW_DIR: base.json (subset run), sft.json, sft-toxigen.json, rl.json

base.json = the base model's subset run plus, for the tasks it did not run, the full base runs of
Table 8 (../safety-gemma3-270m-cpu-bf16-part1.json, -part2.json: the same whole local sets).
sft.json = the SFT run's nine tasks plus its ToxiGen run. Per-item logs are kept for the generation
tasks only.
"""
import copy
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent
GEN = {"real_toxicity_prompts", "bold", "toxigen"}
ORDER = ["real_toxicity_prompts", "bold", "crows_pairs", "bbq_ambig", "bbq_disambig", "winogender",
         "truthfulqa_mc2", "winobias_1", "winobias_2", "toxigen"]


def strip(d: dict) -> dict:
    d = copy.deepcopy(d)
    for r in d["results"]:
        if r["task"] not in GEN:
            r.pop("log", None)
    return d


def main(raw: Path) -> None:
    parts = {"crows_pairs": "safety-gemma3-270m-cpu-bf16-part1.json"}
    full = {}
    for f in ("safety-gemma3-270m-cpu-bf16-part1.json", "safety-gemma3-270m-cpu-bf16-part2.json"):
        for r in json.loads((RESULTS / f).read_text())["results"]:
            full[r["task"]] = r
    base_sub = json.loads((raw / "base.json").read_text())
    have = {r["task"]: r for r in base_sub["results"]}
    merged = dict(base_sub)
    merged["results"] = [have.get(t) or full[t] for t in ORDER]
    merged["merged_from"] = {
        t: "the base subset run" if t in have else
        f"the full base run, {parts.get(t, 'safety-gemma3-270m-cpu-bf16-part2.json')} (the same items)"
        for t in ORDER}
    (HERE / "base.json").write_text(json.dumps(strip(merged), indent=1))
    for name in ("sft", "rl"):
        d = json.loads((raw / f"{name}.json").read_text())
        if name == "sft":  # ToxiGen ran apart (the first run had no ToxiGen limit and was stopped in it)
            tox = json.loads((raw / "sft-toxigen.json").read_text())
            d["results"] = [r for r in d["results"] if r["task"] != "toxigen"] + tox["results"]
            d["merged_from"] = {"toxigen": "sft-toxigen run (same settings, --tasks toxigen --limit toxigen=310)"}
        (HERE / f"{name}.json").write_text(json.dumps(strip(d), indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
