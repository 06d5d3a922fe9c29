"""Reward model side by side: opengemma's ``train rm`` vs TRL's ``RewardTrainer``, same base, same pairs.

One base model (default: the embedded Gemma 3 270M; a preset such as ``tiny-gemma3`` is first written
as a checkpoint with seeded random weights and the embedded tokenizer) is trained into a reward model
twice, each trainer in its own process, one after the other:

* **opengemma** -- the command a user runs: ``python -m opengemma train rm --model BASE --data
  PAIRS.jsonl ...`` (the one training loop; trunk + scalar head at the final token; Bradley-Terry
  loss). Its held-out accuracy is the run's own ``val/accuracy`` (``RUN/rm_report.json``);
* **TRL** -- ``trl.RewardTrainer`` on ``AutoModelForSequenceClassification.from_pretrained(HF_DIR,
  num_labels=1)`` (transformers' ``Gemma3TextForSequenceClassification``), HF_DIR written by
  ``opengemma convert BASE HF_DIR --to hf``. TRL tokenizes the conversations itself (the converted
  tokenizer's chat template); its held-out rewards come from the trained model on TRL's own eval
  dataloader.

Made equal: the pairs (TRL's conversational preference format ``{"chosen": [...], "rejected": [...]}``,
one file read by both), the held-out split (our hash rule: BLAKE2b-64 of the chosen side's token ids
below --heldout-pct %), the pairs of every step (TRL gets the training pairs in exactly the order our
loop draws them, ``train_sampling_strategy="sequential"``), batch, steps, the maximum length (pairs with
a longer side are dropped before either trainer sees them), AdamW (betas 0.9/0.95, eps 1e-8, no weight
decay, gradient clipping at 1.0; TRL's through ``optimizers=``), the schedule (linear warmup, cosine to
--min-lr: :func:`opengemma.train.schedule.lr_at`, TRL's as a ``LambdaLR`` of it), seed, threads, dtype
(fp32, or bf16 autocast over fp32 master weights on both) and the head's initial weights (ours,
N(0, 0.02) from the seed, copied into TRL's bias-free ``score``; our head's bias starts at 0 and gets no
gradient without centring, so both heads compute the same function throughout). With --lora-rank R:
ours vs PEFT's ``LoraConfig`` (the same seven projections, alpha 2R, ``modules_to_save=["score"]``;
needs ``peft``); the adapters' A matrices are drawn by each library, so only the first step is the same.

Reported for both: held-out pairwise accuracy with a 95% Wilson interval, against the simple baselines
on the same held-out pairs (longer answer wins; the base model's log-likelihood of the model turns,
sum and per token, in fp32); training tokens/s (real tokens of the chosen and rejected rows, over the
steps after the first; both pad a step's rows to its longest, the ratio is printed); peak RSS
(``ru_maxrss`` from ``wait4``); wall time, spawn to exit (imports, load, tokenization, training, held-out
evaluation and the final checkpoint with optimizer state: both write one); the loss of every step
(curves in the PNG). Checks: TRL's token ids equal ours for every row, every step sees the same tokens
and the same learning rate, the losses of the two runs step by step (equal up to rounding in fp32), and
an fp32 sanity line whatever --dtype: on the first batch, TRL's ``compute_loss`` on opengemma's rewards
vs opengemma's loss (identical inputs: target 1e-6), and the loss and rewards through transformers'
forward instead of ours (same weights and head: two fp32 forwards, different rounding).

Other processes' CPU during each run is printed (``machine.CpuMeter``); ``--wait-idle S`` waits for a
quiet machine first. A run that fails prints the tail of its log; ``--keep DIR`` keeps the work
directory (both runs, their logs and checkpoints, the converted HF model, PAIRS.jsonl).

    python bench/bench_rm_trl.py --model tiny-gemma3 --pairs 32 --heldout-pairs 16 --steps 4 --max-len 256  # ~1 min
    python bench/bench_rm_trl.py --dtype bf16 --threads 2 --record NAME    # bench/results/NAME.{json,md,png}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

DEFAULT_DATA = HERE.parent.parent / "shared" / "datasets" / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"
BETAS, EPS, CLIP = (0.9, 0.95), 1e-8, 1.0  # our TrainConfig's AdamW defaults; `train rm` clips at 1.0


def fail(msg: str) -> None:
    print(f"bench_rm_trl: error: {msg}", file=sys.stderr)
    sys.exit(1)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wilson(acc: float, n: int) -> list[float]:
    from opengemma.eval.metrics import wilson_interval

    return list(wilson_interval(acc * n, n))


# -- preparation (this process) --------------------------------------------------------------------------
def materialize_base(args, work: Path) -> str:
    """--model as something both `train rm` and `convert` read: a preset becomes a native checkpoint
    (seeded weights, the embedded tokenizer's vocabulary); a path or the embedded GGUF stays as it is."""
    from opengemma.checkpoints import native
    from opengemma.checkpoints.resolve import resolve
    from opengemma.embedded import embedded_path
    from opengemma.tokenizer import Tokenizer
    from opengemma.train.pretrain import build

    if args.model is None:
        return str(embedded_path())
    if resolve(args.model).kind != "preset":
        return args.model
    tok = Tokenizer.from_gguf(embedded_path())
    model, tok, _ = build(args.model, tok, args.seed, "cpu")
    native.save(work / "base", model.config, model.state_dict(), tokenizer_model_bytes=tok.model_bytes())
    return str(work / "base")


def as_trl(messages: list[dict]) -> list[dict]:
    return [{"role": "assistant" if m["role"] == "model" else m["role"], "content": m["content"]} for m in messages]


def select_pairs(args, tok) -> dict:
    """The pairs both trainers get: read, formatted, over-long ones dropped, split by our hash rule."""
    from opengemma.train import prefs, reward
    from opengemma.train.sft import in_heldout

    pairs, skips = prefs.read_pairs(args.data)
    train, held = [], []
    for p in pairs:
        enc = reward.encode_pairs(tok, [p], args.max_len, skips)  # one at a time: keep (pair, ids) together
        if enc:
            (held if in_heldout(enc[0].chosen, args.heldout_pct) else train).append((p, enc[0]))
    for what, name, got, want in (("training", "--pairs", train, args.pairs),
                                  ("held-out", "--heldout-pairs", held, args.heldout_pairs)):
        if not got or want > len(got):
            fail(f"{args.data}: {len(got)} {what} pairs of at most {args.max_len} tokens a side, {name} asks for "
                 f"{want or 'at least 1'} (held out: chosen-ids hash < {args.heldout_pct}%; skipped: {skips.summary()})")
    train, held = train[:args.pairs or None], held[:args.heldout_pairs or None]
    return {"pairs_read": len(pairs), "skips": skips.to_dict(), "train": train, "held": held}


def step_order(n_train: int, args) -> list[int]:
    """The training pair of every slot of every step, as `train rm` draws them (RowStream, seeded)."""
    from opengemma.train.data import RowStream

    stream = RowStream(list(range(n_train)), args.seed)
    return [next(stream) for _ in range(args.steps * args.batch)]


def prepare_reference(args, lm, pad: int, data: dict, order: list[int], work: Path) -> dict:
    """In this process, from the base LM: the baselines on the held-out pairs, the head's initial
    weights (as `train rm` draws them from --seed), and the first batch's loss in fp32."""
    import torch

    from opengemma.train import reward

    held = [e for _, e in data["held"]]
    t0 = time.perf_counter()
    base_acc = {"longer_wins": reward.length_baseline(held), **reward.likelihood_baseline(lm.eval(), held, pad)}
    baselines = {k: {"accuracy": v, "ci95": wilson(v, len(held))} for k, v in base_acc.items()}
    baselines_s = time.perf_counter() - t0
    rm = reward.RewardModel(lm, generator=torch.Generator().manual_seed(args.seed))
    torch.save({"weight": rm.head.weight.detach().clone()}, work / "head_init.pt")
    first = reward.collate_pairs([data["train"][i][1] for i in order[:args.batch]], pad)
    with torch.no_grad():
        rewards = rm.train()(first.tokens, first.lengths)  # [2B]: chosen rows, then rejected rows
        loss = reward.bradley_terry(*rewards.chunk(2), first.margin).mean()  # what rm_loss normalises to
    return {"baselines": baselines, "baselines_s": baselines_s, "first_loss_fp32": float(loss),
            "first_rewards_fp32": rewards.tolist()}


def write_inputs(args, data: dict, order: list[int], ref: dict, work: Path, hf_dir: Path) -> Path:
    """PAIRS.jsonl (train then held-out, TRL's format) for `train rm`, and the TRL worker's spec."""
    pairs = [p for p, _ in data["train"] + data["held"]]
    margin = any(p.margin is not None for p in pairs)  # TRL wants a margin on every record or none
    rec = [{"chosen": as_trl(p.chosen), "rejected": as_trl(p.rejected), **({"margin": p.margin or 0.0} if margin else {})}
           for p in pairs]
    with open(work / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rec)
    n = len(data["train"])
    spec = {"hf_dir": str(hf_dir), "out": str(work / "trl-run"), "result": str(work / "trl.json"),
            "head_init": str(work / "head_init.pt"), "train": [rec[i] for i in order], "held": rec[n:],
            "first_rewards": ref["first_rewards_fp32"],
            "train_ids": [[data["train"][i][1].chosen, data["train"][i][1].rejected] for i in order],
            "held_ids": [[e.chosen, e.rejected] for _, e in data["held"]],
            **{k: getattr(args, k) for k in ("threads", "dtype", "lr", "min_lr", "warmup", "steps", "batch", "max_len",
                                             "seed", "lora_rank", "activation_checkpointing")}}
    (work / "trl-spec.json").write_text(json.dumps(spec))
    return work / "trl-spec.json"


def ours_command(args, base: str, work: Path, n_held: int) -> list[str]:
    cmd = [sys.executable, "-m", "opengemma", "train", "rm", "--model", base, "--data", str(work / "pairs.jsonl"),
           "--out", str(work / "ours-run"), "--max-steps", str(args.steps),
           # `train rm` keeps a pair whose longer side has at most --seq-len tokens
           "--seq-len", str(args.max_len), "--micro-batch", str(args.batch), "--global-batch", str(args.batch),
           "--lr", repr(args.lr), "--min-lr", repr(args.min_lr), "--warmup", str(args.warmup), "--schedule", "cosine",
           "--weight-decay", "0", "--grad-clip", str(CLIP), "--dtype", args.dtype, "--device", "cpu",
           "--threads", str(args.threads), "--seed", str(args.seed), "--heldout-pct", repr(args.heldout_pct),
           "--val-pairs", str(n_held), "--no-baselines", "--keep-last", "1"]
    return (cmd + (["--lora-rank", str(args.lora_rank)] if args.lora_rank else [])
            + (["--activation-checkpointing"] if args.activation_checkpointing else []))


def run_child(cmd: list[str], log: Path, threads: int) -> dict:
    """Run ``cmd`` (output to ``log``): wall time, the child's own peak RSS (``wait4``), and the CPU
    that other processes used meanwhile (cores)."""
    from machine import CpuMeter

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    meter = CpuMeter()
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, ru = os.wait4(proc.pid, 0)  # wait4, not proc.wait: the child's rusage comes with it
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        tail = log.read_text(errors="replace")[-3000:]
        fail(f"{shlex.join(cmd[:6])} ... exited with {proc.returncode}:\n{tail}")
    return {"wall_s": wall, "peak_rss_mib": ru.ru_maxrss / 1024, "other_cores": meter.other_cores()}


# -- the TRL worker ---------------------------------------------------------------------------------------
def trl_worker(spec_path: str) -> None:
    """Train with TRL's RewardTrainer as the spec says; write the result JSON to ``spec["result"]``."""
    t_start = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers
    import trl
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    from opengemma.train.reward import accuracy
    from opengemma.train.schedule import lr_at

    disable_progress_bars()
    t_imported = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(spec["hf_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["hf_dir"], num_labels=1, dtype=torch.float32)
    with torch.no_grad():  # the same initial head as ours
        model.score.weight.copy_(torch.load(spec["head_init"])["weight"])
    model_class, attn = type(model).__name__, model.config._attn_implementation
    if spec["lora_rank"]:
        from peft import LoraConfig, TaskType, get_peft_model

        from opengemma.train.lora import DEFAULT_TARGETS

        r = spec["lora_rank"]
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(DEFAULT_TARGETS),
                                                 task_type=TaskType.SEQ_CLS, modules_to_save=["score"]))
    t_loaded = time.perf_counter()
    lr, steps = spec["lr"], spec["steps"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=BETAS, eps=EPS,
                                  weight_decay=0.0, foreach=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(
        s, lr=lr, min_lr=spec["min_lr"], warmup_steps=spec["warmup"], max_steps=steps, schedule="cosine") / lr)

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends, self.lrs = [], []

        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            self.lrs.append(optimizer.param_groups[0]["lr"])

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    class Recording(trl.RewardTrainer):
        """TRL's trainer, unchanged, noting each training step's loss and real tokens."""

        losses: list[float]
        tokens: list[int]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training:
                self.losses.append(float((out[0] if return_outputs else out).detach()))
                self.tokens.append(int(inputs["attention_mask"].sum()))
            return out

    config = trl.RewardConfig(
        output_dir=spec["out"], max_steps=steps, per_device_train_batch_size=spec["batch"],
        per_device_eval_batch_size=spec["batch"], gradient_accumulation_steps=1, learning_rate=lr,
        max_grad_norm=CLIP, weight_decay=0.0, bf16=spec["dtype"] == "bf16", fp16=False, use_cpu=True,
        gradient_checkpointing=bool(spec.get("activation_checkpointing")),
        gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1, save_strategy="steps", save_steps=steps, eval_strategy="no",
        report_to="none", disable_tqdm=True, seed=spec["seed"], data_seed=spec["seed"],
        train_sampling_strategy="sequential", max_length=spec["max_len"], dataloader_num_workers=0)
    timer = Timer()
    trainer = Recording(model=model, args=config, train_dataset=Dataset.from_list(spec["train"]),
                        eval_dataset=Dataset.from_list(spec["held"]), processing_class=tok,
                        optimizers=(optimizer, schedule), callbacks=[timer])
    trainer.losses, trainer.tokens = [], []
    t_ready = time.perf_counter()
    ds, held_ds = trainer.train_dataset, trainer.eval_dataset
    if len(ds) != len(spec["train"]) or len(held_ds) != len(spec["held"]):
        raise SystemExit(f"TRL dropped pairs ({len(ds)}/{len(spec['train'])} train, {len(held_ds)}/{len(spec['held'])} "
                         "held out): its tokenization is longer than ours")
    ids_train, ids_held = _same_ids(ds, spec["train_ids"]), _same_ids(held_ds, spec["held_ids"])
    # fp32 sanity, before training wraps the model in autocast: TRL's compute_loss on the first batch
    # through transformers' model, and on opengemma's rewards for that batch (identical inputs).
    first = trainer.data_collator([ds[i] for i in range(spec["batch"])])
    model.eval()
    with torch.no_grad():
        first_fp32, out = trainer.compute_loss(model, dict(first), return_outputs=True)
        on_ours = trainer.compute_loss(_Fixed(torch.tensor(spec["first_rewards"])), dict(first))
    trainer._metrics["eval"].clear()  # TRL's eval-metric buffer: keep the sanity batch out of its logs
    model.train()
    t0 = time.perf_counter()
    trainer.train()
    t_trained = time.perf_counter()
    rc, rr = [], []
    trainer.model.eval()
    with torch.no_grad(), trainer.accelerator.autocast():
        for batch in trainer.get_eval_dataloader():
            r = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).logits.float().squeeze(-1)
            c, j = r.chunk(2)
            rc += c.tolist()
            rr += j.tolist()
    step_s = [timer.ends[0] - t0] + [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    result = {"losses": trainer.losses, "tokens": trainer.tokens, "lrs": timer.lrs, "step_s": step_s,
              "first_loss_fp32": float(first_fp32), "first_rewards_fp32": out.logits.squeeze(-1).tolist(),
              "loss_on_our_rewards": float(on_ours), "heldout_rewards": [rc, rr], "heldout_accuracy": accuracy(rc, rr),
              "ids_equal": {"train": ids_train, "train_of": len(ds), "held": ids_held, "held_of": len(held_ds)},
              "model_class": model_class, "attn_implementation": attn, "trl": trl.__version__,
              "transformers": transformers.__version__,
              "phases_s": {"imports": t_imported - t_start, "load": t_loaded - t_imported, "tokenize": t_ready - t_loaded,
                           "train": t_trained - t0, "heldout_eval": time.perf_counter() - t_trained}}
    Path(spec["result"]).write_text(json.dumps(result))


class _Fixed:
    """Stands in for the model in TRL's ``compute_loss``: returns the given rewards [2B] as logits."""

    def __init__(self, rewards):
        self.rewards = rewards

    def __call__(self, **inputs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=self.rewards[:, None])  # [2B, 1], as num_labels=1 gives


def _same_ids(dataset, want: list) -> int:
    """How many rows of TRL's tokenized ``dataset`` hold exactly our (chosen, rejected) ids."""
    return sum([c, r] == w for c, r, w in zip(dataset["chosen_ids"], dataset["rejected_ids"], want))


# -- the comparison ---------------------------------------------------------------------------------------
def side(losses, lrs, step_s, tokens, acc, n_held, child) -> dict:
    late = slice(1, None) if len(step_s) > 1 else slice(None)
    tail = losses[-min(10, len(losses)):]
    return {"heldout_accuracy": acc, "ci95": wilson(acc, n_held), "first_step_loss": losses[0],
            "final_loss_mean_last10": sum(tail) / len(tail), "tokens_per_s": sum(tokens[late]) / sum(step_s[late]),
            "losses": losses, "lrs": lrs, "step_s": step_s, **child}


def compare(args, ref, data, order, ours_child, trl_child, work) -> dict:
    from opengemma.train.metrics import read_records

    recs = read_records(work / "ours-run")
    rm_report = json.loads((work / "ours-run" / "rm_report.json").read_text())
    n, m = len(data["train"]), len(data["held"])
    if rm_report["train_pairs"] != n or rm_report["heldout_pairs"] != m:
        fail(f"`train rm` split the pairs differently ({rm_report['train_pairs']} train / {rm_report['heldout_pairs']} "
             f"held out, expected {n} / {m})")
    steps = [[data["train"][i][1] for i in order[s * args.batch:(s + 1) * args.batch]] for s in range(args.steps)]
    tokens = [sum(len(e.chosen) + len(e.rejected) for e in step) for step in steps]  # real tokens per step
    padded = sum(2 * len(step) * max(max(len(e.chosen), len(e.rejected)) for e in step) for step in steps)
    ours = side([r["loss"] for r in recs], [r["lr"] for r in recs], [r["step_s"] for r in recs], tokens,
                rm_report["heldout_accuracy"], m, ours_child)
    t = json.loads((work / "trl.json").read_text())
    theirs = side(t["losses"], t["lrs"], t["step_s"], tokens, t["heldout_accuracy"], m, trl_child)
    for k in ("ids_equal", "model_class", "attn_implementation", "phases_s", "heldout_rewards"):
        theirs[k] = t[k]
    checks = {
        "ids_equal": t["ids_equal"],
        "same_tokens_every_step": t["tokens"] == tokens,
        "lr_max_abs_diff": max(abs(a - b) for a, b in zip(ours["lrs"], theirs["lrs"])),
        "first_step_loss_abs_diff": abs(ours["first_step_loss"] - theirs["first_step_loss"]),
        "loss_max_abs_diff_any_step": max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"])),
        "fp32_first_batch": {
            "loss_on_identical_rewards": {"opengemma": ref["first_loss_fp32"], "trl_compute_loss": t["loss_on_our_rewards"],
                                          "abs_diff": abs(ref["first_loss_fp32"] - t["loss_on_our_rewards"])},
            "loss_through_each_forward": {"opengemma": ref["first_loss_fp32"], "trl": t["first_loss_fp32"],
                                          "abs_diff": abs(ref["first_loss_fp32"] - t["first_loss_fp32"])},
            "reward_max_abs_diff": max(abs(a - b) for a, b in zip(ref["first_rewards_fp32"], t["first_rewards_fp32"])),
            "reward_max_abs": max(abs(a) for a in ref["first_rewards_fp32"])}}
    ratios = {"tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
              "peak_rss": ours["peak_rss_mib"] / theirs["peak_rss_mib"], "wall": ours["wall_s"] / theirs["wall_s"]}
    from machine import git_state, machine_info

    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                if k not in ("worker", "record", "keep")}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(args.threads), "git": git_state(), "argv": sys.argv[1:], "settings": settings,
            "model": ref["model_name"], "versions": {"trl": t["trl"], "transformers": t["transformers"]},
            "data": {"file": str(args.data), "pairs_read": data["pairs_read"], "skipped": data["skips"],
                     "train_pairs": n, "heldout_pairs": m, "distinct_train_pairs_seen": len(set(order)),
                     "heldout_rule": f"blake2b-64(chosen token ids) < {args.heldout_pct}% of 2**64, first {m}",
                     "mean_tokens_per_pair": sum(tokens) / (args.steps * args.batch),
                     "padded_over_real_tokens": padded / sum(tokens)},
            "baselines": ref["baselines"], "baselines_s": ref["baselines_s"], "convert_s": ref["convert_s"],
            "opengemma": {**ours, "command": ref["ours_cmd"]}, "trl": theirs, "checks": checks, "ratios": ratios}


