"""Pretraining as ``opengemma train pretrain`` runs it: the model (a preset at random init, or a
checkpoint to continue from), its tokenizer, the rows (a prepared mixture or a small file packed
on the fly), validation on held-out rows with a sample from a fixed prompt, MFU, and the one loop.

Report section "Pretraining": next-token prediction over packed documents, a staged mixture of
sources (more high-quality data late in training), and monitoring of the loss per source.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import OpenGemmaError
from . import parallel
from .config import TrainConfig
from .data import PackedFile, RowBatches, collate, lm_loss
from .loop import fit
from .state import Checkpointer
from .metrics import flops_per_token, peak_flops, plot

KIND = "pretrain"


def check_data(data: Path) -> None:
    if not data.exists():
        raise OpenGemmaError(f"{data}: no such data file or directory")
    if data.is_dir() and not (data / "manifest.json").is_file():
        raise OpenGemmaError(f"{data}: not a prepared data directory (no manifest.json; "
                             "see `opengemma data prepare`)")


def load_tokenizer(args, data: Path):
    from ..tokenizer import Tokenizer

    path = Path(args.tokenizer) if args.tokenizer else (data / "tokenizer.model" if data.is_dir() else None)
    if path is None:
        return None
    if not path.is_file():
        raise OpenGemmaError(f"{path}: no such tokenizer file")
    return Tokenizer.from_file(path)


def build(model_spec: str, tokenizer, seed: int, device):
    """(model on ``device``, tokenizer): a preset at seeded random init, resized to the tokenizer's
    vocabulary, or a checkpoint's weights (whose vocabulary must then be the tokenizer's)."""
    from ..checkpoints.resolve import load_tokenizer as model_tokenizer
    from ..checkpoints.resolve import read_config, resolve
    from ..model import build_model

    src = resolve(model_spec)
    config = read_config(src)
    if src.kind == "preset":
        tok = tokenizer or model_tokenizer(src, config)
        if tok.vocab_size != config.vocab_size:
            # The tokenizer decides the vocabulary; the preset keeps its other dimensions.
            config = config.replace(vocab_size=tok.vocab_size, name=f"{config.name}-v{tok.vocab_size}")
        model = build_model(config, device=device, dtype=torch.float32)
        model.init_weights(torch.Generator(device=device).manual_seed(seed))
        return model, tok, {"preset": src.name}
    from ..api import load

    g = load(model_spec, dtype="float32", device=device)
    tok = tokenizer or g.tokenizer
    if tok.vocab_size != g.config.vocab_size:
        raise OpenGemmaError(f"--tokenizer has {tok.vocab_size} pieces but {model_spec} has a vocabulary of "
                             f"{g.config.vocab_size}")
    return g.model, tok, {"path": str(Path(src.path).resolve())}


def rows_of(data: Path, tok, seq_len: int, seed: int, val_rows: int):
    """(training row stream, held-out rows, source names) of a prepared directory or a file."""
    check_data(data)
    if data.is_dir():
        from ..data.sampler import MixtureSampler

        train = MixtureSampler(data, seq_len, seed=seed, split="train")
        try:
            held = MixtureSampler(data, seq_len, seed=seed, split="heldout")
            val = [next(held) for _ in range(val_rows)]
        except (OpenGemmaError, StopIteration):
            val = []  # no held-out documents: no validation loss
        return train, val, list(train.names)
    if tok is None:
        raise OpenGemmaError("--data FILE needs --tokenizer TOKENIZER.model (or a model with a tokenizer)")
    stream = PackedFile(data, tok, seq_len, seed)
    return stream, stream.heldout[:val_rows], [stream.name]


def make_eval_fn(val, sources, cfg: TrainConfig, mesh, tok, prompt: str, sample_tokens: int):
    """Validation loss over the held-out rows (split over dp ranks) and a greedy sample from the
    fixed prompt (on rank 0, from a plain copy of the full weights)."""
    group, dp, rank = parallel.dp_info(mesh)
    drank = parallel.dp_rank(mesh)
    loss_fn = lm_loss(sources)
    mine = val[drank::dp]

    def eval_fn(model, step):
        out = {}
        if val:
            keys = [f"loss/{s}" for s in sources]
            totals = torch.zeros(2 + 2 * len(keys), dtype=torch.float64)
            for i in range(0, len(mine), cfg.micro_batch):
                res = loss_fn(model, collate(mine[i:i + cfg.micro_batch], sources))
                parts = [res.loss_sum, res.count] + [res.metrics.get(k + s, 0.0) for k in keys for s in ("_sum", "_count")]
                totals += torch.tensor([float(x) for x in parts], dtype=torch.float64)
            if group is not None:
                dist.all_reduce(totals, group=group)
            if totals[1] > 0:
                out["val/loss"] = float(totals[0] / totals[1])
            for j, k in enumerate(keys):
                if totals[3 + 2 * j] > 0:
                    out[f"val/{k.removeprefix('loss/')}"] = float(totals[2 + 2 * j] / totals[3 + 2 * j])
        if sample_tokens and tok is not None:
            text = sample(model, tok, prompt, sample_tokens, mesh)
            if rank == 0:
                out["sample"] = text
        return out

    return eval_fn


def sample(model, tok, prompt: str, n: int, mesh) -> str:
    """A greedy continuation of ``prompt`` by a plain copy of ``model``'s full weights (every rank
    takes part in the gather; rank 0 generates)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from ..generate import GenerationConfig, generate
    from ..model import GemmaModel
    from .state import full_model_state

    state = full_model_state(model) if mesh is not None else get_model_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return ""
    dev = parallel.device_of(model)
    with torch.device(dev):
        plain = GemmaModel(model.config)
    plain.load_state_dict(state)
    ids = tok.encode(prompt, bos=True)
    with torch.autocast(dev.type, enabled=False):
        out = generate(plain.eval(), tok, [ids], GenerationConfig(max_new_tokens=n, temperature=0.0))
    return prompt + out[0].text


