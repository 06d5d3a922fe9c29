"""Greedy text of the default mode (``opengemma.load()``: mixed, bf16, native kernels and block where
the CPU allows; plain decoding) against fp32's (``quantize="none"``) on the inference bench's 4 chat
prompts, 128 tokens each: how many tokens agree before the texts part, and fp32's top-two logit gap
where they do (issue 19: "greedy text equal to fp32's except at near-ties").

    python bench/greedy_vs_fp32.py
"""

import torch
from inference_engines import CHAT_PROMPTS

import opengemma
from opengemma.chat import format_chat
from opengemma.generate import GenerationConfig, generate_tokens

torch.set_num_threads(2)
ref = opengemma.load(dtype="float32", quantize="none")
dft = opengemma.load()
cfg = GenerationConfig(max_new_tokens=128, temperature=0.0)
tot_eq = 0
for p in CHAT_PROMPTS:
    ids = format_chat(ref.tokenizer, [{"role": "user", "content": p}]).ids
    a = [t[0] for t in generate_tokens(ref.model, [ids], cfg)]
    b = [t[0] for t in generate_tokens(dft.model, [ids], cfg)]
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    gap = None
    if n < min(len(a), len(b)):
        with torch.inference_mode():
            lo = ref.model(torch.tensor([ids + a[:n]]))[0, -1].float()
        top = lo.topk(2).values
        gap = (top[0] - top[1]).item()
    tot_eq += n
    print(f"{p[:40]!r}: equal for {n} of {len(a)} tokens" + (f"; fp32's top-two gap at the parting: {gap:.3f}" if gap is not None else ""))
print("total equal before parting:", tot_eq)
