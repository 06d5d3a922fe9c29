"""``opengemma train sft | rm | rl | adapter`` and ``opengemma reward``: instruction tuning on the one
training loop (:func:`opengemma.train.loop.fit`).

* ``train sft --model CKPT --data FILE.jsonl --out RUN [--lora-rank R]``: filtered, chat-formatted,
  packed conversations (:mod:`.sft`), full fine-tuning or LoRA (:mod:`.lora`);
* ``train rm --model CKPT --data PAIRS.jsonl --out RUN``: a Bradley-Terry reward model
  (:mod:`.reward`), held-out pairwise accuracy against the longer-answer and base-likelihood
  baselines in ``RUN/rm_report.json``;
* ``train rl --model CKPT --data PROMPTS.jsonl --out RUN --algo rloo|grpo|jbond --reward
  gsm8k|RM_DIR``: policy optimisation with rollouts from the live weights (:mod:`.rl`);
* ``train adapter RUN DST``: a LoRA run's adapter alone (``opengemma chat --adapter DST``);
* ``opengemma reward --model RM --data CONVERSATIONS.jsonl``: one JSON line per conversation with
  its reward.

Every run writes ``RUN/run.json``, ``RUN/metrics.jsonl``, checkpoints that ``--resume`` continues
exactly as pretraining does, and ``opengemma train export RUN DST`` writes a model directory
(LoRA merged; a reward model as an RM directory). One process (one device).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import float_range, int_range
from ..errors import OpenGemmaError

_pos = int_range(1)
_nonneg = int_range(0)
_frac = float_range(0.0, 1.0)


def _common(p: argparse.ArgumentParser, *, lr: float, steps: int, seq_len: int, micro: int, lora: bool = True,
            data_help: str = "training data: one or more JSONL files (.gz accepted), read in order and mixed") -> None:
    p.add_argument("--model", "-m", default=None, metavar="CHECKPOINT",
                   help="model to start from: a checkpoint directory or file, or a preset (random init); "
                        "default: the embedded Gemma 3 270M")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE.jsonl", help=data_help)
    p.add_argument("--out", "-o", required=True, metavar="RUN", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue RUN from its last complete checkpoint")
    p.add_argument("--max-steps", type=_pos, default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--seq-len", type=_pos, default=seq_len, help=f"tokens per row / longest example (default {seq_len})")
    p.add_argument("--micro-batch", type=_pos, default=micro, help=f"rows per forward/backward (default {micro})")
    p.add_argument("--global-batch", type=_pos, default=None, help="rows per optimizer step (default: --micro-batch)")
    p.add_argument("--lr", type=float_range(0.0, lo_open=True), default=lr, help=f"peak learning rate (default {lr:g})")
    p.add_argument("--min-lr", type=float_range(0.0), default=None, help="final learning rate (default lr / 10)")
    p.add_argument("--warmup", type=_nonneg, default=None, help="warmup steps (default 5%% of --max-steps)")
    p.add_argument("--schedule", choices=["cosine", "wsd", "constant"], default="cosine")
    p.add_argument("--weight-decay", type=float_range(0.0), default=0.0)
    p.add_argument("--grad-clip", type=float_range(0.0), default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="compute dtype: bf16 runs under autocast with fp32 master weights and optimizer state; with "
                        "LoRA the frozen base is held in bf16 (half the memory, no per-step cast)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=_pos, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int_range(0, 2**31 - 1), default=0, help="data order, adapter init and sampling seed")
    p.add_argument("--save-every", type=_nonneg, default=0, help="checkpoint every N steps (default: at the end)")
    p.add_argument("--keep-last", type=_pos, default=2, help="checkpoints kept (default 2)")
    p.add_argument("--eval-every", type=_nonneg, default=0, help="held-out evaluation every N steps (default: at the end)")
    p.add_argument("--log-every", type=_pos, default=1, help="progress bar cadence (default 1)")
    p.add_argument("--heldout-pct", type=float_range(0.0, 50.0), default=5.0,
                   help="share of the data held out for evaluation, by a hash of each example (default 5)")
    if not lora:  # a run without adapters (train draft)
        p.set_defaults(lora_rank=0)
        return
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in backward: much less memory for ~1/3 more compute")
    p.add_argument("--lora-rank", type=_nonneg, default=0, help="LoRA rank (0 = full fine-tuning, the default)")
    p.add_argument("--lora-alpha", type=float_range(0.0, lo_open=True), default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--lora-dropout", type=float_range(0.0, 0.99), default=0.0)
    p.add_argument("--lora-targets", default=None, metavar="NAMES",
                   help="comma-separated module names (default: q,k,v,o,gate,up,down projections)")


def add_tune_parsers(verbs) -> None:
    """Register ``sft``, ``rm``, ``rl`` and ``adapter`` on ``opengemma train``'s verbs."""
    from .config import ALL_SFT_FILTERS as ALL_FILTERS
    from .config import SFT_FILTERS as FILTERS
    from .config import TOXICITY_THRESHOLD

    s = verbs.add_parser("sft", help="supervised fine-tuning on conversations (full or LoRA)",
                         description="Fine-tune CHECKPOINT on conversations: TRL's {\"messages\": [...]} (roles system/"
                         "user/assistant, 'model' as an alias), prompt/completion records, GSM8K {question, answer}, "
                         "instruction records or OpenAssistant trees (best-ranked thread). Filtered (PII, toxicity, "
                         "self-identification, duplicates: RUN/data_report.json), formatted with Gemma's chat "
                         "template (loss on model turns only), packed with document masks.")
    _common(s, lr=2e-5, steps=500, seq_len=1024, micro=4)
    s.add_argument("--filters", default=",".join(FILTERS),
                   help=f"comma-separated, from {', '.join(ALL_FILTERS)} ('none' for no filtering; default "
                        f"{','.join(FILTERS)})")
    s.add_argument("--toxicity-threshold", type=_frac, default=TOXICITY_THRESHOLD,
                   help=f"drop conversations whose replies score at least this (default {TOXICITY_THRESHOLD})")
    s.add_argument("--pii-personal", choices=["redact", "drop", "keep"], default="redact",
                   help="e-mails, phones, addresses, IPs (sensitive data is always dropped)")
    s.add_argument("--overlong", choices=["truncate", "drop"], default="truncate",
                   help="examples longer than --seq-len + 1 tokens (counted either way; default truncate)")
    s.add_argument("--val-rows", type=_pos, default=32, help="held-out rows for the validation loss (default 32)")
    s.add_argument("--sample-prompt", default="What is 12 + 30?", help="the prompt of the periodic sample reply")
    s.set_defaults(train_run=run_sft)

    r = verbs.add_parser("rm", help="train a Bradley-Terry reward model on preference pairs",
                         description="Train a reward model (CHECKPOINT's trunk + a scalar head at the final token) on "
                         "preference pairs: TRL's {\"chosen\": [...], \"rejected\": [...]} (optional shared 'prompt', "
                         "optional 'margin'), hh-rlhf dialogues or OpenAssistant trees (ranked siblings). Writes "
                         "RUN/rm_report.json: held-out pairwise accuracy against the longer-answer-wins and base "
                         "log-likelihood baselines.")
    _common(r, lr=1e-5, steps=300, seq_len=1024, micro=4)
    r.add_argument("--center", type=float_range(0.0), default=0.0,
                   help="reward centring coefficient c: + c (r_c + r_r)^2 (TRL's center_rewards_coefficient)")
    r.add_argument("--val-pairs", type=_pos, default=256, help="held-out pairs evaluated (default 256)")
    r.add_argument("--no-baselines", action="store_true", help="skip the base log-likelihood baseline")
    r.set_defaults(train_run=run_rm)

    q = verbs.add_parser("rl", help="RLOO / GRPO / J-BOND against a reward model or GSM8K correctness",
                         description="Optimise CHECKPOINT (the SFT policy, also the KL reference) on PROMPTS: GSM8K "
                         "records for --reward gsm8k, or any prompt file (oasst prompts, hh-rlhf, {\"prompt\"}) for "
                         "--reward RM_DIR. Rollouts are sampled from the weights being trained (temperature 1). "
                         "Logs reward, KL to the reference, held-out reward; RUN/rl.png.")
    _common(q, lr=1e-6, steps=200, seq_len=1024, micro=8)
    from .config import RL_ALGOS as ALGOS

    q.add_argument("--algo", choices=ALGOS, default="rloo")
    q.add_argument("--reward", required=True, metavar="gsm8k|RM_DIR", help="gsm8k correctness, or a reward model directory")
    q.add_argument("--group-size", type=_pos, default=4, help="completions per prompt (default 4)")
    q.add_argument("--prompts-per-step", type=_pos, default=8, help="prompts per optimizer step (default 8)")
    q.add_argument("--max-new-tokens", type=_pos, default=256, help="completion budget (default 256)")
    q.add_argument("--kl-coef", type=float_range(0.0), default=0.05, help="beta: KL penalty weight (default 0.05)")
    q.add_argument("--clip", type=float_range(0.0, lo_open=True), default=0.2, help="GRPO ratio clip (default 0.2)")
    q.add_argument("--jeffreys", type=_frac, default=0.5, help="J-BOND: backward-KL weight (default 0.5)")
    q.add_argument("--anchor-ema", type=_frac, default=None,
                   help="EMA rate of the anchor (J-BOND default 0.02; with rloo/grpo: WARP's EMA KL reference)")
    q.add_argument("--liti", type=_frac, default=1.0, help="WARP: final interpolation toward the init (1 = none)")
    q.add_argument("--eval-prompts", type=_nonneg, default=64, help="held-out prompts for the greedy reward (default 64)")
    q.set_defaults(train_run=run_rl)

    a = verbs.add_parser("adapter", help="write a LoRA run's adapter alone",
                         description="Write the LoRA adapter of RUN's last checkpoint (or --step N) to DST: "
                         "adapter.safetensors + adapter_config.json, loaded by `opengemma chat/generate/serve --model "
                         "BASE --adapter DST`.")
    a.add_argument("run", metavar="RUN")
    a.add_argument("dst", metavar="DST")
    a.add_argument("--step", type=_pos, default=None)
    a.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="tensor dtype of the written adapter (bf16: half the size; default fp32)")
    a.set_defaults(train_run=run_adapter)