def fmt_acc(d: dict) -> str:
    return f"{d['heldout_accuracy' if 'heldout_accuracy' in d else 'accuracy']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"


def report_lines(r: dict) -> list[str]:
    o, t, c, s, d = r["opengemma"], r["trl"], r["checks"], r["settings"], r["data"]
    mode = f"LoRA r={s['lora_rank']}" if s["lora_rank"] else "full fine-tuning"
    title = (f"{r['model']}: {d['train_pairs']} training pairs ({d['distinct_train_pairs_seen']} seen), "
             f"{d['heldout_pairs']} held out; {s['steps']} steps x {s['batch']} pairs, lr {s['lr']:g} -> {s['min_lr']:g} "
             f"(warmup {s['warmup']}, cosine), max length {s['max_len']}, {s['dtype']}, {s['threads']} threads, "
             f"seed {s['seed']}, {mode}; {d['mean_tokens_per_pair']:.0f} tokens a pair, batches padded to their "
             f"longest row on both sides ({d['padded_over_real_tokens']:.2f}x the real tokens)")
    rows = [("held-out accuracy [95% CI]", fmt_acc(o), fmt_acc(t)),
            ("first-step loss", f"{o['first_step_loss']:.6f}", f"{t['first_step_loss']:.6f}"),
            ("mean loss, last 10 steps", f"{o['final_loss_mean_last10']:.4f}", f"{t['final_loss_mean_last10']:.4f}"),
            ("training tokens/s (steps 2..)", f"{o['tokens_per_s']:,.0f}", f"{t['tokens_per_s']:,.0f}"),
            ("peak RSS (MiB)", f"{o['peak_rss_mib']:,.0f}", f"{t['peak_rss_mib']:,.0f}"),
            ("wall time (s)", f"{o['wall_s']:,.1f}", f"{t['wall_s']:,.1f}"),
            ("other processes' CPU (cores)", f"{o['other_cores']:.2f}", f"{t['other_cores']:.2f}")]
    q = r["ratios"]
    ratios = f"opengemma / TRL: tokens/s {q['tokens_per_s']:.2f}x, peak RSS {q['peak_rss']:.2f}x, wall {q['wall']:.2f}x"
    baselines = "baselines on the same held-out pairs: " + ", ".join(
        f"{k} {fmt_acc(v)}" for k, v in r["baselines"].items())
    ids = c["ids_equal"]
    checks = (f"checks: TRL's token ids equal ours for {ids['train']}/{ids['train_of']} training rows (steps x batch) "
              f"and {ids['held']}/{ids['held_of']} held-out pairs; same tokens every step: {c['same_tokens_every_step']}; "
              f"learning rates max |diff| {c['lr_max_abs_diff']:.2e}; loss |diff| at the first step "
              f"{c['first_step_loss_abs_diff']:.2e}, at any step {c['loss_max_abs_diff_any_step']:.2e} ({s['dtype']})")
    f = c["fp32_first_batch"]
    same, fwd = f["loss_on_identical_rewards"], f["loss_through_each_forward"]
    sanity = (f"fp32 sanity, first batch: opengemma's loss {same['opengemma']:.8f}, TRL's compute_loss on the same "
              f"rewards {same['trl_compute_loss']:.8f}, |diff| {same['abs_diff']:.1e} (target 1e-6: "
              f"{'met' if same['abs_diff'] <= 1e-6 else 'NOT met'}); through transformers' forward (same weights and "
              f"head) {fwd['trl']:.8f}, |diff| {fwd['abs_diff']:.1e}, rewards max |diff| {f['reward_max_abs_diff']:.1e} "
              f"(rewards up to {f['reward_max_abs']:.3g}: two fp32 forwards, different rounding)")
    lines = [title, "", "| | opengemma `train rm` | TRL RewardTrainer |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {e} |" for a, b, e in rows]
    lines += ["", ratios, "", baselines, "", checks, sanity]
    busy = max(o["other_cores"], t["other_cores"])
    if busy > 0.25:
        lines.append(f"Contended: other processes used up to {busy:.2f} cores during a run; speed figures are pessimistic.")
    return lines


