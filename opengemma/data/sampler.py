"""The staged mixture sampler: packed training rows whose per-source token shares follow a schedule.

Report section "Pretraining / Training Data": the mixture is staged so that high-quality data
weighs more toward the end of training. A schedule is a list of stages, each with a token budget
and per-source weights; ``ramp_tokens`` moves the weights linearly from the previous stage's to
this stage's over that stage's first ``ramp_tokens`` tokens (the gradual re-weighting). Past the
last stage the sampler keeps the last stage's weights (training may run longer than planned).

How rows are built (deterministic from the seed, no random draws for the mixture):

* The *target* for source ``s`` after ``T`` tokens is the integral of its weight over the schedule,
  ``target_s(T) = integral_0^T w_s(t) dt`` (closed form: weights are piecewise linear in ``T``).
* Each row of ``seq_len + 1`` tokens is filled piece by piece. The next piece comes from the
  eligible source (weight > 0 now, documents available) with the largest *deficit*
  ``target_s(T_end) - realised_s``, where ``T_end`` is the token count at the end of this row
  (ties: the source listed first). This is Megatron's BlendedDataset rule (largest error first),
  applied per piece of tokens rather than per row. A source overshoots by at most the piece just
  taken (one row) and, since the deficits sum to zero, lags by at most (n_sources - 1) rows; in
  practice every source stays within one row's tokens of its target (at most 0.9 rows measured
  with five sources, a ramp, and documents shorter and longer than a row), so realised shares
  are within ``(seq_len + 1) / T`` of the target shares after ``T`` tokens: within 1% from
  the 100th row on. Drawing sources at random instead would leave errors of order
  ``sqrt(rows)`` rows (about 1.4% of the tokens after 1,000 rows for a source weighted 0.25).
* A piece is the rest of the source's current document, cut at the end of the row (see
  :mod:`.packing`: the rest continues as its own segment when that source is next chosen).
* Each source walks its documents in a seeded permutation (seed, crc32 of the source name, epoch),
  epoch after epoch; adding a source does not change the order of the others.

State (:meth:`MixtureSampler.state_dict`): per source its epoch, position in the permutation,
offset in the current document and realised tokens; rows are built whole inside ``__next__``, so
that is everything, and restoring it continues with exactly the next row. It is small JSON.

``split="heldout"`` samples the held-out documents the same way (sources without held-out
documents drop out, the others' weights are renormalized); a fresh held-out sampler with the same
seed yields the same validation rows every time.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OpenGemmaError
from .packing import Packer, PackedRow
from .shards import ShardSet

STATE_VERSION = 1
_SUM_TOLERANCE = 1e-6  # stage weights must sum to 1 within this


@dataclass(frozen=True)
class Stage:
    """One validated stage: ``weights`` float64 [n_sources] (sums to 1), in the sampler's source order."""

    name: str
    tokens: int
    weights: np.ndarray
    ramp_tokens: int = 0


def check_stages(stages: Sequence[dict], sources: Sequence[str]) -> list[Stage]:
    """Validate a schedule (``[{"name", "tokens", "weights": {source: w}, "ramp_tokens"?}, ...]``)
    against the source names; one clear error for an unknown source, weights that do not sum to 1,
    a stage without a positive token budget, or a ramp longer than its stage."""
    if not isinstance(stages, (list, tuple)) or not stages:
        raise OpenGemmaError("the mixture has no stages")
    index = {name: i for i, name in enumerate(sources)}
    out, seen = [], set()
    for k, st in enumerate(stages):
        if not isinstance(st, dict):
            raise OpenGemmaError(f"stage {k} must be an object with name, tokens and weights")
        name = st.get("name", f"stage{k}")
        where = f"stage {name!r}"
        if not isinstance(name, str) or not name or name in seen:
            raise OpenGemmaError(f"stage {k}: name must be a unique non-empty string, got {name!r}")
        seen.add(name)
        tokens = _whole(st.get("tokens"), f"{where}: tokens (its token budget)", positive=True)
        weights = st.get("weights")
        if not isinstance(weights, dict) or not weights:
            raise OpenGemmaError(f"{where}: weights must be a non-empty {{source: weight}} object")
        vec = np.zeros(len(sources), dtype=np.float64)
        for src, w in weights.items():
            if src not in index:
                raise OpenGemmaError(f"{where}: unknown source {src!r} (sources: {', '.join(sources)})")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise OpenGemmaError(f"{where}: weight of {src!r} must be a finite number >= 0, got {w!r}")
            vec[index[src]] = float(w)
        if abs(vec.sum() - 1.0) > _SUM_TOLERANCE:
            raise OpenGemmaError(f"{where}: weights sum to {vec.sum():.6g}, not 1")
        ramp = _whole(st.get("ramp_tokens", 0), f"{where}: ramp_tokens")
        if ramp > tokens:
            raise OpenGemmaError(f"{where}: ramp_tokens {ramp} exceeds the stage's {tokens} tokens")
        if ramp and not out:
            raise OpenGemmaError(f"{where}: ramp_tokens needs a previous stage to ramp from")
        out.append(Stage(name, tokens, vec / vec.sum(), ramp))
    return out