def add_reward_parser(sub) -> argparse.ArgumentParser:
    """``opengemma reward``: score conversations with a reward model."""
    p = sub.add_parser("reward", help="score conversations with a reward model",
                       description="Score each conversation of DATA (JSONL: {\"messages\": [...]}, or any format "
                       "`train sft` reads) with the reward model RM; writes one JSON line per conversation, "
                       "{\"line\": N, \"reward\": R}, to --out or standard output.")
    p.add_argument("--model", "-m", required=True, metavar="RM", help="reward model directory (`opengemma train export`)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl")
    p.add_argument("--out", default=None, metavar="FILE.jsonl", help="output file (default: standard output)")
    p.add_argument("--batch-size", type=_pos, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32")
    from ..cli import COMMANDS

    COMMANDS.setdefault("reward", run_reward)
    return p


# -- shared run setup ----------------------------------------------------------------------------------
def _lora_config(args):
    from .lora import DEFAULT_TARGETS, LoRAConfig

    if not args.lora_rank:
        return None
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else DEFAULT_TARGETS
    return LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank, dropout=args.lora_dropout,
                      targets=targets)


def _read_all(reader, paths):
    """``reader`` (read_conversations / read_pairs / read_prompts) over several files, in order, with
    one skip count."""
    from .prefs import Skips

    skips, out = Skips(), []
    for path in paths:
        out += reader(path, skips)[0]
    return out, skips


