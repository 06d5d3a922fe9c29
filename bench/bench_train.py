"""Training speed and memory, side by side: opengemma's loop vs Hugging Face transformers'
``GemmaForCausalLM``.

What it measures. The same model -- a tiny Gemma config with the full 256k vocabulary (default:
``tiny-gemma1`` shape, vocab 256,000; the vocabulary is what dominates memory), the very same
initial weights (written once in opengemma's and in HF layout) -- trained on the same random
token batches with the same optimizer (AdamW, clipping at 1.0), batch, sequence length, dtype and
thread count, each engine in its own fresh process so that its peak memory is its own:

* **opengemma** -- :func:`opengemma.train.loop.fit` with :func:`~opengemma.train.losses.next_token_loss`
  (the fused, vocabulary-chunked cross-entropy that never holds the [tokens, 256k] logits);
* **transformers** -- ``model(input_ids, labels=...)`` (its cross-entropy over full logits),
  ``backward``, ``clip_grad_norm_``, ``AdamW.step``: the plain loop its Trainer runs.

Printed: training tokens/s (median over the steps after the first), peak memory (CPU: the
process's peak RSS, and the rise above the RSS after loading the model; CUDA: peak allocated),
the first step's loss of each (the same weights and data must give the same loss), and the
ratios opengemma / transformers. The issue's goal: >= 2x tokens/s at <= 1/3 of the peak memory.

    python bench/bench_train.py                          # ~1-2 minutes on 2 cores
    python bench/bench_train.py --threads 2 --steps 10 --out bench/results/train-vs-hf.json
    python bench/bench_train.py --device cuda --dtype bf16 --batch 8 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def batches(args, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (args.batch, args.seq + 1), generator=g) for _ in range(args.steps)]


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    ckpt = Path(args.ckpt)
    if args.engine == "opengemma":
        from opengemma.checkpoints import load_weights, native

        config, state = native.load(ckpt / "opengemma")
        model = load_weights(config, state, dtype=torch.float32, device=dev).train()
        del state
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ckpt / "hf", dtype=torch.float32).to(dev).train()
        config = model.config
    data = batches(args, config.vocab_size)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    base = rss_mib()
    times, losses = [], []
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    if args.engine == "opengemma":
        from opengemma.train.config import TrainConfig
        from opengemma.train.data import Batch
        from opengemma.train.loop import fit
        from opengemma.train.losses import next_token_loss
        from opengemma.train.metrics import read_records

        class Source:
            def next(self, model, step):
                t = data[step].to(dev)
                ones = torch.ones(args.batch, args.seq, dtype=torch.bool, device=dev)
                return [Batch(t[:, :-1], t[:, 1:], ones, None, None)]

            def state_dict(self):
                return {}

            def load_state_dict(self, d):
                pass

        def loss_fn(m, b):
            return next_token_loss(m, b.tokens, b.targets, b.loss_mask)

        cfg = TrainConfig(lr=1e-3, min_lr=1e-3, schedule="constant", max_steps=args.steps, micro_batch=args.batch,
                          seq_len=args.seq, dtype=args.dtype, grad_clip=1.0, weight_decay=0.1, keep_last=1)
        with tempfile.TemporaryDirectory() as run:
            fit(model, Source(), loss_fn, cfg, run, progress=False)
            recs = read_records(run)
        times = [r["step_s"] for r in recs]
        losses = [r["loss"] for r in recs]
    else:
        decay = [p for p in model.parameters() if p.ndim >= 2]
        keep = [p for p in model.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": keep, "weight_decay": 0.0}],
                                lr=1e-3, betas=(0.9, 0.95), foreach=True)
        for t in data:
            t = t.to(dev)
            t0 = time.perf_counter()
            with autocast:
                # HF shifts the labels inside its loss: T - 1 targets of the same T-token forward
                # (ours has T); both count B * T tokens per step below.
                out = model(input_ids=t[:, :-1], labels=t[:, :-1])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
            losses.append(float(out.loss))
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    tokens = args.batch * args.seq
    return {"engine": args.engine, "tokens_per_s": tokens / statistics.median(times[1:] or times),
            "step_s": times, "first_loss": losses[0], "peak_mib": peak, "base_mib": base if dev.type != "cuda" else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny-gemma1", help="opengemma preset whose shape is used (default tiny-gemma1)")
    p.add_argument("--vocab", type=int, default=256_000, help="vocabulary size (default 256,000: Gemma 1's)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--engine", choices=["opengemma", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.engine:
        print(json.dumps(worker(args)))
        return

    import torch

    from opengemma.checkpoints import hf, native
    from opengemma.config import preset
    from opengemma.model import GemmaModel

    config = preset(args.config).replace(vocab_size=args.vocab, name=f"{args.config}-v{args.vocab}")
    results = {}
    with tempfile.TemporaryDirectory() as ckpt:
        model = GemmaModel(config).init_weights(torch.Generator().manual_seed(0))
        native.save(Path(ckpt) / "opengemma", config, model.state_dict())
        hf.save(Path(ckpt) / "hf", config, model.state_dict())
        del model
        for engine in ("opengemma", "transformers"):
            cmd = [sys.executable, __file__, "--engine", engine, "--ckpt", ckpt] + [
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("engine", "ckpt", "out") and v is not None]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{engine} failed:\n{proc.stderr[-3000:]}")
            results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, theirs = results["opengemma"], results["transformers"]
    params = config.non_embedding_params + config.embedding_params
    print(f"{config.name} ({params / 1e6:.1f}M parameters, {args.vocab:,} vocab), batch {args.batch} x {args.seq}, "
          f"{args.dtype}, {args.threads} threads, {args.device}, {args.steps} steps")
    print(f"{'engine':<14}{'tokens/s':>10}{'peak MiB':>10}{'rise MiB':>10}{'1st loss':>10}")
    for r in (ours, theirs):
        print(f"{r['engine']:<14}{r['tokens_per_s']:>10,.0f}{r['peak_mib']:>10,.0f}"
              f"{r['peak_mib'] - r['base_mib']:>10,.0f}{r['first_loss']:>10.4f}")
    speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
    mem = ours["peak_mib"] / theirs["peak_mib"]
    rise = (ours["peak_mib"] - ours["base_mib"]) / max(1e-9, theirs["peak_mib"] - theirs["base_mib"])
    print(f"opengemma / transformers: tokens/s {speed:.2f}x (goal >= 2x), peak memory {mem:.2f}x, "
          f"rise above the loaded model {rise:.2f}x (goal <= 0.33x)")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("engine", "ckpt")},
                                              "config": config.to_dict(), "results": results,
                                              "ratios": {"tokens_per_s": speed, "peak": mem, "rise": rise}},
                                             indent=1) + "\n")


if __name__ == "__main__":
    main()
