"""Training configuration: one frozen dataclass, plus recipes as plain data.

:class:`TrainConfig` holds what the loop needs (optimizer, schedule, batch geometry, precision,
checkpointing and logging cadence). The **global batch** (rows per optimizer step, all ranks
together) is a setting of its own: :meth:`TrainConfig.resolved` derives the per-rank
accumulation from it and the data-parallel degree, so the number of processes changes how the
work is split, never what is trained. Recipes (:data:`RECIPES`) are dictionaries of overrides, as
``opengemma.config.PRESETS`` are configs: no registry, no YAML.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import OpenGemmaError

SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("fp32", "bf16")
# Choices of the instruction-tuning runs, here (not in sft/rl) so that the command line's parser
# can name them without importing those modules at every start.
SFT_FILTERS = ("pii", "toxicity", "selfid", "dedup")  # the default filters of `train sft`
ALL_SFT_FILTERS = SFT_FILTERS + ("dedup-near",)
TOXICITY_THRESHOLD = 0.8  # replies scoring at least this are dropped
RL_ALGOS = ("rloo", "grpo", "jbond")


@dataclass(frozen=True)
class TrainConfig:
    # optimizer (AdamW; weight decay on matrices only, not on norms)
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_steps: int = 0  # wsd: length of the final decay
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    max_steps: int = 100
    # batch geometry: rows of seq_len tokens
    micro_batch: int = 1  # rows per forward/backward on one rank
    global_batch: int | None = None  # rows per optimizer step over all ranks (None: micro_batch * grad_accum * dp)
    grad_accum: int = 1  # micro-batches per optimizer step PER RANK (derived from global_batch when given)
    seq_len: int = 512
    # precision and speed
    dtype: str = "fp32"  # fp32 | bf16 (bf16 compute, fp32 master weights, optimizer state and reductions)
    activation_checkpointing: bool = False  # recompute each block in backward
    compile: bool = False  # torch.compile each block
    # reproducibility and cadence
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise resume on GPU)
    log_every: int = 1  # metrics.jsonl gets every step; the bar and TensorBoard every log_every
    eval_every: int = 0  # eval_fn every N steps (0: only at the end, if an eval_fn is given)
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_last: int = 2  # checkpoints kept (older ones are removed after a newer one is complete)

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_steps", "micro_batch", "grad_accum", "seq_len", "log_every", "keep_last"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "decay_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                problems.append(f"{name} must be a whole number >= 0, got {value!r}")
        if self.global_batch is not None and (not isinstance(self.global_batch, int) or self.global_batch < 1):
            problems.append(f"global_batch must be a positive integer, got {self.global_batch!r}")
        for name in ("lr", "min_lr", "weight_decay", "eps", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                problems.append(f"{name} must be a finite number >= 0, got {value!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if problems:
            raise OpenGemmaError("invalid training config: " + "; ".join(problems))
        if isinstance(self.betas, list):  # JSON round trips give lists
            object.__setattr__(self, "betas", tuple(self.betas))

    def resolved(self, dp: int = 1) -> TrainConfig:
        """This config for ``dp`` data-parallel ranks: ``grad_accum`` derived from ``global_batch``
        (which must split evenly into ``micro_batch`` rows on each of the ``dp`` ranks), or
        ``global_batch`` derived from ``grad_accum`` when it is not given."""
        if self.global_batch is None:
            return dataclasses.replace(self, global_batch=self.micro_batch * self.grad_accum * dp)
        per_step = self.micro_batch * dp
        if self.global_batch % per_step:
            raise OpenGemmaError(f"global batch {self.global_batch} does not split into micro-batches of "
                                 f"{self.micro_batch} rows on {dp} data-parallel rank(s) "
                                 f"(it must be a multiple of {per_step})")
        return dataclasses.replace(self, grad_accum=self.global_batch // per_step)

    def tokens_per_step(self) -> int:
        return (self.global_batch or self.micro_batch * self.grad_accum) * self.seq_len

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise OpenGemmaError(f"unknown training config field(s): {', '.join(unknown)}")
        try:
            return cls(**{**d, **({"betas": tuple(d["betas"])} if "betas" in d else {})})
        except TypeError as e:
            raise OpenGemmaError(f"invalid training config: {e}") from None


# Fields that must agree between a checkpoint and the run resuming it (the rest -- max_steps,
# cadence, compile, checkpointing -- may change on resume).
RESUME_FIXED = ("seq_len", "global_batch", "seed", "dtype")

# Recipes: plain overrides of TrainConfig's defaults.
RECIPES: dict[str, dict] = {
    # Small-model pretraining on a CPU (the recorded run): short warmup, cosine to 10%.
    "pretrain-small": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 100, "schedule": "cosine", "weight_decay": 0.1,
                       "betas": (0.9, 0.95), "grad_clip": 1.0, "seq_len": 256, "micro_batch": 8,
                       "global_batch": 16},
    # A Gemma-2B-shaped model on accelerators: bf16 compute, activation checkpointing, WSD.
    "pretrain-2b": {"lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 2000, "schedule": "wsd", "decay_steps": 20_000,
                    "weight_decay": 0.1, "grad_clip": 1.0, "seq_len": 2048, "micro_batch": 4,
                    "global_batch": 512, "dtype": "bf16", "activation_checkpointing": True},
    # Supervised fine-tuning defaults (issue 17 builds on these).
    "sft": {"lr": 2e-5, "min_lr": 2e-6, "warmup_steps": 20, "schedule": "cosine", "weight_decay": 0.0,
            "grad_clip": 1.0, "seq_len": 1024},
}


def recipe(name: str, **overrides) -> TrainConfig:
    """A :class:`TrainConfig` from recipe ``name`` with ``overrides`` on top."""
    try:
        base = RECIPES[name]
    except KeyError:
        raise OpenGemmaError(f"unknown training recipe {name!r}; known: {', '.join(RECIPES)}") from None
    return TrainConfig(**{**base, **overrides})