def _train_config(args):
    from .config import TrainConfig

    warmup = args.warmup if args.warmup is not None else max(0, args.max_steps // 20)
    return TrainConfig(lr=args.lr, min_lr=args.min_lr if args.min_lr is not None else args.lr / 10,
                       warmup_steps=min(warmup, args.max_steps), schedule=args.schedule, weight_decay=args.weight_decay,
                       grad_clip=args.grad_clip, max_steps=args.max_steps, micro_batch=args.micro_batch,
                       global_batch=args.global_batch, seq_len=args.seq_len, dtype=args.dtype, seed=args.seed,
                       log_every=args.log_every, eval_every=args.eval_every, save_every=args.save_every,
                       keep_last=args.keep_last)


def _start(args, kind: str, extra: dict, wrap=None):
    """(model, tokenizer, lora config, trainable params or None, run dir): the model built from
    --model, wrapped (reward head) and given adapters as asked; run.json written (or, with
    --resume, checked against this run's)."""
    import torch

    from . import parallel
    from .cli import RUN_JSON, read_run_json, write_run_json
    from .lora import adapter_parameters, apply_lora, fingerprint, hold_frozen_base
    from .pretrain import build
    from .state import Checkpointer

    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.out)
    if args.resume and not (run_dir / RUN_JSON).is_file():
        raise OpenGemmaError(f"{run_dir}: nothing to resume (no {RUN_JSON})")
    if not args.resume and Checkpointer(run_dir).steps():
        raise OpenGemmaError(f"{run_dir} already holds checkpoints: pass --resume to continue it, "
                             "or choose a new output directory")
    _, dev = parallel.setup(1, 1, args.device)
    torch.manual_seed(args.seed)
    lm, tok, origin = build(args.model, None, args.seed, dev)
    if not hasattr(tok, "start_of_turn_id") or tok.start_of_turn_id < 0:
        raise OpenGemmaError(f"{args.model}: its tokenizer has no <start_of_turn> token (not a Gemma chat vocabulary)")
    model = wrap(lm) if wrap is not None else lm
    lcfg = _lora_config(args)
    params = None
    base_fp = fingerprint(lm) if lcfg is not None else None  # checkpoints will hold the adapters only
    if lcfg is not None:
        apply_lora(lm, lcfg, seed=args.seed)
        params = adapter_parameters(lm) + ([p for n, p in model.named_parameters() if n.startswith("head.")]
                                           if model is not lm else [])
        if args.dtype == "bf16":  # what autocast would cast the frozen base to at every matmul, done once
            hold_frozen_base(lm, torch.bfloat16)
    if getattr(args, "activation_checkpointing", False):  # after the adapters: they are found by plain names
        parallel.parallelize(lm, None, activation_checkpointing=True)
    info = {"kind": "lora" if lcfg is not None and kind != "rm" else kind, "task": kind, "model": origin,
            "model_config": lm.config.to_dict(), "tokenizer": "tokenizer.model", "data": [str(Path(d).resolve()) for d in args.data],
            "argv": sys.argv[1:], **extra}
    if lcfg is not None:
        info["lora"] = lcfg.to_dict()
        info["base_fingerprint"] = base_fp
    if args.resume:
        saved = read_run_json(run_dir)
        diffs = [k for k in ("task", "model_config", "lora") if saved.get(k) != info.get(k)]
        was = saved.get("base_fingerprint")  # adapter-only checkpoints: the base must be the same weights
        if was is not None and base_fp is not None and abs(was - base_fp) > 1e-7 * max(1.0, abs(was)):
            diffs.append("base model weights")
        if diffs:
            raise OpenGemmaError(f"{run_dir} was another run (its {', '.join(diffs)} differ): resume with the same "
                                 "--model and adapter settings, or choose a new output directory")
    else:
        write_run_json(run_dir, info, tok.model_bytes() if hasattr(tok, "model_bytes") else None)
    return model, tok, lcfg, params, run_dir, dev


