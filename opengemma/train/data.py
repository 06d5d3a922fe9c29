"""Pretraining batches: packed rows of documents, split over ranks and micro-batches, resumable.

Rows come from one global stream: a prepared shard directory through the data pipeline's
:class:`~opengemma.data.sampler.MixtureSampler` (staged mixture of sources), or a small text /
JSONL file tokenized and packed on the fly (:class:`PackedFile`, with
:func:`opengemma.data.packing.pack`). :class:`RowBatches` takes ``global_batch`` rows of that
stream per optimizer step and gives rank ``r`` of ``dp`` the rows ``r, r + dp, ...``, cut into
``grad_accum`` micro-batches of ``micro_batch`` rows: every rank reads the whole stream (rows are
cheap next to a training step), so its position -- the checkpointed state -- is the same on
every rank, and the number of processes changes how a step's rows are split, never which rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import OpenGemmaError
from .losses import next_token_loss
from .parallel import device_of

HOLDOUT_EVERY = 20  # PackedFile: every 20th row is held out for validation loss


@dataclass
class Batch:
    """One micro-batch of packed rows: inputs and targets [B, T] (int64), the loss mask [B, T],
    segment ids [B, T] (documents; -1 padding) and the source index of each target [B, T] (-1: none)."""

    tokens: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    segment_ids: torch.Tensor
    groups: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()


def collate(rows: Sequence, sources: Sequence[str]) -> Batch:
    """Stack packed rows (``tokens`` [T + 1], ``segment_ids`` [T + 1], ``loss_mask`` [T] and an
    optional ``source``: one name, or one per segment; rows without one belong to the only
    source when there is one) into a :class:`Batch`."""
    index = {name: i for i, name in enumerate(sources)}
    toks = torch.as_tensor(np.stack([np.asarray(r.tokens, dtype=np.int64) for r in rows]))  # [B, T + 1]
    segs = torch.as_tensor(np.stack([np.asarray(r.segment_ids, dtype=np.int64) for r in rows]))  # [B, T + 1]
    mask = torch.as_tensor(np.stack([np.asarray(r.loss_mask, dtype=bool) for r in rows]))  # [B, T]
    groups = torch.full(mask.shape, -1, dtype=torch.int64)  # [B, T]
    for b, r in enumerate(rows):
        src = getattr(r, "source", None) or (sources[0] if len(sources) == 1 else None)
        if src is None:
            continue
        tseg = segs[b, 1:]  # the segment of each target
        if isinstance(src, str):
            groups[b] = torch.where(tseg >= 0, index.get(src, -1), -1)
        else:
            lut = torch.tensor([index.get(s, -1) for s in src] + [-1], dtype=torch.int64)  # [n_segments + 1]
            groups[b] = lut[torch.where((tseg >= 0) & (tseg < len(src)), tseg, len(src))]
    # Padding positions get segment -1 like the pipeline's rows; attention keeps them to themselves.
    return Batch(tokens=toks[:, :-1], targets=toks[:, 1:], loss_mask=mask, segment_ids=segs[:, :-1].to(torch.int32),
                 groups=groups)


def lm_loss(sources: Sequence[str] = ()):
    """The pretraining loss function for :func:`opengemma.train.loop.fit`: next-token loss over a
    :class:`Batch`, with the loss of each source of the mixture in the metrics."""
    names = tuple(sources)

    def loss_fn(model, batch: Batch):
        dev = device_of(model)
        return next_token_loss(model, batch.tokens.to(dev), batch.targets.to(dev), batch.loss_mask.to(dev),
                               batch.segment_ids.to(dev), groups=batch.groups.to(dev) if names else None,
                               group_names=names)

    return loss_fn


class RowBatches:
    """The :class:`~opengemma.train.loop.BatchSource` of pretraining: ``global_batch`` rows per
    step from ``rows`` (an iterator with ``state_dict``/``load_state_dict``), this rank's share,
    in micro-batches of ``micro_batch`` rows."""

    def __init__(self, rows, *, global_batch: int, micro_batch: int, rank: int = 0, dp: int = 1,
                 sources: Sequence[str] = ()):
        if global_batch % (micro_batch * dp):
            raise OpenGemmaError(f"global batch {global_batch} does not split into {dp} x micro-batches of {micro_batch}")
        self.rows, self.global_batch, self.micro_batch = rows, global_batch, micro_batch
        self.rank, self.dp, self.sources = rank, dp, tuple(sources)

    def next(self, model, step: int) -> list[Batch]:
        step_rows = [next(self.rows) for _ in range(self.global_batch)]
        mine = step_rows[self.rank::self.dp]
        return [collate(mine[i:i + self.micro_batch], self.sources) for i in range(0, len(mine), self.micro_batch)]

    def state_dict(self) -> dict:
        return {"rows": self.rows.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.rows.load_state_dict(d["rows"])


class RowStream:
    """Items (packed rows, preference pairs, RL prompts) in a seeded permutation per epoch, epoch
    after epoch; the state (epoch, index) is JSON, and restoring it continues with the next item."""

    def __init__(self, rows: list, seed: int = 0, what: str = "training rows"):
        if not rows:
            raise OpenGemmaError(f"no {what} (every example was filtered, skipped or held out)")
        self.rows, self.seed = rows, seed
        self.epoch, self.index = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def __iter__(self):
        return self

    def __next__(self):
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._perm(self.epoch)
        row = self.rows[self._order[self.index]]
        self.index += 1
        return row

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.index = int(d["epoch"]), int(d["index"])
        self._order = self._perm(self.epoch)


# -- small inputs: a text or JSONL file, tokenized and packed on the fly --------------------------
class PackedFile(RowStream):
    """Rows of a small file (a document per line of a text file, per record of a JSONL file: the
    data pipeline's reader), packed once (documents ``[BOS] + tokens + [EOS]``), every
    ``HOLDOUT_EVERY``-th row held out; training rows are walked in a seeded permutation per epoch.
    State: (epoch, index), JSON."""

    def __init__(self, path, tokenizer, seq_len: int, seed: int = 0):
        from ..data.packing import pack
        from ..data.tokenize_train import read_documents

        self.name = Path(path).stem
        # encode_plain: a "<start_of_turn>" spelled in raw text stays text, as in `data prepare`
        docs = [[tokenizer.bos_id] + tokenizer.encode_plain(doc) + [tokenizer.eos_id] for doc in read_documents(path)]
        rows = list(pack(docs, seq_len))
        if not rows:
            raise OpenGemmaError(f"{path}: no documents")
        held = set(range(HOLDOUT_EVERY - 1, len(rows), HOLDOUT_EVERY)) if len(rows) >= 2 else set()
        if len(rows) >= 2 and not held:
            held = {len(rows) - 1}
        self.train = [r for i, r in enumerate(rows) if i not in held]
        self.heldout = [r for i, r in enumerate(rows) if i in held]
        self.num_tokens = sum(len(d) for d in docs)
        super().__init__(self.train, seed, f"training rows in {path}")
