"""Packing documents into fixed-length training rows with document boundaries kept.

A row holds ``seq_len + 1`` tokens: the inputs are ``tokens[:-1]``, the targets ``tokens[1:]``.
Documents (each ``[BOS] + tokens + [EOS]``) are laid back to back; ``segment_ids`` numbers the
documents within the row (0, 1, 2, ...; -1 on padding), which the model's training path turns
into block-diagonal attention with positions restarting per segment, so no token attends to or is
predicted from another document. ``loss_mask[t]`` is True where target ``t + 1`` continues the
document of input ``t``: False where the target is padding or the first token of the next
document (the ``EOS -> BOS`` step is not something to learn).

A document that does not fit the rest of the row is split: its first piece ends the row and the
rest continues in the next row(s), each piece its own segment with positions starting again at 0
(so a document longer than a row becomes consecutive row-sized pieces). That wastes nothing but
the one prediction across each cut; ``split_across_rows=False`` instead starts a new row for a
document that fits a whole row but not the rest of this one (padding the rest), trading padding
for intact short documents; documents longer than a row are split either way.

Everything is numpy slicing per document piece: no Python loop over tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import OpenGemmaError


@dataclass
class PackedRow:
    """One training row. ``tokens`` int64 [seq_len + 1]; ``segment_ids`` int32 [seq_len + 1]
    (document index within the row, -1 = padding); ``loss_mask`` bool [seq_len] (per target);
    ``source``: the source of each segment (index = segment id), or None when unknown."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    loss_mask: np.ndarray
    source: tuple | None = None

    @property
    def inputs(self) -> np.ndarray:
        return self.tokens[:-1]  # [seq_len]

    @property
    def targets(self) -> np.ndarray:
        return self.tokens[1:]  # [seq_len]

    @property
    def num_tokens(self) -> int:
        """Tokens that are not padding."""
        return int(np.count_nonzero(self.segment_ids >= 0))


def loss_mask_of(segment_ids: np.ndarray) -> np.ndarray:
    """bool [n - 1]: target ``t + 1`` is real and in the same segment as input ``t``."""
    return (segment_ids[1:] == segment_ids[:-1]) & (segment_ids[1:] >= 0)


class Packer:
    """Incremental packing: :meth:`add` a document, get back the rows it completed; :meth:`flush`
    returns the last, padded row. :func:`pack` is this over an iterable."""

    def __init__(self, seq_len: int, *, pad_id: int = 0, split_across_rows: bool = True) -> None:
        if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise OpenGemmaError(f"seq_len must be a positive whole number, got {seq_len!r}")
        self.seq_len, self.pad_id, self.split_across_rows = int(seq_len), int(pad_id), split_across_rows
        self._row_len = self.seq_len + 1
        self._reset()

    def _reset(self) -> None:
        self._tokens = np.full(self._row_len, self.pad_id, dtype=np.int64)  # [seq_len + 1]
        self._segments = np.full(self._row_len, -1, dtype=np.int32)  # [seq_len + 1]
        self._sources: list = []
        self._fill = 0

    @property
    def room(self) -> int:
        """Tokens that still fit the current row."""
        return self._row_len - self._fill

    @property
    def empty(self) -> bool:
        return self._fill == 0

    def add(self, doc, source=None) -> list[PackedRow]:
        """Append one document (any 1-D integer sequence); the rows it completed, in order."""
        doc = np.asarray(doc)
        if doc.ndim != 1:
            raise OpenGemmaError(f"a document must be a 1-D sequence of token ids, got shape {doc.shape}")
        n, L = len(doc), self._row_len
        out: list[PackedRow] = []
        if n == 0:
            return out
        if not self.split_across_rows and self._fill and n <= L and n > L - self._fill:
            out.append(self._emit())
        pos = 0
        while pos < n:
            take = min(n - pos, L - self._fill)
            self._place(doc[pos : pos + take], source)
            pos += take
            if self._fill == L:
                out.append(self._emit())
        return out

    def add_piece(self, piece: np.ndarray, source=None) -> PackedRow | None:
        """Append a piece that fits the current row (``len(piece) <= room``) as one segment;
        the row if that completed it. The mixture sampler's path: it cuts pieces itself."""
        self._place(piece, source)
        return self._emit() if self._fill == self._row_len else None

    def _place(self, piece: np.ndarray, source) -> None:
        a, b = self._fill, self._fill + len(piece)
        self._tokens[a:b] = piece  # uint32 -> int64 in one copy
        self._segments[a:b] = len(self._sources)
        self._sources.append(source)
        self._fill = b

    def _emit(self) -> PackedRow:
        seg = self._segments
        sources = tuple(self._sources) if any(s is not None for s in self._sources) else None
        row = PackedRow(tokens=self._tokens, segment_ids=seg, loss_mask=loss_mask_of(seg), source=sources)
        self._reset()
        return row

    def flush(self) -> PackedRow | None:
        """The partly filled last row, padded (``pad_id``, segment -1), or None if there is none."""
        return self._emit() if self._fill else None


def pack(docs: Iterable[Sequence[int]], seq_len: int, *, pad_id: int = 0, split_across_rows: bool = True,
         drop_last: bool = False) -> Iterator[PackedRow]:
    """Rows of ``seq_len + 1`` tokens from ``docs`` (each already ``[BOS] + tokens + [EOS]``), in
    order. The last row is padded unless ``drop_last``. See the module docstring for splitting."""
    packer = Packer(seq_len, pad_id=pad_id, split_across_rows=split_across_rows)
    for doc in docs:
        yield from packer.add(doc)
    if not drop_last and (last := packer.flush()) is not None:
        yield last