def _finish(run_dir: Path, result, what: str, extra_png=None) -> None:
    from .metrics import plot

    rec = result.record
    msg = f"done: {what}, step {result.step}, loss {rec.get('loss', float('nan')):.4f}"
    for k in sorted(rec):
        if k.startswith(("val/", "eval/")) and isinstance(rec[k], (int, float)):
            msg += f", {k} {rec[k]:.4f}"
    try:
        msg += f"; curves in {plot(run_dir)}"
        if extra_png is not None:
            msg += f" and {extra_png(run_dir)}"
    except OpenGemmaError as e:
        msg += f"; no plot ({e})"
    print(msg + f"; checkpoint {result.checkpoint} (export with `opengemma train export {run_dir} DST`)", file=sys.stderr)


def _write_json(path: Path, data: dict) -> None:
    from ..atomic import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


# -- sft ------------------------------------------------------------------------------------------------
def run_sft(args) -> int:
    from . import sft
    from .data import RowBatches, RowStream, lm_loss
    from .loop import fit
    from .prefs import read_conversations

    filters = [] if args.filters.strip() == "none" else [f.strip() for f in args.filters.split(",") if f.strip()]
    convs, skips = _read_all(read_conversations, args.data)  # before the model: a bad file fails fast
    if not convs:
        raise OpenGemmaError(f"{' '.join(args.data)}: no usable conversation (skipped: {skips.summary()})")
    model, tok, lcfg, params, run_dir, _ = _start(args, "sft", {"filters": filters})
    cfg = _train_config(args)
    policy = {"sensitive": "drop", "personal": args.pii_personal}
    data = sft.prepare(tok, convs, cfg.seq_len, skips=skips, filters=filters, overlong=args.overlong,
                       heldout_pct=args.heldout_pct, pii_policy=policy, toxicity_threshold=args.toxicity_threshold)
    _write_json(run_dir / "data_report.json", data.report)
    print(f"sft data: {len(convs)} conversations read (counted: {skips.summary()}); filters: "
          f"{data.report['filter_summary']}; {data.report['train_examples']} train / {data.report['heldout_examples']} "
          f"held-out examples in {data.report['train_rows']} rows of {cfg.seq_len}", file=sys.stderr)
    cfg = cfg.resolved(1)
    source = RowBatches(RowStream(data.train, cfg.seed), global_batch=cfg.global_batch, micro_batch=cfg.micro_batch)
    result = fit(model, source, lm_loss(), cfg, run_dir, params=params, resume=args.resume,
                 eval_fn=_sft_eval(data.heldout[:args.val_rows], cfg.micro_batch, tok, args.sample_prompt),
                 meta={"kind": "sft"}, banner=f"sft of {model.config.name} ({f'LoRA r={lcfg.rank}' if lcfg else 'full'})")
    _finish(run_dir, result, "sft")
    return 0


