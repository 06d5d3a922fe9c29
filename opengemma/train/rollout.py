"""RL rollouts from opengemma's own batched generation engine, on the very weights being trained.

The pieces are :mod:`opengemma.generate`'s: :func:`~opengemma.generate.prefill` of all prompts into
one preallocated KV cache, :func:`~opengemma.generate.decode_step` per token, the sampler
(:func:`opengemma.sampling.sample_next_token`) with one seeded ``torch.Generator`` and
:class:`~opengemma.generate.RowState` for stop tokens and budgets. There is no second copy of the
policy to keep in sync: the model that ``fit`` is training generates, under ``inference_mode``,
between two optimizer steps.

What RL adds is the **log-probability of every sampled token under the distribution it was
sampled from**, recorded at sampling time. Rollouts sample the policy itself (temperature 1, no
top-k/top-p: a tempered or truncated sampler would be a different policy than the one whose
log-probs the trainer differentiates), so that log-prob is ``log_softmax(logits)[token]`` of the
decode step's fp32 logits. The trainer recomputes it with one full-sequence forward
(:func:`sequence_logprobs`: ``trunk`` + :func:`opengemma.logprobs.token_logprobs`); the two differ
only by the KV-cache path's floating-point order. Measured (tests/test_tune_rl.py) in fp32 on the
tiny models: max |difference| below :data:`LOGPROB_TOLERANCE` = 1e-4 nats per token. With
``--dtype bf16`` the rollouts run under the trainer's autocast (``fit`` runs the batch source so);
the gap is then below :data:`LOGPROB_TOLERANCE_BF16`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import OpenGemmaError
from ..generate import (
    RowState,
    cache_length,
    decode_step,
    finite_rows,
    make_generator,
    nonfinite_error,
    prefill,
)
from ..logprobs import token_logprobs
from ..sampling import sample_next_token

LOGPROB_TOLERANCE = 1e-4  # nats per token, fp32: sampler (KV cache, per step) vs trainer (one forward)
# bf16 (rollouts under the loop's autocast, as the trainer): measured on the tiny models 0.014-0.019
# (Gemma 3: the cached step and the full forward reach bf16 attention through different kernels)
# and below 1e-6 (Gemma 2, whose soft-capped attention takes one path in both).
LOGPROB_TOLERANCE_BF16 = 0.05


@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int]  # every sampled token, a final stop token included (the policy chose to stop)
    logprobs: list[float]  # the sampler's log p of each completion token
    text: str  # the completion's text (stop token excluded)
    finish_reason: str  # "stop" or "length"


def _stop_ids(tokenizer) -> frozenset[int]:
    ids = getattr(tokenizer, "stop_ids", None) or (tokenizer.eos_id, tokenizer.end_of_turn_id)
    return frozenset(i for i in ids if isinstance(i, int) and i >= 0)


@torch.no_grad()
def rollout(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, seed: int,
            greedy: bool = False) -> list[Rollout]:
    """Sample one completion per prompt (repeat a prompt for a group), all rows in one batch.

    ``greedy``: argmax instead of sampling (evaluation); the recorded log-probs are still those of
    the policy's distribution. The model is put in eval mode for the duration (LoRA dropout off)."""
    if not prompts:
        raise OpenGemmaError("no prompts to roll out")
    ctx = model.config.context_length
    rows = []
    for p in prompts:
        if len(p) >= ctx:
            raise OpenGemmaError(f"an RL prompt has {len(p)} tokens, the model's context is {ctx}")
        rows.append(RowState(p, min(max_new_tokens, ctx - len(p)), _stop_ids(tokenizer), tokenizer))
    was_training = model.training
    model.eval()
    dev = model.final_norm.weight.device
    g = make_generator(seed, dev)
    pad = getattr(tokenizer, "pad_id", 0)
    pad = pad if isinstance(pad, int) and pad >= 0 else 0
    B = len(rows)
    sampled: list[list[int]] = [[] for _ in rows]
    logps: list[list[float]] = [[] for _ in rows]
    try:
        with torch.inference_mode():
            cache = model.make_cache(B, cache_length(rows, ctx))
            logits = prefill(model, cache, [r.prompt_ids for r in rows], pad_id=pad)  # [B, V]
            step_tokens = torch.full((B, 1), pad, dtype=torch.long, device=dev)  # [B, 1]
            step_pos = torch.full((B, 1), -1, dtype=torch.long, device=dev)  # [B, 1]
            step = 0
            while True:
                step += 1
                logits = logits.float()
                finite = finite_rows(logits)  # [B]
                if any(not r.finished and not ok for r, ok in zip(rows, finite.tolist())):
                    raise nonfinite_error(step, logits.dtype)
                if not bool(finite.all()):
                    # Only finished rows here: their logits are meaningless (under bf16 a fully masked
                    # query can give NaN); zeros keep the sampler quiet and its per-row draws, hence
                    # the RNG, unchanged.
                    logits = torch.where(finite[:, None], logits, 0.0)  # [B, V]
                ids = logits.argmax(-1) if greedy else sample_next_token(logits, g, 1.0)  # [B]
                lp = torch.log_softmax(logits, dim=-1).gather(1, ids[:, None])[:, 0]  # [B]
                for i, (t, v) in enumerate(zip(ids.tolist(), lp.tolist())):
                    r = rows[i]
                    if not r.finished:
                        sampled[i].append(t)
                        logps[i].append(v)
                        r.push(t)
                if all(r.finished for r in rows):
                    break
                step_tokens.copy_(ids[:, None])
                step_pos.copy_(torch.tensor([r.position if not r.finished else -1 for r in rows])[:, None])
                logits = decode_step(model, step_tokens, step_pos, cache)  # [B, V]
    finally:
        model.train(was_training)
    return [Rollout(list(r.prompt_ids), s, lp, r.text, r.finish_reason or "length")
            for r, s, lp in zip(rows, sampled, logps)]


