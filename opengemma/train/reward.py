"""The reward model: the Gemma trunk plus a scalar head read at the final token of a formatted
conversation, trained on preference pairs under the Bradley-Terry model.

Report section "Instruction Tuning / RLHF": a reward model trained on labelled preference data
under the Bradley-Terry model (``P(chosen > rejected) = sigmoid(r_c - r_r)``), then used to
optimise the policy. The loss per pair is TRL's ``RewardTrainer`` loss exactly:

    -log sigmoid(r_c - r_r - margin) + c * (r_c + r_r)^2

with an optional per-pair ``margin`` (Llama 2's margin loss) and reward **centring** ``c``
(Eisenstein et al. 2023: keeps rewards near zero so that different RMs are comparable). The
loop gets the SUM over pairs and their count, so its normalisation by the global count gives
TRL's mean.

The head is ``nn.Linear(d_model, 1)`` (with bias) in fp32 on the final-normed hidden state of the
last real token (rows are right-padded; causal attention means padding never reaches it). An RM
directory is an opengemma native checkpoint of the trunk (``opengemma chat`` still loads it as a
language model) plus ``reward_head.safetensors`` and ``reward.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..chat import format_chat
from ..errors import OpenGemmaError
from .losses import LossOutput
from .prefs import Pair, Skips

HEAD_FILE = "reward_head.safetensors"
INFO_FILE = "reward.json"
FORMAT = "opengemma-reward"


class RewardModel(nn.Module):
    """``lm.trunk`` -> hidden at each row's last token -> ``head`` -> one fp32 reward per row."""

    def __init__(self, lm: nn.Module, *, generator: torch.Generator | None = None):
        super().__init__()
        self.lm = lm
        w = lm.final_norm.weight
        self.head = nn.Linear(lm.config.d_model, 1, device=w.device, dtype=torch.float32)
        with torch.no_grad():  # HF's sequence-classification init: N(0, 0.02); bias 0
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=generator) * 0.02)
            self.head.bias.zero_()

    @property
    def config(self):
        return self.lm.config

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rewards [B] (fp32) for right-padded ``tokens`` [B, T] with ``lengths`` [B] real tokens."""
        hidden = self.lm.trunk(tokens)  # [B, T, D]
        last = hidden[torch.arange(tokens.shape[0], device=tokens.device), lengths.to(tokens.device) - 1]  # [B, D]
        return self.head(last.float())[:, 0]  # [B]


def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                  center: float = 0.0) -> torch.Tensor:
    """Per-pair loss [B]: ``-log sigmoid(r_c - r_r - margin) + center * (r_c + r_r)^2``."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)  # [B]; logsigmoid is exact where log(sigmoid(x)) underflows
    if center:
        loss = loss + center * (r_chosen + r_rejected) ** 2
    return loss


