"""``opengemma train``: pretraining (``pretrain``), exporting a run's weights (``export``) and
plotting its loss curves (``plot``); instruction tuning's verbs (``sft``, ``rm``, ``rl``) register
here too, from :mod:`opengemma.train.tune_cli`.

One process: ``opengemma train pretrain --model PRESET --data FILE.jsonl --out RUN``. Several:
``torchrun --nproc-per-node K -m opengemma train pretrain --dp D --tp T ...`` (D x T = K); the
global batch stays what ``--global-batch`` says whatever K is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import float_range, int_range
from ..errors import OpenGemmaError

RUN_JSON = "run.json"
_pos = int_range(1)
_nonneg = int_range(0)


def add_train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="pretrain a model, export or plot a run",
                       description="Train Gemma models: `pretrain` from scratch on a prepared data directory or a "
                       "small file, `export` a run's last checkpoint as a model directory, `plot` its loss curves.")
    verbs = p.add_subparsers(dest="train_command", metavar="VERB", parser_class=type(p))
    verbs.required = True

    t = verbs.add_parser("pretrain", help="pretrain a model (one process, or several under torchrun)",
                         description="Pretrain MODEL (a preset, random init; or a checkpoint directory to continue "
                         "from) on DATA: a directory from `opengemma data prepare` (its staged mixture of sources) or "
                         "a .jsonl/.txt file tokenized and packed on the fly. Writes RUN/run.json, "
                         "RUN/metrics.jsonl (a record per step), RUN/samples.jsonl, RUN/checkpoints/step_N "
                         "(torch.distributed.checkpoint), TensorBoard logs and RUN/loss.png. Under torchrun, "
                         "--dp x --tp must equal the number of processes.")
    t.add_argument("--model", "-m", required=True, metavar="MODEL",
                   help="preset name (see `opengemma info --presets`) or checkpoint directory to start from")
    t.add_argument("--tokenizer", default=None, metavar="TOKENIZER.model",
                   help="SentencePiece model (default: DATA's for a prepared directory, else MODEL's); a vocabulary "
                        "size other than the preset's resizes the embedding")
    t.add_argument("--data", required=True, metavar="DATA", help="prepared data directory, or a .jsonl/.txt file")
    t.add_argument("--out", "-o", required=True, metavar="RUN", help="run directory")
    t.add_argument("--resume", action="store_true", help="continue RUN from its last complete checkpoint")
    t.add_argument("--seq-len", type=_pos, default=512, help="tokens per row (default 512)")
    t.add_argument("--max-steps", type=_pos, default=1000, help="optimizer steps (default 1000)")
    t.add_argument("--global-batch", type=_pos, default=None,
                   help="rows per optimizer step over all processes (default: --micro-batch x data-parallel ranks)")
    t.add_argument("--micro-batch", type=_pos, default=8, help="rows per forward/backward on one process (default 8)")
    t.add_argument("--seed", type=int_range(0, 2**31 - 1), default=0, help="init, data order and sampling seed")
    t.add_argument("--lr", type=float_range(0.0, lo_open=True), default=3e-4, help="peak learning rate (default 3e-4)")
    t.add_argument("--min-lr", type=float_range(0.0), default=None, help="final learning rate (default lr / 10)")
    t.add_argument("--warmup", type=_nonneg, default=None, help="warmup steps (default 2%% of --max-steps)")
    t.add_argument("--schedule", choices=["cosine", "wsd", "constant"], default="cosine")
    t.add_argument("--decay-steps", type=_nonneg, default=None, help="wsd: steps of the final decay (default 20%%)")
    t.add_argument("--weight-decay", type=float_range(0.0), default=0.1)
    t.add_argument("--grad-clip", type=float_range(0.0), default=1.0, help="max gradient norm (0 = off)")
    t.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="compute dtype; master weights and optimizer state stay fp32 (default fp32)")
    t.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    t.add_argument("--compile", action="store_true", help="torch.compile each block")
    t.add_argument("--dp", type=_pos, default=None, help="data-parallel (FSDP2) degree (default: processes / tp)")
    t.add_argument("--tp", type=_pos, default=1, help="tensor-parallel degree (default 1)")
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    t.add_argument("--threads", type=_pos, default=None, help="CPU threads per process (default: torch's)")
    t.add_argument("--save-every", type=_nonneg, default=0, help="checkpoint every N steps (default: at the end)")
    t.add_argument("--keep-last", type=_pos, default=2, help="checkpoints kept (default 2)")
    t.add_argument("--eval-every", type=_nonneg, default=0,
                   help="validation loss (held-out rows) and a sample every N steps (default: at the end)")
    t.add_argument("--val-rows", type=_pos, default=32, help="held-out rows for validation loss (default 32)")
    t.add_argument("--sample-prompt", default="The", help="the fixed prompt of the periodic samples")
    t.add_argument("--sample-tokens", type=_nonneg, default=32, help="tokens per sample (0 = no samples)")
    t.add_argument("--log-every", type=_pos, default=1, help="progress bar and TensorBoard cadence (default 1)")
    t.add_argument("--peak-tflops", type=float_range(0.0, lo_open=True), default=None,
                   help="peak TFLOP/s of one device for MFU (default: known GPUs; on a CPU, a measured matmul)")
    t.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bitwise resume on GPU)")

    e = verbs.add_parser("export", help="write a run's weights as a model directory",
                         description="Write the last complete checkpoint of RUN (or --step N) to DST in opengemma's "
                         "native format (or, with --hf, Hugging Face layout), with the run's tokenizer: "
                         "`opengemma generate/serve/eval --model DST` load it directly.")
    e.add_argument("run", metavar="RUN")
    e.add_argument("dst", metavar="DST")
    e.add_argument("--hf", action="store_true", help="Hugging Face layout instead of opengemma's")
    e.add_argument("--step", type=_pos, default=None, help="checkpoint step (default: the last)")
    e.add_argument("--dtype", default="float32", help="dtype of the written weights (default float32)")
    e.add_argument("--force", action="store_true", help="write into DST even if it exists")

    g = verbs.add_parser("plot", help="PNG of a run's loss curves",
                         description="Plot RUN/metrics.jsonl (train, per-source and validation loss; learning rate).")
    g.add_argument("run", metavar="RUN")
    g.add_argument("--out", default=None, metavar="PNG", help="output file (default RUN/loss.png)")
    try:
        from .tune_cli import add_tune_parsers
    except ImportError:  # instruction tuning (issue 17) not present
        add_tune_parsers = None
    if add_tune_parsers is not None:
        add_tune_parsers(verbs)
    from .draft_cli import add_draft_parser; add_draft_parser(verbs)  # noqa: E702 (train draft, issue 19)
    from ..cli import COMMANDS

    COMMANDS.setdefault("train", run_train)
    return p


def run_train(args) -> int:
    if args.train_command == "pretrain":
        return run_pretrain(args)
    if args.train_command == "export":
        from .export import export

        dst = export(args.run, args.dst, hf=args.hf, step=args.step, dtype=args.dtype, force=args.force)
        print(f"wrote {dst}", file=sys.stderr)
        return 0
    if args.train_command == "plot":
        from .metrics import plot

        print(plot(args.run, args.out))
        return 0
    # instruction tuning's verbs (tune_cli) name their runner: p.set_defaults(train_run=fn)
    return args.train_run(args)


def run_pretrain(args) -> int:
    import torch

    from . import parallel

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tp > 1:  # before any process group: a config that cannot split is the same error on every rank
        from ..checkpoints.resolve import read_config, resolve

        parallel.check_tp(read_config(resolve(args.model)), args.tp)
    mesh, dev = parallel.setup(args.dp, args.tp, args.device)
    ok = False
    try:
        from .pretrain import pretrain

        pretrain(args, mesh, dev)
        ok = True
    finally:
        if ok:
            parallel.teardown()
        elif parallel.dist.is_initialized():  # one rank failing: no barrier the others never reach
            parallel.dist.destroy_process_group()
    return 0


def write_run_json(run_dir: Path, info: dict, tokenizer_bytes: bytes | None) -> None:
    """RUN/run.json and RUN/tokenizer.model: what export and resume need to rebuild the model."""
    from ..atomic import atomic_write_bytes

    run_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_bytes is not None:
        atomic_write_bytes(run_dir / "tokenizer.model", tokenizer_bytes)
    atomic_write_bytes(run_dir / RUN_JSON, (json.dumps(info, indent=1) + "\n").encode())


def read_run_json(run_dir) -> dict:
    run_dir = Path(run_dir)
    try:
        info = json.loads((run_dir / RUN_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OpenGemmaError(f"{run_dir}: not a training run (no {RUN_JSON})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OpenGemmaError(f"{run_dir / RUN_JSON}: unreadable ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("model_config"), dict):
        raise OpenGemmaError(f"{run_dir / RUN_JSON}: not a training run's description")
    return info
