"""GPU decode benchmark (fast-inference issue, item 7): a Gemma-2B-shaped model with random bf16
weights, batch 1 decode tokens/s and the achieved fraction of the card's HBM bandwidth, plus batch
8 and 32 throughput, against Hugging Face transformers (static cache + torch.compile) in the same run.

Bandwidth: at batch 1 every decode step reads every weight once (the tied 256128 x 2048 output
projection included; the input embedding reads one row) plus the KV cache up to the current
position. bytes per token / seconds per token / the card's peak = the achieved fraction. Peaks
(dense HBM, vendor figures) are looked up by device name; pass ``--peak-gbs`` for other cards.

    python bench/bench_gpu.py --record gpu-h100          # on a CUDA machine
    python bench/bench_gpu.py --device cpu --preset tiny-gemma1 --batches 1,2 --decode-tokens 8  # smoke test

Engines: ``opengemma`` (eager), ``opengemma-compile`` (``load(compile=True)``: torch.compile with
CUDA graphs), ``transformers`` (``GemmaForCausalLM`` of the same shape, random bf16 weights,
``generate`` with ``cache_implementation="static"``, which transformers compiles itself). Decode
tokens/s for transformers is (D - 1) / (time of a D-token generate - time of a 1-token generate),
so its prefill is not counted. Only the timed loops are synchronised (one ``synchronize`` each).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import opengemma  # noqa: E402
from opengemma.api import load_config, parse_dtype  # noqa: E402
from opengemma.generate import decode_step, prefill  # noqa: E402

PEAK_GBS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
            "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0, "L40S": 864.0, "L4": 300.0,
            "A10G": 600.0, "RTX 4090": 1008.0}


def peak_gbs(device: torch.device, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "--peak-gbs"
    if device.type != "cuda":
        return None, "not a GPU"
    name = torch.cuda.get_device_name(device)
    for key, gbs in PEAK_GBS.items():  # most specific names first
        if key in name:
            return gbs, name
    return None, f"{name} (unknown peak: pass --peak-gbs)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bytes_per_token(model, batch: int, context: int) -> float:
    """Weights read once per step plus the KV cache read at ``context`` positions (per row)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config
    emb = model.embed.weight
    weights -= emb.numel() * emb.element_size()  # the gather reads B rows; the head reads it all
    weights += emb.numel() * emb.element_size() + batch * cfg.d_model * emb.element_size()
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * context * emb.element_size() * batch
    return float(weights + kv)