@dataclass
class PairBatch:
    """Chosen rows then rejected rows: tokens [2B, T] right-padded, lengths [2B], margin [B] or None."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    margin: torch.Tensor | None

    @property
    def pairs(self) -> int:
        return self.tokens.shape[0] // 2


@dataclass
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    margin: float | None
    chosen_mask: list[int]
    rejected_mask: list[int]


def encode_pairs(tokenizer, pairs: Sequence[Pair], max_len: int, skips: Skips) -> list[EncodedPair]:
    """Both sides through the chat formatter; a pair with a side over ``max_len`` tokens is dropped
    and counted (truncating would cut off the very replies being compared)."""
    out = []
    for i, p in enumerate(pairs):
        try:
            c = format_chat(tokenizer, p.chosen, add_generation_prompt=False)
            r = format_chat(tokenizer, p.rejected, add_generation_prompt=False)
        except OpenGemmaError as e:
            skips.add("format_error", f"pair {i}: {e}")
            continue
        if c.ids == r.ids:
            skips.add("identical_sides", f"pair {i} (identical after formatting)")
            continue
        if max(len(c), len(r)) > max_len:
            skips.add("overlong_dropped", f"pair {i} ({max(len(c), len(r))} tokens)")
            continue
        out.append(EncodedPair(c.ids, r.ids, p.margin, c.mask, r.mask))
    return out


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int = 0) -> PairBatch:
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # [2B, T]
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)  # [2B]
    margin = (torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)
              if any(p.margin is not None for p in pairs) else None)
    return PairBatch(tokens, lengths, margin)


def rm_loss(center: float = 0.0):
    """The loss function of :func:`opengemma.train.loop.fit` for a :class:`RewardModel`."""

    def loss_fn(model, batch: PairBatch) -> LossOutput:
        dev = model.head.weight.device
        rewards = model(batch.tokens.to(dev), batch.lengths.to(dev))  # [2B]
        rc, rr = rewards.chunk(2)  # [B] each
        margin = batch.margin.to(dev) if batch.margin is not None else None
        loss = bradley_terry(rc, rr, margin, center)
        with torch.no_grad():
            metrics = {"accuracy": (rc > rr).float().sum(), "margin": (rc - rr).sum(),
                       "reward_sum": rewards.sum(), "reward_count": rewards.numel()}
        return LossOutput(loss_sum=loss.sum(), count=batch.pairs, metrics=metrics)

    return loss_fn


class PairBatches:
    """``global_batch`` pairs per optimizer step in micro-batches, a seeded permutation per epoch."""

    def __init__(self, pairs: list[EncodedPair], *, global_batch: int, micro_batch: int, seed: int = 0, pad_id: int = 0):
        from .data import RowStream

        self.stream = RowStream(pairs, seed, "training pairs")
        self.global_batch, self.micro_batch, self.pad_id = global_batch, micro_batch, pad_id

    def next(self, model, step: int) -> list[PairBatch]:
        picked = [next(self.stream) for _ in range(self.global_batch)]
        return [collate_pairs(picked[i:i + self.micro_batch], self.pad_id)
                for i in range(0, len(picked), self.micro_batch)]

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.stream.load_state_dict(d)


# -- evaluation and baselines -----------------------------------------------------------------------------
@torch.no_grad()
def pair_rewards(model: RewardModel, pairs: Sequence[EncodedPair], batch: int = 8, pad_id: int = 0):
    """(chosen rewards, rejected rewards) as lists of floats."""
    rc, rr = [], []
    dev = model.head.weight.device
    for i in range(0, len(pairs), batch):
        b = collate_pairs(pairs[i:i + batch], pad_id)
        r = model(b.tokens.to(dev), b.lengths.to(dev))
        c, j = r.chunk(2)
        rc += c.tolist()
        rr += j.tolist()
    return rc, rr


def accuracy(rc: Sequence[float], rr: Sequence[float]) -> float:
    """Pairwise accuracy: chosen scored strictly above rejected (a tie counts half)."""
    if not rc:
        return float("nan")
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(rc, rr)) / len(rc)


def length_baseline(pairs: Sequence[EncodedPair]) -> float:
    """The longer answer wins (tokens of the whole formatted conversation)."""
    return accuracy([len(p.chosen) for p in pairs], [len(p.rejected) for p in pairs])


@torch.no_grad()
def likelihood_baseline(lm, pairs: Sequence[EncodedPair], pad_id: int = 0) -> dict:
    """The base model's log-likelihood of the model turns wins: total and per token."""
    from ..logprobs import token_logprobs

    def score(ids, mask):
        t = torch.tensor([ids], dtype=torch.long, device=lm.final_norm.weight.device)
        lp = token_logprobs(lm, lm.trunk(t[:, :-1]), t[:, 1:])[0]  # [n - 1]
        m = torch.tensor(mask[1:], dtype=torch.bool, device=lp.device)
        return float(lp[m].sum()), float(lp[m].mean()) if m.any() else 0.0

    sc = [score(p.chosen, p.chosen_mask) for p in pairs]
    sr = [score(p.rejected, p.rejected_mask) for p in pairs]
    return {"loglik_sum": accuracy([a[0] for a in sc], [a[0] for a in sr]),
            "loglik_mean": accuracy([a[1] for a in sc], [a[1] for a in sr])}


# -- files ------------------------------------------------------------------------------------------------
def save(dst, model: RewardModel, tokenizer_bytes: bytes | None, *, center: float = 0.0, extra: dict | None = None,
         dtype: torch.dtype = torch.float32) -> Path:
    """An RM directory: the trunk as a native checkpoint (adapters merged), the head, reward.json."""
    from safetensors.torch import save_file

    from ..atomic import atomic_write, atomic_write_bytes
    from ..checkpoints import native
    from .lora import merged_state_dict

    dst = Path(dst)
    state = {k: v.to(dtype) for k, v in merged_state_dict(model.lm).items()}
    native.save(dst, model.lm.config, state, tokenizer_model_bytes=tokenizer_bytes)
    head = {"weight": model.head.weight.detach().float().cpu().contiguous(),
            "bias": model.head.bias.detach().float().cpu().contiguous()}
    atomic_write(dst / HEAD_FILE, lambda tmp: save_file(head, tmp, metadata={"format": FORMAT}))
    info = {"format": FORMAT, "read_at": "final token of format_chat(messages, add_generation_prompt=False)",
            "center_rewards_coefficient": center, **(extra or {})}
    atomic_write_bytes(dst / INFO_FILE, (json.dumps(info, indent=1) + "\n").encode())
    return dst


