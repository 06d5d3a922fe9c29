"""Learning-rate schedules as pure functions of the optimizer step: linear warmup, then cosine
decay, warmup-stable-decay (WSD) or constant.

A function of the step alone (no scheduler object with its own counter) makes resuming trivial:
the checkpoint's step is the schedule's whole state, whatever the number of ranks.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int, schedule: str = "cosine",
          decay_steps: int = 0) -> float:
    """The learning rate for optimizer step ``step`` (0-based).

    * warmup: ``lr * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (the first
      step already moves, by lr / warmup_steps);
    * ``cosine``: from ``lr`` down to ``min_lr`` over the remaining steps, half a cosine;
    * ``wsd``: ``lr`` until the last ``decay_steps`` steps, then linearly down to ``min_lr``
      (warmup-stable-decay: the stable phase can be extended and decayed from any point);
    * ``constant``: ``lr`` after the warmup.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps - 1)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        start = max(warmup_steps, max_steps - decay_steps)
        if step < start:
            return lr
        progress = min(1.0, (step - start + 1) / max(1, max_steps - start))
        return lr + (min_lr - lr) * progress
    raise ValueError(f"unknown schedule {schedule!r} (cosine, wsd or constant)")