def pretrain(args, mesh, dev) -> None:
    from .cli import RUN_JSON, read_run_json, write_run_json

    run_dir = Path(args.out)
    data = Path(args.data)
    _, dp, rank = parallel.dp_info(mesh)
    tp = mesh["tp"].size() if mesh is not None else 1
    if args.resume and not (run_dir / RUN_JSON).is_file():
        raise OpenGemmaError(f"{run_dir}: nothing to resume (no {RUN_JSON})")
    if not args.resume and Checkpointer(run_dir).steps():
        raise OpenGemmaError(f"{run_dir} already holds checkpoints: pass --resume to continue it, "
                             "or choose a new output directory")
    check_data(data)
    tok = load_tokenizer(args, data)
    if tok is None and args.resume and (run_dir / "tokenizer.model").is_file():
        from ..tokenizer import Tokenizer

        tok = Tokenizer.from_file(run_dir / "tokenizer.model")
    torch.manual_seed(args.seed)
    model, tok, origin = build(args.model, tok, args.seed, dev)
    parallel.check_tp(model.config, tp)
    warmup = args.warmup if args.warmup is not None else max(1, args.max_steps // 50)
    cfg = TrainConfig(lr=args.lr, min_lr=args.min_lr if args.min_lr is not None else args.lr / 10,
                      warmup_steps=min(warmup, args.max_steps), schedule=args.schedule,
                      decay_steps=args.decay_steps if args.decay_steps is not None else args.max_steps // 5,
                      weight_decay=args.weight_decay, grad_clip=args.grad_clip, max_steps=args.max_steps,
                      micro_batch=args.micro_batch, global_batch=args.global_batch, seq_len=args.seq_len,
                      dtype=args.dtype, activation_checkpointing=args.activation_checkpointing,
                      compile=args.compile, seed=args.seed, deterministic=args.deterministic,
                      log_every=args.log_every, eval_every=args.eval_every, save_every=args.save_every,
                      keep_last=args.keep_last).resolved(dp)
    rows, val, sources = rows_of(data, tok, cfg.seq_len, cfg.seed, args.val_rows)
    if args.resume:
        saved = read_run_json(run_dir)
        if saved.get("model_config") != model.config.to_dict():
            raise OpenGemmaError(f"{run_dir} was trained with another model or tokenizer "
                                 f"({saved.get('model_config', {}).get('name')!r}, now {model.config.name!r})")
    elif rank == 0:
        write_run_json(run_dir, {"kind": KIND, "model": origin, "model_config": model.config.to_dict(),
                                 "tokenizer": "tokenizer.model", "data": str(data.resolve()), "sources": sources,
                                 "train": cfg.to_dict(), "dp": dp, "tp": tp, "argv": sys.argv[1:]},
                       tok.model_bytes())
    n_params = sum(p.numel() for p in model.parameters())
    parallel.parallelize(model, mesh, dtype=cfg.dtype, activation_checkpointing=cfg.activation_checkpointing,
                         compile=cfg.compile)
    source = RowBatches(rows, global_batch=cfg.global_batch, micro_batch=cfg.micro_batch,
                        rank=parallel.dp_rank(mesh), dp=dp, sources=sources)
    eval_fn = make_eval_fn(val, sources, cfg, mesh, tok, args.sample_prompt, args.sample_tokens)
    fpt = flops_per_token(model.config, cfg.seq_len)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(dev, cfg.dtype)
    banner = (f"pretraining {model.config.name} on {data} ({', '.join(sources)}): global batch {cfg.global_batch} "
              f"x {cfg.seq_len} tokens, {dp} x dp, {tp} x tp, grad accum {cfg.grad_accum}; "
              f"{fpt / 1e6:.1f} MFLOP/token (6N + attention), peak {peak / 1e12:.2f} TFLOP/s per device; "
              f"{n_params / 1e6:.1f}M parameters")
    result = fit(model, source, lm_loss(sources), cfg, run_dir, mesh=mesh, eval_fn=eval_fn, resume=args.resume,
                 tokens_per_step=cfg.global_batch * cfg.seq_len, flops_per_token=fpt, peak_flops=peak,
                 meta={"kind": KIND}, banner=banner)
    if rank == 0:
        rec = result.record
        msg = f"done: step {result.step}, loss {rec.get('loss', math.nan):.4f}"
        if "val/loss" in rec:
            msg += f", val loss {rec['val/loss']:.4f}"
        try:
            msg += f"; curves in {plot(run_dir)}"
        except OpenGemmaError as e:  # matplotlib missing
            msg += f"; no plot ({e})"
        print(msg + f"; checkpoint {result.checkpoint}", file=sys.stderr)