def is_reward_model(path) -> bool:
    return (Path(path) / INFO_FILE).is_file() and (Path(path) / HEAD_FILE).is_file()


def load(path, *, dtype: str = "float32", device: str | None = None):
    """(RewardModel in eval mode, tokenizer) from an RM directory; one clear error if it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..api import load as load_lm

    path = Path(path)
    if not path.is_dir():
        raise OpenGemmaError(f"{path}: no such reward model directory")
    if not is_reward_model(path):
        raise OpenGemmaError(f"{path}: not a reward model (no {INFO_FILE} / {HEAD_FILE}; train one with "
                             "`opengemma train rm` and export it)")
    g = load_lm(str(path), dtype=dtype, device=device)
    rm = RewardModel(g.model)
    try:
        head = load_file(path / HEAD_FILE)
        with torch.no_grad():
            rm.head.weight.copy_(head["weight"])
            rm.head.bias.copy_(head["bias"])
    except (SafetensorError, OSError, KeyError, RuntimeError) as e:
        raise OpenGemmaError(f"{path / HEAD_FILE}: corrupt or not a reward head ({e})") from None
    if not all(torch.isfinite(p).all() for p in rm.head.parameters()):
        raise OpenGemmaError(f"{path / HEAD_FILE}: the reward head holds NaN or infinite values")
    return rm.eval(), g.tokenizer


@torch.no_grad()
def score(model: RewardModel, tokenizer, conversations: Sequence[Sequence[dict]], *, batch: int = 8) -> list[float]:
    """One reward per complete conversation (each through the chat formatter, no generation prompt)."""
    ids = [format_chat(tokenizer, c, add_generation_prompt=False).ids for c in conversations]
    ctx = model.config.context_length
    if any(len(x) > ctx for x in ids):
        raise OpenGemmaError(f"a conversation is longer than the reward model's context ({ctx} tokens)")
    out: list[float] = []
    dev = model.head.weight.device
    pad = getattr(tokenizer, "pad_id", 0) or 0
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch]
        T = max(len(x) for x in chunk)
        tokens = torch.full((len(chunk), T), pad, dtype=torch.long)
        for j, x in enumerate(chunk):
            tokens[j, :len(x)] = torch.tensor(x)
        out += model(tokens.to(dev), torch.tensor([len(x) for x in chunk], device=dev)).tolist()
    return out


def rebuild(run_dir, run: dict, checkpoint) -> RewardModel:
    """A run's reward model (adapters if any) with the weights of ``checkpoint``, one process, CPU."""
    from ..config import GemmaConfig
    from ..model import GemmaModel
    from .lora import LoRAConfig, apply_lora, load_base
    from .state import holds_all_weights, load_model_weights

    lm = GemmaModel(GemmaConfig.from_dict(run["model_config"]))
    rm = RewardModel(lm)
    if "lora" in run:
        if not holds_all_weights(Path(checkpoint)):
            load_base(lm, run_dir, run, checkpoint)
        apply_lora(lm, LoRAConfig.from_dict(run["lora"]))
    load_model_weights(Path(checkpoint), rm)
    return rm.eval()


def export_run(run_dir, run: dict, checkpoint, dst, *, hf: bool = False, dtype=torch.float32) -> Path:
    """``opengemma train export`` of a reward-model run: an RM directory."""
    if hf:
        raise OpenGemmaError("a reward model exports in opengemma's layout only (drop --hf)")
    rm = rebuild(run_dir, run, checkpoint)
    tok = Path(run_dir) / run.get("tokenizer", "tokenizer.model")
    return save(dst, rm, tok.read_bytes() if tok.is_file() else None, center=run.get("center", 0.0),
                extra={"trained_from": run.get("model"), "heldout": run.get("heldout")}, dtype=dtype)