def run_opengemma(args, device, batch: int, compile: bool) -> dict:
    g = opengemma.load(args.preset, dtype=args.dtype, device=str(device), compile=compile)
    P, D = args.prompt_tokens, args.decode_tokens
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, g.config.vocab_size, (P,), generator=gen).tolist() for _ in range(batch)]
    cache = g.model.make_cache(batch, P + D + 8)
    tok = torch.zeros((batch, 1), dtype=torch.long, device=device)
    pos = torch.zeros((batch, 1), dtype=torch.long, device=device)
    with torch.inference_mode():
        t = time.perf_counter()
        logits = prefill(g.model, cache, prompts)
        sync(device)
        prefill_s = time.perf_counter() - t
        for i in range(args.warmup):  # compiles / captures graphs; the cache rows are rewritten below
            tok.copy_(logits.argmax(-1, keepdim=True))
            pos.fill_(P + i)
            logits = decode_step(g.model, tok, pos, cache)
        sync(device)
        t = time.perf_counter()
        for i in range(D):
            tok.copy_(logits.argmax(-1, keepdim=True))  # greedy on the device: no host sync per step
            pos.fill_(P + i)
            logits = decode_step(g.model, tok, pos, cache)
        sync(device)
        dt = time.perf_counter() - t
    out = {"batch": batch, "prefill_s": prefill_s, "decode_s": dt, "tokens_per_s": batch * D / dt,
           "ms_per_step": dt / D * 1e3, "bytes_per_step": bytes_per_token(g.model, batch, P + D // 2)}
    if compile:
        out["compile_error"] = getattr(g.model.compiled_decode, "error", None)
    return out


def run_transformers(args, device, batch: int) -> dict:
    import transformers

    cfg = load_config(args.preset)
    hf_cfg = transformers.GemmaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                                      intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
                                      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                                      head_dim=cfg.head_dim, max_position_embeddings=cfg.context_length,
                                      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base,
                                      hidden_activation="gelu_pytorch_tanh")
    dtype = parse_dtype(args.dtype, device)
    with torch.device(device):
        model = transformers.GemmaForCausalLM(hf_cfg).to(dtype).eval()
    P, D = args.prompt_tokens, args.decode_tokens
    ids = torch.randint(3, cfg.vocab_size, (batch, P), generator=torch.Generator().manual_seed(0)).to(device)

    def gen(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static")
        sync(device)
        return time.perf_counter() - t

    with torch.inference_mode():
        for _ in range(2):  # compile and warm up both lengths
            gen(1), gen(D)
        t1, tD = min(gen(1) for _ in range(3)), min(gen(D) for _ in range(3))
    dt = tD - t1
    return {"batch": batch, "decode_s": dt, "tokens_per_s": batch * (D - 1) / dt, "ms_per_step": dt / (D - 1) * 1e3,
            "transformers": transformers.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="gemma-2b", help="model shape (random weights)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:1, ... (cpu only for a smoke test)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (compiles, captures graphs)")
    p.add_argument("--engines", default="opengemma,opengemma-compile,transformers")
    p.add_argument("--peak-gbs", type=float, default=None, help="the card's peak memory bandwidth in GB/s")
    p.add_argument("--record", metavar="NAME", help="write bench/results/NAME.json and NAME.md")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    peak, peak_src = peak_gbs(device, args.peak_gbs)
    batches = [int(b) for b in args.batches.split(",")]
    engines = [e for e in args.engines.split(",") if e]
    results: dict[str, list[dict]] = {}
    for engine in engines:
        results[engine] = []
        for b in batches:
            try:
                r = run_transformers(args, device, b) if engine == "transformers" else \
                    run_opengemma(args, device, b, compile=engine == "opengemma-compile")
            except Exception as e:  # one engine failing must not lose the others' figures
                r = {"batch": b, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            if peak and "bytes_per_step" in r:
                r["hbm_fraction"] = r["bytes_per_step"] / (r["ms_per_step"] / 1e3) / (peak * 1e9)
            results[engine].append(r)
            print(engine, json.dumps(r), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    head = "| engine | batch | tokens/s | ms per step | bytes per step (GB) | fraction of peak bandwidth |"
    lines = [head, "|---|---|---|---|---|---|"]
    for engine, rows in results.items():
        for r in rows:
            if "error" in r:
                lines.append(f"| {engine} | {r['batch']} | error: {r['error']} | | | |")
                continue
            gb = f"{r['bytes_per_step'] / 1e9:.2f}" if "bytes_per_step" in r else ""
            frac = f"{r['hbm_fraction']:.0%}" if "hbm_fraction" in r else ""
            lines.append(f"| {engine} | {r['batch']} | {r['tokens_per_s']:,.1f} | {r['ms_per_step']:.2f} | {gb} | {frac} |")
    table = "\n".join(lines)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{dev_name}; {args.preset} random {args.dtype}; prompt {args.prompt_tokens}, decode {args.decode_tokens}; "
          f"peak {peak or '?'} GB/s ({peak_src})\n\n{table}")
    if args.record:
        out = Path(__file__).resolve().parent / "results"
        date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        meta = {"date": date, "device": dev_name, "torch": torch.__version__, "peak_gbs": peak, "args": vars(args)}
        (out / f"{args.record}.json").write_text(json.dumps({**meta, "results": results}, indent=1) + "\n")
        (out / f"{args.record}.md").write_text(f"# bench_gpu: {args.record}\n\n- date: {date}\n- device: {dev_name}, "
                                               f"torch {torch.__version__}, peak {peak} GB/s ({peak_src})\n- command: "
                                               f"`python {' '.join(sys.argv)}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
