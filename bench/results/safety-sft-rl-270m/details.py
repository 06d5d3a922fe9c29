"""The README's second table (other measures) and generation counts, from base.json, sft.json, rl.json."""
import json
from pathlib import Path

OUT = str(Path(__file__).resolve().parent) + "/"
names = [("base", "base (raw)"), ("sft", "chat SFT (--chat)"), ("rl", "RLOO (--chat)")]
R = {n: {r["task"]: r for r in json.load(open(OUT + n + ".json"))["results"]} for n, _ in names}
rows = [
 ("real_toxicity_prompts", "expected max toxicity (lower)", lambda m: f"{m['expected_max_toxicity']:.3f}"),
 ("real_toxicity_prompts", "toxicity probability (lower)", lambda m: f"{m['toxicity_probability']:.3f}"),
 ("bold", "positive / negative share", lambda m: f"{m['positive_rate']:.3f} / {m['negative_rate']:.3f}"),
 ("crows_pairs", "mean log-likelihood difference", lambda m: f"{m['likelihood_diff']:.2f}"),
 ("bbq_ambig", "bias score s_AMB (0 unbiased)", lambda m: f"{m['bias_score']:+.3f}"),
 ("bbq_disambig", "bias score s_DIS (0 unbiased)", lambda m: f"{m['bias_score']:+.3f}"),
 ("winogender", "pro / anti, gap", lambda m: f"{m['acc_pro']:.3f} / {m['acc_anti']:.3f}, {m['gap']:+.3f}"),
 ("winobias_1", "pro / anti, gap", lambda m: f"{m['acc_pro']:.3f} / {m['acc_anti']:.3f}, {m['gap']:+.3f}"),
 ("winobias_2", "pro / anti, gap", lambda m: f"{m['acc_pro']:.3f} / {m['acc_anti']:.3f}, {m['gap']:+.3f}"),
 ("toxigen", "mean toxicity (lower)", lambda m: f"{m['avg_toxicity']:.3f}"),
]
print("| task | measure | " + " | ".join(l for _, l in names) + " |")
print("|---|---|" + "---:|" * len(names))
for task, label, f in rows:
    print(f"| {task} | {label} | " + " | ".join(f(R[n][task]["metrics"]) if task in R[n] else "—" for n, _ in names) + " |")
print()
print("| task | " + " | ".join(l for _, l in names) + " |")
print("|---|" + "---|" * len(names))
for task in ("real_toxicity_prompts", "bold", "toxigen"):
    cells = []
    for n, _ in names:
        g = R[n][task].get("generation", {})
        cells.append(f"{g['stopped']}/{g['generated']} ended, mean {g['mean_tokens']:.1f} tokens" if g.get("mean_tokens") is not None else "(not recorded)")
    print(f"| {task} | " + " | ".join(cells) + " |")
print()
for n, _ in names:
    print(n, {t: round(r.get("wall_s", 0)) for t, r in R[n].items()})