@dataclass
class SeqBatch:
    """Rollouts as training rows: ``tokens`` [B, T] (prompt + completion, right-padded, inputs),
    ``targets`` [B, T] (shifted by one), ``mask`` [B, T] (True where the target is a completion
    token), ``old_logprobs`` [B, T] (the sampler's, at completion targets; 0 elsewhere)."""

    tokens: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor


def to_batch(rolls: Sequence[Rollout], pad_id: int = 0) -> SeqBatch:
    seqs = [r.prompt_ids + r.completion_ids for r in rolls]
    T = max(len(s) for s in seqs) - 1
    B = len(rolls)
    full = torch.full((B, T + 1), pad_id, dtype=torch.long)  # [B, T + 1]
    mask = torch.zeros(B, T, dtype=torch.bool)  # [B, T]
    old = torch.zeros(B, T, dtype=torch.float32)  # [B, T]
    for i, (r, s) in enumerate(zip(rolls, seqs)):
        full[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        a, n = len(r.prompt_ids) - 1, len(r.completion_ids)  # target index of the first completion token
        mask[i, a:a + n] = True
        old[i, a:a + n] = torch.tensor(r.logprobs, dtype=torch.float32)
    return SeqBatch(full[:, :-1], full[:, 1:], mask, old)


def sequence_logprobs(model, batch: SeqBatch) -> torch.Tensor:
    """The trainer's log p of every target [B, T] (fp32; 0 where ``mask`` is False), differentiable
    when grad is enabled: one causal forward of the right-padded rows (padding comes after every
    real token, so it never reaches them)."""
    dev = model.final_norm.weight.device if hasattr(model, "final_norm") else batch.tokens.device
    tokens, targets, mask = batch.tokens.to(dev), batch.targets.to(dev), batch.mask.to(dev)
    hidden = model.trunk(tokens)  # [B, T, D]
    out = torch.zeros(mask.shape, dtype=torch.float32, device=dev)  # [B, T]
    if mask.any():
        out = out.masked_scatter(mask, token_logprobs(model, hidden[mask], targets[mask]))  # [N] into [B, T]
    else:
        out = out + hidden.sum() * 0.0  # keeps the graph: zero gradient, not an error
    return out