def _whole(value, what: str, *, positive: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < (1 if positive else 0):
        raise OpenGemmaError(f"{what} must be a whole number {'> 0' if positive else '>= 0'}, got {value!r}")
    return int(value)


class Schedule:
    """Weights as a function of tokens seen, and their integral (the per-source token targets)."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = list(stages)
        self.starts = np.cumsum([0] + [s.tokens for s in self.stages])  # [n_stages + 1]
        # Target tokens at each stage start: the integral over every earlier stage.
        acc = [np.zeros_like(self.stages[0].weights)]
        for i, st in enumerate(self.stages):
            acc.append(acc[-1] + self._within(i, st.tokens))
        self._at_start = acc

    def _prev(self, i: int) -> np.ndarray:
        return self.stages[i - 1].weights if i else self.stages[i].weights

    def stage_index(self, tokens: float) -> int:
        """The stage at ``tokens`` (past the last stage: the last)."""
        return min(int(np.searchsorted(self.starts, tokens, side="right")) - 1, len(self.stages) - 1)

    def weights(self, tokens: float) -> np.ndarray:
        i = self.stage_index(tokens)
        st, x = self.stages[i], tokens - self.starts[i]
        if st.ramp_tokens and x < st.ramp_tokens:
            prev = self._prev(i)
            return prev + (st.weights - prev) * (x / st.ramp_tokens)
        return st.weights

    def _within(self, i: int, x: float) -> np.ndarray:
        """Integral of the weights over the first ``x`` tokens of stage ``i``."""
        st, prev, r = self.stages[i], self._prev(i), self.stages[i].ramp_tokens
        if r and x <= r:
            return prev * x + (st.weights - prev) * (x * x / (2 * r))
        if r:  # the ramp averages prev and current; then the stage's own weights
            return (prev + st.weights) * (r / 2) + st.weights * (x - r)
        return st.weights * x

    def target(self, tokens: float) -> np.ndarray:
        """Target tokens per source after ``tokens`` tokens: float64 [n_sources]."""
        i = self.stage_index(tokens)
        return self._at_start[i] + self._within(i, tokens - self.starts[i])


class _Cursor:
    """A source's walk through its documents: permutation of the epoch, position, offset in the doc."""

    __slots__ = ("source", "salt", "seed", "epoch", "pos", "offset", "perm", "lengths")

    def __init__(self, source, seed: int) -> None:
        self.source, self.seed = source, seed
        self.salt = zlib.crc32(source.name.encode("utf-8"))
        self.lengths = source.doc_lengths()  # int64 [num_docs]
        self.epoch = self.pos = self.offset = 0
        self.perm = self._permutation()

    def _permutation(self, epoch: int | None = None) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.salt, self.epoch if epoch is None else epoch])
        return rng.permutation(self.source.num_docs)

    def take(self, room: int) -> np.ndarray:
        """The next piece: the rest of the current document, at most ``room`` tokens."""
        doc = int(self.perm[self.pos])
        length = int(self.lengths[doc])
        n = min(length - self.offset, room)
        piece = self.source.doc(doc)[self.offset : self.offset + n]
        self.offset += n
        if self.offset == length:
            self.offset, self.pos = 0, self.pos + 1
            if self.pos == len(self.perm):
                self.epoch, self.pos = self.epoch + 1, 0
                self.perm = self._permutation()
        return piece

    def checked(self, epoch: int, pos: int, offset: int) -> tuple[int, int, int, np.ndarray]:
        """A saved position, validated against this source; with the permutation of its epoch."""
        perm = self.perm if epoch == self.epoch else self._permutation(epoch)
        if epoch < 0 or not 0 <= pos < len(perm) or not 0 <= offset < int(self.lengths[perm[pos]]):
            raise OpenGemmaError(f"sampler state: position (epoch {epoch}, document {pos}, offset {offset}) "
                                 f"is outside source {self.source.name!r}")
        return epoch, pos, offset, perm

    def restore(self, epoch: int, pos: int, offset: int, perm: np.ndarray) -> None:
        self.epoch, self.pos, self.offset, self.perm = epoch, pos, offset, perm