def record(r: dict, name: str) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(r, indent=1) + "\n")
    m, o, v, g = r["machine"], r["opengemma"], r["versions"], r["git"]
    dirty = " (+ uncommitted changes)" if g.get("opengemma_uncommitted_changes") else ""
    machine = (f"Date {r['date']}; {m['cpu']}, {m['usable_cores']} usable cores, {m['threads']} threads; "
               f"torch {m['torch']}, transformers {v['transformers']}, trl {v['trl']}; commit {g['commit']}{dirty}.")
    models = (f"TRL model: `{r['trl']['model_class']}` ({r['trl']['attn_implementation']} attention); "
              f"opengemma command: `{shlex.join(['opengemma'] + o['command'][3:])}`")
    head = [f"# Reward model: opengemma `train rm` vs TRL `RewardTrainer` ({name})", "", machine, "",
            f"Command: `python bench/bench_rm_trl.py {shlex.join(r['argv'])}`", "",
            f"Data: {r['data']['file']} ({r['data']['pairs_read']} pairs read); held-out rule: {r['data']['heldout_rule']}.",
            models, ""]
    png = out / f"{name}.png"
    tail = ["", f"Curves: [{png.name}]({png.name})" if plot(r, png) else "No curves (matplotlib missing)."]
    (out / f"{name}.md").write_text("\n".join(head + report_lines(r) + tail) + "\n")
    say(f"wrote {out / name}.json, .md" + (", .png" if png.exists() else ""))


