"""Do chat turns end? Base vs base + adapter, greedy, default mode (--quantize auto: mixed + bf16).

python turns.py ADAPTER_DIR|none OUT.jsonl [N] : the first N (default 40) prompts of oasst's prompt
lottery (not trained on) plus three hand-written ones; cap 256 new tokens; one thread.
"""
import json, sys, time
import torch
from opengemma.generate import GenerationStats
from opengemma.process import load_for_command

torch.set_num_threads(1)
adapter, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 40
P = "/work/shared/datasets/oasst_sample/prompt_lottery_en_250_text.jsonl"
prompts = ["What is the capital of France?", "Give me two tips for sleeping better.",
           "A shop sells pens at 3 dollars each. How much do 7 pens cost?"]
prompts += [json.loads(l) for l in open(P)][:n]
g = load_for_command(None, adapter=None if adapter == "none" else adapter, quantize="auto", device="cpu")
t0 = time.time()
with open(out, "w") as f:
    for i, p in enumerate(prompts):
        st = GenerationStats()
        reply = g.chat([{"role": "user", "content": p}], max_new_tokens=256, temperature=0.0, stats=st)
        f.write(json.dumps({"i": i, "prompt": p, "reply": reply, "ended": st.stopped == 1,
                            "tokens": st.generated_tokens}) + "\n")
        f.flush()
print(f"{adapter}: {time.time() - t0:.0f} s", file=sys.stderr)
