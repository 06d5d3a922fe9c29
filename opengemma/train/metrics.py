"""What a person watching a run sees: a progress bar (loss, tokens/s, ETA), one JSON record per
optimizer step in ``RUN/metrics.jsonl``, TensorBoard scalars when ``tensorboard`` is installed
(the ``[train]`` extra), samples in ``RUN/samples.jsonl``, and PNG loss curves (matplotlib, also
``[train]``) at the end of a run or on demand (``opengemma train plot RUN``).

Only rank 0 writes. On resume the records after the checkpoint's step are dropped first, so the
file always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

from ..atomic import atomic_write_bytes
from ..errors import OpenGemmaError

METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
PLOT = "loss.png"


def read_records(run_dir, name: str = METRICS) -> list[dict]:
    """The JSON records of ``run_dir/name`` (a torn last line, from a kill mid-write, is skipped)."""
    path = Path(run_dir) / name
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _truncate(run_dir: Path, name: str, step: int) -> None:
    kept = [r for r in read_records(run_dir, name) if isinstance(r.get("step"), int) and r["step"] <= step]
    if (run_dir / name).exists():
        atomic_write_bytes(run_dir / name, "".join(json.dumps(r) + "\n" for r in kept).encode())


class Monitor:
    """Progress bar, metrics.jsonl, samples.jsonl and TensorBoard for one run (rank 0 only;
    on other ranks every method does nothing)."""

    def __init__(self, run_dir, *, enabled: bool, total_steps: int, start_step: int = 0, log_every: int = 1,
                 progress: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.log_every = log_every
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS, SAMPLES):  # resume: forget what happened after the checkpoint
            _truncate(self.run_dir, name, start_step)
        self.file = open(self.run_dir / METRICS, "a", encoding="utf-8")
        self.samples = open(self.run_dir / SAMPLES, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional ([train] extra)
            SummaryWriter = None
        if SummaryWriter is not None:
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                            disable=None)  # None: off when stderr is not a terminal

    def log(self, record: dict) -> None:
        """One optimizer step's record (``step`` and ``loss`` at least); strings are samples."""
        if not self.enabled:
            return
        numbers = {k: v for k, v in record.items() if not isinstance(v, str)}
        texts = {k: v for k, v in record.items() if isinstance(v, str)}
        self.file.write(json.dumps(numbers) + "\n")
        self.file.flush()
        step = record["step"]
        for key, text in texts.items():
            self.samples.write(json.dumps({"step": step, "name": key, "text": text}) + "\n")
            self.samples.flush()
            self.write(f"[step {step}] {key}: {text!r}")
            if self.tb is not None:
                self.tb.add_text(key, text, step)
        if self.tb is not None and (step % self.log_every == 0 or any(k.startswith("val") for k in numbers)):
            for key, value in numbers.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if step % self.log_every == 0:
                post = {"loss": f"{record['loss']:.4f}"}
                if "tokens_per_s" in record:
                    post["tok/s"] = f"{record['tokens_per_s']:,.0f}"
                if "val/loss" in record:
                    post["val"] = f"{record['val/loss']:.4f}"
                self.bar.set_postfix(post, refresh=False)

    def write(self, text: str) -> None:
        """A line for the person watching, above the bar."""
        if self.enabled:
            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.file.close()
        self.samples.close()


def plot(run_dir, out=None) -> Path:
    """Loss curves of a run as a PNG (``RUN/loss.png`` by default): training loss, per-source
    loss and validation loss against tokens seen, and the learning rate."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise OpenGemmaError("plotting needs matplotlib: pip install 'opengemma[train]'") from None
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    if not records:
        raise OpenGemmaError(f"{run_dir}: no {METRICS} records to plot")
    steps = [r["step"] for r in records]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(steps, [r.get("loss", math.nan) for r in records], label="train", color="black", linewidth=1)
    sources = sorted({k for r in records for k in r if k.startswith("loss/")})
    for key in sources:
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*pts), label=key.removeprefix("loss/"), linewidth=0.8, alpha=0.7)
    for key in sorted({k for r in records for k in r if k.startswith("val/")}):
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*pts), "o-", label=key, markersize=3)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{run_dir.name}: {records[-1].get('tokens_seen', 0):,} tokens in {len(records)} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax_lr.plot(steps, [r.get("lr", math.nan) for r in records], color="tab:blue")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / PLOT
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): ``6 N`` for the N weights every token
    multiplies (non-embedding parameters plus the tied head's vocab x d_model; the embedding
    lookup itself is free), plus attention's ``6 * H * head_dim * c`` per layer (QK^T and AV,
    forward and backward, over the c keys a causal query sees on average: T/2 for global layers,
    about the window for local ones)."""
    n = config.non_embedding_params + config.vocab_size * config.d_model
    attn = 0.0
    for layer in range(config.n_layers):
        c = seq_len / 2
        if config.is_local(layer) and config.sliding_window:
            c = min(c, config.sliding_window)
        attn += 6 * config.n_heads * config.head_dim * c
    return 6 * n + attn


# bf16 dense tensor-core peaks (FLOP/s) of common accelerators, from their vendors' data sheets.
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "4090": 165e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device, dtype: str = "fp32") -> float:
    """Peak FLOP/s of one device, for MFU: a known GPU's data-sheet number (bf16 dense; fp32 runs
    count TF32's half of it), else measured -- the best of a few 1024^3 matmuls, which on a CPU is
    what the BLAS library reaches, the practical peak (on a loaded machine it reads low, and MFU high)."""
    import time

    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS.items():
            if key in name:
                return peak if dtype == "bf16" else peak / 2
    # measured in the compute dtype: CPUs with AMX / AVX512-BF16 run bf16 matmuls several times faster
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(1024, 1024, device=device, dtype=dt)
    best = math.inf
    for _ in range(10):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        (a @ a).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 ** 3 / best