def plot(r: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label, style in (("opengemma", "opengemma train rm", "-"), ("trl", "TRL RewardTrainer", "--")):
        d = r[key]
        ax.plot(range(1, len(d["losses"]) + 1), d["losses"], style,
                label=f"{label} (held-out acc {d['heldout_accuracy']:.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (Bradley-Terry)")
    ax.set_title(f"{r['model']}: {r['settings']['dtype']}, batch {r['settings']['batch']} pairs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model: checkpoint, GGUF or preset (default: the embedded 270M)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="preference pairs: hh-rlhf, TRL or oasst JSONL (default: the shipped hh-rlhf harmless-base file)")
    p.add_argument("--pairs", type=int, default=0, help="training pairs, the first N of the split (default 0: all)")
    p.add_argument("--heldout-pairs", type=int, default=0, help="held-out pairs, the first N (default 0: all)")
    p.add_argument("--heldout-pct", type=float, default=10.0, help="share held out by the hash rule (default 10)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (one micro-batch)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--min-lr", type=float, default=None, help="final learning rate (default lr / 10)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of --steps, as `train rm`)")
    p.add_argument("--max-len", type=int, default=512, help="pairs with a longer side (tokens) are dropped")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tuning; R > 0 needs peft for TRL's side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="both sides recompute each block in backward (TRL: gradient_checkpointing): less memory")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S", help="first wait (at most S s) for an idle machine")
    p.add_argument("--record", metavar="NAME", help="write bench/results/NAME.json, .md and .png")
    p.add_argument("--keep", type=Path, default=None, metavar="DIR", help="work in DIR and keep it (runs, checkpoints)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return trl_worker(args.worker)
    for name in ("pairs", "heldout_pairs", "lora_rank", "warmup"):
        if (getattr(args, name) or 0) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0")
    if min(args.steps, args.batch, args.max_len, args.threads) < 1 or args.lr <= 0 or not 0 < args.heldout_pct < 100:
        fail("--steps, --batch, --max-len, --threads and --lr must be positive, --heldout-pct in (0, 100)")
    if not args.data.is_file():
        fail(f"{args.data}: no such data file")
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    args.warmup = min(args.steps, args.steps // 20 if args.warmup is None else args.warmup)
    import importlib.util

    missing = [m for m in ("trl", "transformers", "datasets") + (("peft",) if args.lora_rank else ())
               if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"TRL's side needs {', '.join(missing)} (pip install {' '.join(missing)})"
             + ("; without peft, run full fine-tuning (--lora-rank 0)" if "peft" in missing else ""))
    from opengemma.errors import OpenGemmaError

    if args.wait_idle:
        from machine import wait_idle

        wait_idle(args.wait_idle, say)
    with tempfile.TemporaryDirectory(prefix="bench_rm_trl-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            r = run(args, work)
        except OpenGemmaError as e:
            fail(str(e))
    print("\n".join(report_lines(r)))
    if args.record:
        record(r, args.record)


def run(args, work: Path) -> dict:
    import torch

    from opengemma.train.pretrain import build

    torch.set_num_threads(args.threads)
    say(f"work directory {work}")
    base = materialize_base(args, work)
    torch.manual_seed(args.seed)
    lm, tok, _ = build(base, None, args.seed, "cpu")
    if args.max_len > lm.config.context_length:
        fail(f"--max-len {args.max_len} is longer than the model's context ({lm.config.context_length})")
    data = select_pairs(args, tok)
    order = step_order(len(data["train"]), args)
    say(f"{len(data['train'])} training / {len(data['held'])} held-out pairs; baselines and the fp32 first batch")
    ref = prepare_reference(args, lm, max(0, tok.pad_id), data, order, work)
    ref["model_name"] = lm.config.name
    del lm  # the children measure their own memory; this one need not hold a model meanwhile
    hf_dir = work / "hf"
    t0 = time.perf_counter()
    run_child([sys.executable, "-m", "opengemma", "convert", base, str(hf_dir), "--to", "hf", "--force"],
              work / "convert.log", args.threads)
    ref["convert_s"] = time.perf_counter() - t0
    spec = write_inputs(args, data, order, ref, work, hf_dir)
    ref["ours_cmd"] = ours_command(args, base, work, len(data["held"]))
    say("opengemma: " + shlex.join(ref["ours_cmd"]))
    ours = run_child(ref["ours_cmd"], work / "ours.log", args.threads)
    say(f"opengemma done in {ours['wall_s']:.1f} s; TRL RewardTrainer")
    theirs = run_child([sys.executable, __file__, "--worker", str(spec)], work / "trl.log", args.threads)
    say(f"TRL done in {theirs['wall_s']:.1f} s")
    return compare(args, ref, data, order, ours, theirs, work)


if __name__ == "__main__":
    main()