def _sft_eval(heldout, micro: int, tok, prompt: str):
    from ..chat import format_chat
    from ..generate import GenerationConfig, generate
    from .data import collate, lm_loss

    loss_fn = lm_loss()

    def eval_fn(model, step):
        out = {}
        total, count = 0.0, 0
        for i in range(0, len(heldout), micro):
            res = loss_fn(model, collate(heldout[i:i + micro], ()))
            total, count = total + float(res.loss_sum), count + int(res.count)
        if count:
            out["val/loss"] = total / count
        if prompt:
            ids = format_chat(tok, [{"role": "user", "content": prompt}]).ids
            out["sample"] = generate(model, tok, [ids], GenerationConfig(max_new_tokens=48))[0].text
        return out

    return eval_fn


# -- rm -------------------------------------------------------------------------------------------------
def run_rm(args) -> int:
    import torch

    from . import reward
    from .loop import fit
    from .prefs import read_pairs
    from .sft import in_heldout

    pairs, skips = _read_all(read_pairs, args.data)
    if not pairs:
        raise OpenGemmaError(f"{' '.join(args.data)}: no usable preference pair (skipped: {skips.summary()})")
    gen = torch.Generator().manual_seed(args.seed)
    model, tok, _, params, run_dir, dev = _start(
        args, "rm", {"center": args.center, "heldout": f"blake2b-64(chosen token ids) < {args.heldout_pct}%"},
        wrap=lambda lm: reward.RewardModel(lm, generator=gen))
    cfg = _train_config(args).resolved(1)
    enc = reward.encode_pairs(tok, pairs, cfg.seq_len, skips)  # no shift: the whole sequence is input
    held = [p for p in enc if in_heldout(p.chosen, args.heldout_pct)][:args.val_pairs]
    train = [p for p in enc if not in_heldout(p.chosen, args.heldout_pct)]
    pad = max(0, getattr(tok, "pad_id", 0))
    print(f"rm data: {len(pairs)} pairs read, {len(train)} train / {len(held)} held-out (skipped {skips.total}: "
          f"{skips.summary()})", file=sys.stderr)
    report = {"pairs_read": len(pairs), "skips": skips.to_dict(), "train_pairs": len(train), "heldout_pairs": len(held),
              "heldout_rule": f"blake2b-64(chosen token ids) < {args.heldout_pct}% of 2**64"}
    if held:
        report["baselines"] = {"longer_wins": reward.length_baseline(held)}
        if not args.no_baselines and not args.resume:
            with torch.no_grad():
                from .lora import disabled, lora_modules

                ctx = disabled(model.lm) if lora_modules(model.lm) else _null()
                amp = torch.autocast(dev.type, dtype=torch.bfloat16) if cfg.dtype == "bf16" else _null()
                with ctx, amp:  # the numerics of training (a LoRA base is held in bf16 then)
                    report["baselines"].update(reward.likelihood_baseline(model.lm.eval(), held, pad))
            model.lm.train()
        print(f"held-out baselines: {report['baselines']}", file=sys.stderr)
    source = reward.PairBatches(train, global_batch=cfg.global_batch, micro_batch=cfg.micro_batch, seed=cfg.seed,
                                pad_id=pad)

    def eval_fn(model, step):
        if not held:
            return {}
        rc, rr = reward.pair_rewards(model, held, cfg.micro_batch, pad)
        loss = reward.bradley_terry(torch.tensor(rc), torch.tensor(rr), center=args.center).mean()
        return {"val/accuracy": reward.accuracy(rc, rr), "val/loss": float(loss)}

    result = fit(model, source, reward.rm_loss(args.center), cfg, run_dir, params=params, resume=args.resume,
                 eval_fn=eval_fn, meta={"kind": "rm"}, banner=f"reward model on {model.config.name}")
    report["heldout_accuracy"] = result.record.get("val/accuracy")
    _write_json(run_dir / "rm_report.json", report)
    _finish(run_dir, result, f"reward model (held-out accuracy {report['heldout_accuracy']})")
    return 0