class MixtureSampler:
    """Packed rows from a prepared shard directory, mixed by source according to staged weights.

    ``data``: the directory (or an open :class:`~opengemma.data.shards.ShardSet`); ``stages``:
    the schedule (default: the manifest's; a manifest without stages mixes the sources in
    proportion to their tokens). ``next(sampler)`` is a :class:`~opengemma.data.packing.PackedRow`
    whose ``source`` names each segment's source. See the module docstring for the rule.
    """

    def __init__(self, data, seq_len: int, seed: int = 0, split: str = "train", stages: Sequence[dict] | None = None,
                 *, pad_id: int | None = None) -> None:
        self.shards = data if isinstance(data, ShardSet) else ShardSet.open(Path(data))
        if split not in ("train", "heldout"):
            raise OpenGemmaError(f"split must be 'train' or 'heldout', got {split!r}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise OpenGemmaError(f"seed must be a whole number >= 0, got {seed!r}")
        self.seq_len, self.seed, self.split = int(seq_len), int(seed), split
        self.names = self.shards.sources
        sources = [self.shards.source(n, split) for n in self.names]
        available = np.array([s.num_docs > 0 for s in sources])
        if stages is None:
            stages = self.shards.stages or [self._natural_stage(sources)]
        checked = check_stages(stages, self.names)
        if split == "heldout":  # drop sources without held-out documents, renormalize the rest
            checked = [_restrict(st, available, self.shards.directory) for st in checked]
        else:
            for st in checked:
                if missing := [n for n, w, ok in zip(self.names, st.weights, available) if w > 0 and not ok]:
                    raise OpenGemmaError(f"stage {st.name!r} gives weight to source(s) without training "
                                         f"documents: {', '.join(missing)}")
        self.stages_config = [dict(s) for s in stages]
        self.schedule = Schedule(checked)
        self._packer = Packer(self.seq_len, pad_id=self._pad_id(pad_id))
        self._cursors = [_Cursor(src, self.seed) if ok else None for src, ok in zip(sources, available)]
        self._realised = np.zeros(len(self.names), dtype=np.int64)
        self.rows = 0

    def _pad_id(self, pad_id: int | None) -> int:
        if pad_id is not None:
            return int(pad_id)
        pad = self.shards.tokenizer_info.get("pad_id", 0)
        return int(pad) if isinstance(pad, int) and pad >= 0 else 0

    def _natural_stage(self, sources) -> dict:
        total = sum(s.num_tokens for s in sources)
        if total == 0:
            raise OpenGemmaError(f"{self.shards.directory}: no {self.split} documents in any source")
        weights = {s.name: s.num_tokens / total for s in sources}
        return {"name": "natural", "tokens": total, "weights": weights}

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> MixtureSampler:
        return self

    def __next__(self) -> PackedRow:
        row_len = self.seq_len + 1
        end = self.tokens_seen + row_len
        target = self.schedule.target(end)  # [n_sources]
        # Sources with weight now; each has documents (checked at construction).
        eligible = self.schedule.weights(self.tokens_seen) > 0  # [n_sources]
        packer = self._packer
        while True:
            deficit = np.where(eligible, target - self._realised, -np.inf)
            k = int(np.argmax(deficit))
            piece = self._cursors[k].take(packer.room)
            self._realised[k] += len(piece)
            if (row := packer.add_piece(piece, self.names[k])) is not None:
                self.rows += 1
                return row

    # -- position ----------------------------------------------------------------------------
    @property
    def tokens_seen(self) -> int:
        """Tokens in the rows produced so far (every row is full: no padding)."""
        return self.rows * (self.seq_len + 1)

    @property
    def stage_index(self) -> int:
        return self.schedule.stage_index(self.tokens_seen)

    @property
    def stage(self) -> str:
        """Name of the current stage (past the end of the schedule: the last, whose weights stay)."""
        return self.schedule.stages[self.stage_index].name

    def weights(self) -> dict[str, float]:
        """The mixture weights at this point of the schedule."""
        return dict(zip(self.names, self.schedule.weights(self.tokens_seen).tolist()))

    def realised_shares(self) -> dict[str, float]:
        """Share of all tokens produced so far that came from each source."""
        total = max(int(self._realised.sum()), 1)
        return {n: int(t) / total for n, t in zip(self.names, self._realised)}

    def target_shares(self) -> dict[str, float]:
        """The schedule's share of each source over the tokens produced so far (what
        :meth:`realised_shares` tracks); the current weights before the first row."""
        if not self.rows:
            return self.weights()
        target = self.schedule.target(self.tokens_seen)
        return dict(zip(self.names, (target / target.sum()).tolist()))

    def realised_tokens(self) -> dict[str, int]:
        return {n: int(t) for n, t in zip(self.names, self._realised)}

    def epochs(self) -> dict[str, float]:
        """How many passes over each source's documents so far (fractional)."""
        return {n: c.epoch + c.pos / max(len(c.perm), 1) for n, c in zip(self.names, self._cursors) if c}

    def state_dict(self) -> dict:
        """JSON-serialisable position; :meth:`load_state_dict` continues with exactly the next row."""
        sources = {}
        for name, cur, tokens in zip(self.names, self._cursors, self._realised.tolist()):
            entry = {"tokens": tokens}
            if cur is not None:
                entry.update(epoch=cur.epoch, pos=cur.pos, offset=cur.offset, docs=cur.source.num_docs)
            sources[name] = entry
        return {"version": STATE_VERSION, "seq_len": self.seq_len, "seed": self.seed, "split": self.split,
                "rows": self.rows, "sources": sources}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict` (same data, seq_len, seed and split; the
        stages may differ, e.g. a schedule extended to train longer)."""
        try:
            if state.get("version") != STATE_VERSION:
                raise OpenGemmaError(f"sampler state version {state.get('version')!r} is not {STATE_VERSION}")
            for key in ("seq_len", "seed", "split"):
                if state[key] != getattr(self, key):
                    raise OpenGemmaError(f"sampler state was saved with {key}={state[key]!r}, this sampler has "
                                         f"{getattr(self, key)!r}")
            saved = state["sources"]
            if sorted(saved) != sorted(self.names):
                raise OpenGemmaError(f"sampler state has sources {sorted(saved)}, the data has {sorted(self.names)}")
            positions = []  # validate everything before changing anything
            for name, cur in zip(self.names, self._cursors):
                entry = saved[name]
                if cur is None:
                    continue
                if entry.get("docs") != cur.source.num_docs:
                    raise OpenGemmaError(f"sampler state: source {name!r} had {entry.get('docs')} documents, "
                                         f"the data has {cur.source.num_docs} (a different shard set)")
                positions.append((cur, cur.checked(int(entry["epoch"]), int(entry["pos"]), int(entry["offset"]))))
            realised = np.array([int(saved[n]["tokens"]) for n in self.names], dtype=np.int64)
            rows = int(state["rows"])
            if rows < 0 or realised.min() < 0 or int(realised.sum()) != rows * (self.seq_len + 1):
                raise OpenGemmaError(f"sampler state: {rows} rows do not match its per-source token counts")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise OpenGemmaError(f"malformed sampler state ({type(e).__name__}: {e})") from None
        for cur, position in positions:
            cur.restore(*position)
        self._realised, self.rows = realised, rows


def _restrict(stage: Stage, available: np.ndarray, where) -> Stage:
    w = np.where(available, stage.weights, 0.0)
    if w.sum() <= 0:
        raise OpenGemmaError(f"{where}: no held-out documents in any source of stage {stage.name!r}")
    return Stage(stage.name, stage.tokens, w / w.sum(), stage.ramp_tokens)
