"""Loss functions for the training loop: pure functions of (model, micro-batch) -> LossOutput.

:func:`next_token_loss` is pretraining's and SFT's loss: the model's trunk over packed rows
(segment ids keep documents apart), then the summed ``-log p(target)`` of
:func:`opengemma.logprobs.token_nll_sum`, whose fused autograd function never holds more than a
budget of the [tokens, 256k] fp32 logits and forms the tied head's gradients chunk by chunk into
one buffer (Gemma 2's final-logit soft-cap included). The loss is returned as a SUM
over supervised tokens with their count: the loop divides by the global count over micro-batches
and ranks, so accumulation and the number of processes never change the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..logprobs import token_nll_sum


@dataclass
class LossOutput:
    """One micro-batch's loss: ``loss_sum`` (a scalar: the SUM of per-unit losses), ``count``
    (supervised units in it: tokens for a language model, pairs for a reward model, ...), and
    extra ``metrics`` the loop sums over micro-batches and ranks. Metric keys:

    * ``NAME_sum`` with a matching ``NAME_count``: logged as ``NAME`` = total sum / total count
      (per-source losses: ``loss/web_sum`` and ``loss/web_count`` -> ``loss/web``);
    * ``NAME_mean``: averaged over micro-batches and ranks;
    * any other key: a sum, divided by the global ``count`` (a per-unit average).
    """

    loss_sum: torch.Tensor
    count: torch.Tensor | int
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


def next_token_loss(model, tokens: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
                    segment_ids: torch.Tensor | None = None, *, groups: torch.Tensor | None = None,
                    group_names: Sequence[str] = (), budget: int | None = None) -> LossOutput:
    """Next-token cross-entropy for ``tokens`` [B, T] -> ``targets`` [B, T], counted where
    ``loss_mask`` [B, T] is true. ``segment_ids`` [B, T]: packed documents (positions restart and
    attention stays within a document). ``groups`` [B, T] (int, index into ``group_names``, -1 =
    none): per-group loss sums and counts in the metrics (the mixture's per-source loss).
    ``budget``: bytes of fp32 logits held at once (default :data:`opengemma.logprobs.LOGITS_BUDGET`)."""
    hidden = model.trunk(tokens, segment_ids=segment_ids)  # [B, T, D]
    mask = loss_mask.to(torch.bool)
    # Only supervised positions go through the 256k-wide head: padding and prompt tokens cost nothing.
    kw = {"budget": budget} if budget is not None else {}
    h, t = hidden[mask], targets[mask]  # [N, D], [N]
    if h.shape[0]:
        loss_sum, nll = token_nll_sum(model, h, t, **kw)  # scalar, [N] fp32 (detached)
    else:  # an exact 0 that still depends on the weights: no NaN, a zero gradient
        loss_sum, nll = hidden.sum() * 0.0, h.new_zeros(0, dtype=torch.float32)
    metrics: dict[str, torch.Tensor | float] = {}
    if groups is not None and group_names:
        g = groups[mask]  # [N]
        with torch.no_grad():
            for i, name in enumerate(group_names):
                sel = g == i
                metrics[f"loss/{name}_sum"] = nll[sel].sum()
                metrics[f"loss/{name}_count"] = sel.sum()
    return LossOutput(loss_sum=loss_sum, count=mask.sum(), metrics=metrics)