def _null():
    import contextlib

    return contextlib.nullcontext()


# -- rl -------------------------------------------------------------------------------------------------
def run_rl(args) -> int:
    from . import parallel, rl
    from .loop import fit
    from .prefs import read_prompts

    prompts, skips = _read_all(read_prompts, args.data)
    if not prompts:
        raise OpenGemmaError(f"{' '.join(args.data)}: no usable prompt (skipped: {skips.summary()})")
    if args.reward == "gsm8k" and not all("answer" in p.meta for p in prompts):
        raise OpenGemmaError(f"--reward gsm8k needs GSM8K records with an 'answer' in {' '.join(args.data)}")
    if args.reward != "gsm8k":
        from .reward import is_reward_model

        if not is_reward_model(args.reward):
            raise OpenGemmaError(f"--reward {args.reward}: not 'gsm8k' and not a reward model directory")
    ema = args.anchor_ema if args.anchor_ema is not None else (0.02 if args.algo == "jbond" else 0.0)
    rcfg = rl.RLConfig(algo=args.algo, group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                       max_new_tokens=args.max_new_tokens, kl_coef=args.kl_coef, clip=args.clip, jeffreys=args.jeffreys,
                       anchor_ema=ema, liti=args.liti, micro_batch=args.micro_batch, seed=args.seed)
    held = [p for p in prompts if rl.is_heldout_prompt(p, args.heldout_pct)][:args.eval_prompts]
    train = [p for p in prompts if not rl.is_heldout_prompt(p, args.heldout_pct)]
    model, tok, _, params, run_dir, dev = _start(
        args, "rl", {"rl": {k: getattr(rcfg, k) for k in rcfg.__dataclass_fields__}, "reward": args.reward,
                     "heldout": f"blake2b-64(prompt) < {args.heldout_pct}%, first {args.eval_prompts}"})
    reward = rl.GSM8KReward() if args.reward == "gsm8k" else rl.RMReward(args.reward, model.config, tok, device=dev)
    cfg = _train_config(args).replace(global_batch=None, grad_accum=1).resolved(1)
    named = {parallel.plain_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    source = rl.RLSource(model, tok, train, reward, rcfg, params=named, max_steps=cfg.max_steps)
    print(f"rl: {len(train)} prompts ({len(held)} held out; skipped {skips.total}: {skips.summary()}), {args.algo}, "
          f"reward {reward.name}, {rcfg.prompts_per_step} x {rcfg.group_size} rollouts per step", file=sys.stderr)
    result = fit(model, source, rl.rl_loss(rcfg), cfg, run_dir, params=params, resume=args.resume,
                 eval_fn=rl.make_eval_fn(tok, held, reward, rcfg.max_new_tokens), on_step=source.on_step,
                 extra_state=source.extra_state(), meta={"kind": "rl"},
                 banner=f"{args.algo} on {model.config.name} against {reward.name}")
    _finish(run_dir, result, args.algo, extra_png=plot_rl)
    return 0


def plot_rl(run_dir) -> Path:
    """RUN/rl.png: mean reward, held-out reward and KL to the reference against the step."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise OpenGemmaError("plotting needs matplotlib: pip install 'opengemma[train]'") from None
    from .metrics import read_records

    recs = read_records(Path(run_dir))
    fig, (ax, ax_kl) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for key, style in (("reward", "-"), ("eval/reward", "o-"), ("anchor_reward", "--")):
        pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), style, label=key, markersize=3)
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    pts = [(r["step"], r["kl"]) for r in recs if "kl" in r]
    if pts:
        ax_kl.plot(*zip(*pts), color="tab:red")
    ax_kl.set_ylabel("KL to reference (nats/seq)")
    ax_kl.set_xlabel("optimizer step")
    ax_kl.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / "rl.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# -- adapter, reward ------------------------------------------------------------------------------------
def run_adapter(args) -> int:
    from .cli import read_run_json
    from .export import checkpoint_of
    from .lora import rebuild, save_adapter

    run_dir = Path(args.run)
    run = read_run_json(run_dir)
    if "lora" not in run or run.get("kind") == "rm":
        raise OpenGemmaError(f"{run_dir}: not a LoRA policy run (train with --lora-rank R)")
    model = rebuild(run_dir, run, checkpoint_of(run_dir, args.step))
    import torch

    dst = save_adapter(args.dst, model, base=(run.get("model") or {}).get("path") or (run.get("model") or {}).get("preset"),
                       dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    print(f"wrote {dst}", file=sys.stderr)
    return 0


def run_reward(args) -> int:
    from . import reward
    from .prefs import BadExample, Skips, conversation, read_jsonl

    rm, tok = reward.load(args.model, dtype=args.dtype, device=args.device)
    skips = Skips()
    rows = []
    for where, rec in read_jsonl(args.data, skips):
        try:
            rows.append((where, conversation(rec)))
        except BadExample as e:
            skips.add(e.reason, where)
    import contextlib

    with open(args.out, "w", encoding="utf-8") if args.out else contextlib.nullcontext(sys.stdout) as out:
        for i in range(0, len(rows), args.batch_size):
            chunk = rows[i:i + args.batch_size]
            for (where, _), r in zip(chunk, reward.score(rm, tok, [c for _, c in chunk], batch=args.batch_size)):
                out.write(json.dumps({"line": int(where.rsplit(":", 1)[1]), "reward": r}) + "\n")
            out.flush()
    print(f"scored {len(rows)} conversations; skipped {skips.total} ({skips.summary()})", file=sys.stderr)
    return 0 if rows or not skips.total else 1
