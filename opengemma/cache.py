"""The KV cache: static, preallocated keys and values for one batch of sequences, and what one
forward pass reads from and writes to it.

Report section "Model Architecture": Gemma 2 and 3 alternate local sliding-window layers with
global ones. Global layers keep ``max_len`` slots (slot = position); local layers keep only their
window, as a ring buffer (slot = position % window), which is what makes long contexts cheap
(``opengemma info --kv-memory``). Each kind has one extra "trash" slot that padding tokens
(position -1) write into; its position stays -1, so it is never attended to. Slot positions are
tracked per row (``pos_global``, ``pos_local``): rows of one batch may sit at different positions
(ragged prompts, continuous batching), and masks stay exact when decoding past the window.

Speculative decoding (:mod:`opengemma.speculative`) writes several drafted tokens in one forward
and may then reject some. A ring of exactly ``window`` slots cannot take that back: the drafts'
slots held keys that later queries still need. A cache made with ``spare=k`` keeps ``window + k``
ring slots instead, so that a forward of up to k + 1 tokens only ever overwrites keys already out
of every query's window (which also lets it write before attending, like one-token decoding),
and :meth:`forget` rolls rejected positions back by marking their slots -1. Chosen over saving
and restoring the overwritten slots by measurement (embedded 270M, fp32, one thread): the 8 extra
slots cost a local layer's attention ~1 us per one-token step and ~7 us per 9-token verification
(15 local layers: 15-100 us per forward), where copying the 9 slots out and back cost 170 us per
forward, and without spare slots a several-token forward would also need the prefill's
attend-over-[ring; new keys] path, which copies the whole ring per layer.

The cache is a value with an API of its own: allocate (the constructor), :meth:`reset` rows,
:meth:`take` (copy rows into a new cache), :meth:`rows` (a view of a row range, optionally of
fewer global positions), :meth:`forget` positions. The model only calls :meth:`step`, which
returns a :class:`CacheStep`: the slots one forward writes and the masks it attends with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .attention import attention_mask
from .config import GemmaConfig


class KVCache:
    """Keys/values ``k[layer]``, ``v[layer]`` [B, KV, slots, D] and slot positions [B, slots].

    ``spare``: ring slots beyond the window, for forwards of up to ``spare + 1`` tokens whose
    writes may be rolled back (:meth:`forget`); 0 for plain decoding."""

    def __init__(self, config: GemmaConfig, batch_size: int, max_len: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None, spare: int = 0):
        if spare < 0:
            raise ValueError(f"spare ring slots must be >= 0, got {spare}")
        self.config = config
        self.batch_size = batch_size
        self.max_len = max_len
        self.spare = spare
        self.ring = self.ring_size(config, max_len, spare)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for i in range(config.n_layers):
            shape = (batch_size, config.n_kv_heads, self.slots(config, i, max_len, spare), config.head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
        self.pos_global = torch.full((batch_size, max_len + 1), -1, dtype=torch.long, device=device)
        self.pos_local = torch.full((batch_size, self.ring + 1), -1, dtype=torch.long, device=device)

    @classmethod
    def _of(cls, like: KVCache, k: list[torch.Tensor], v: list[torch.Tensor], pos_global: torch.Tensor,
            pos_local: torch.Tensor, max_len: int) -> KVCache:
        """A cache over the given tensors (views or copies of ``like``'s)."""
        new = cls.__new__(cls)
        new.config, new.ring, new.spare = like.config, like.ring, like.spare
        new.batch_size, new.max_len = pos_global.shape[0], max_len
        new.k, new.v, new.pos_global, new.pos_local = k, v, pos_global, pos_local
        return new

    # -- sizes -------------------------------------------------------------------------------------
    @staticmethod
    def ring_size(config: GemmaConfig, max_len: int, spare: int = 0) -> int:
        has_local = any(config.is_local(i) for i in range(config.n_layers))
        return min(config.sliding_window + spare, max_len) if has_local else 0

    @classmethod
    def slots(cls, config: GemmaConfig, layer: int, max_len: int, spare: int = 0) -> int:
        """Cache slots of one layer: its window (local, plus ``spare``) or the whole length
        (global), plus trash."""
        return (cls.ring_size(config, max_len, spare) if config.is_local(layer) else max_len) + 1

    @classmethod
    def planned_bytes(cls, config: GemmaConfig, max_len: int, batch_size: int = 1, dtype=torch.float32) -> dict:
        """Memory a cache would take, without allocating it (``opengemma info --kv-memory``)."""
        per_slot = 2 * batch_size * config.n_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()
        local = sum(cls.slots(config, i, max_len) for i in range(config.n_layers) if config.is_local(i))
        full = sum(cls.slots(config, i, max_len) for i in range(config.n_layers) if not config.is_local(i))
        return {"context": max_len, "batch_size": batch_size, "dtype": str(dtype).removeprefix("torch."),
                "local_layers_bytes": local * per_slot, "global_layers_bytes": full * per_slot,
                "total_bytes": (local + full) * per_slot,
                "without_windows_bytes": config.n_layers * (max_len + 1) * per_slot}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.pos_global.device

    # -- rows --------------------------------------------------------------------------------------
    def reset(self, rows: torch.Tensor | Sequence[int] | None = None, *, zero: bool = False) -> None:
        """Forget the cached tokens of every row, or of the given rows only. Forgetting is enough
        for correctness (nothing at position -1 is ever attended); ``zero`` also clears the keys
        and values, e.g. after a fault: attention gives forgotten slots weight 0, but 0 * NaN is
        NaN."""
        sel = slice(None) if rows is None else rows
        self.pos_global[sel] = -1
        self.pos_local[sel] = -1
        if zero:
            for t in self.k + self.v:
                t[sel] = 0

    def can_roll_back(self, n_tokens: int) -> bool:
        """Whether a forward of ``n_tokens`` new tokens per row overwrites no key a later query may
        need, so that :meth:`forget` can take any of them back exactly: no sliding-window ring, a
        ring at least as long as the cache's positions (slot = position; a :meth:`rows` view of
        fewer positions than the ring included), or ``n_tokens - 1`` <= its slots beyond the
        window (a one-token step always qualifies)."""
        return (not self.ring or self.ring >= self.max_len
                or n_tokens - 1 <= self.ring - self.config.sliding_window)

    def forget(self, row: int, start: int, end: int) -> None:
        """Roll back positions ``start..end-1`` of ``row``, written by the latest forward: their
        slots read position -1 again (never attended; the keys stay until overwritten). Exact
        when :meth:`can_roll_back` held for that forward (see the module docstring)."""
        if end <= start:
            return
        if not self.can_roll_back(end - start):
            raise ValueError(f"cannot roll back {end - start} positions with {self.spare} spare ring slots")
        self.pos_global[row, start:end] = -1
        if self.ring:
            slots = torch.arange(start, end, device=self.device) % self.ring  # [n]
            self.pos_local[row, slots] = -1

    def take(self, index: torch.Tensor | Sequence[int]) -> KVCache:
        """A new cache whose row i is a copy of this cache's row ``index[i]`` (rows may repeat)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return KVCache._of(self, [t.index_select(0, index) for t in self.k], [t.index_select(0, index) for t in self.v],
                           self.pos_global.index_select(0, index), self.pos_local.index_select(0, index), self.max_len)

    def rows(self, lo: int, hi: int, length: int | None = None) -> KVCache:
        """Rows ``lo..hi-1``, and only the first ``length`` positions of the global layers, as a
        cache whose tensors are views of this one's: the model's in-place writes land here.

        A forward then costs what its rows and their lengths need, whatever this cache's batch
        and length are. With ``length`` L < max_len, slot L of the global layers becomes the
        view's trash slot (padding writes there, its position forced to -1) and keys at positions
        >= L are out of sight. That is exact when L is above every position a row of the view
        has written and still needs, and above every query position of the forward: global slots
        are positions, so what lies beyond L is stale or in every query's future, which the causal
        mask hides anyway. Sliding-window rings are not trimmed.
        """
        length = self.max_len if length is None else min(length, self.max_len)
        if lo == 0 and hi == self.batch_size and length == self.max_len:
            return self
        local = [self.config.is_local(i) for i in range(len(self.k))]
        k = [t[lo:hi] if loc else t[lo:hi, :, :length + 1] for t, loc in zip(self.k, local)]  # [b, KV, slots, D]
        v = [t[lo:hi] if loc else t[lo:hi, :, :length + 1] for t, loc in zip(self.v, local)]
        return KVCache._of(self, k, v, self.pos_global[lo:hi, :length + 1], self.pos_local[lo:hi], length)

    def step(self, input_pos: torch.Tensor, dtype: torch.dtype) -> CacheStep:
        """Begin a forward that writes tokens at ``input_pos`` [B, T] (-1: padding)."""
        return CacheStep(self, input_pos, dtype)


class CacheStep:
    """What one forward pass does with the cache: the slots to write and the masks, shared by all
    layers. :meth:`update` stores a layer's new keys/values and returns what to attend over.

    Two reads skip work that could only be masked, on the CPU and outside torch.compile (where
    the host read of positions is free; on accelerators it would sync the device each step, and
    compiled graphs want static shapes): :meth:`starts_at_zero` (a prompt's first chunk is plain
    causal attention over the new keys) and :meth:`visible_slots` (the leading slots that can hold
    a visible key).
    """

    def __init__(self, cache: KVCache, input_pos: torch.Tensor, dtype: torch.dtype):
        cfg = self.config = cache.config
        self.cache = cache
        self._index: dict = {}
        valid = input_pos >= 0
        self.fresh = self.starts_at_zero(cfg, input_pos)
        self.n_global = self.visible_slots(input_pos, cache.max_len)
        # Global layers: write first, then attend.
        self.global_slots = torch.where(valid, input_pos, cache.max_len)  # [B, T]
        cache.pos_global.scatter_(1, self.global_slots, input_pos)
        cache.pos_global[:, -1] = -1
        self.global_mask = attention_mask(input_pos, cache.pos_global[:, :self.n_global], None, dtype)
        if not cache.ring:
            return
        ring, window = cache.ring, cfg.sliding_window
        self.n_local = self.visible_slots(input_pos, ring)
        # One new token per row: its ring slot holds position p - ring, which is already outside
        # the window, so writing before attending is exact. Several new tokens (prefill) may
        # overwrite keys that earlier queries of the chunk still need: attend over
        # [ring; new keys] first, then keep only the last `ring` positions of each row. A ring
        # with spare slots takes up to spare + 1 new tokens with writes first too (the slots they
        # overwrite hold positions <= p + T - 1 - ring, before every query's window when
        # T - 1 <= ring - window), as does a ring as long as the cache (slot = position), and so
        # does a chunk whose positions all lie below `ring` (n_local <= ring, read on the CPU): the
        # slots it overwrites hold only negative positions, i.e. nothing (a short prompt's prefill).
        self.local_concat = (input_pos.shape[1] > 1 and self.n_local > ring
                             and not (cache.spare and cache.can_roll_back(input_pos.shape[1])))
        if self.local_concat:
            old = cache.pos_local[:, :self.n_local]
            k_pos = torch.cat([old, torch.where(valid, input_pos, -1)], dim=1)  # [B, n_local + T]
            self.local_mask = attention_mask(input_pos, k_pos, window, dtype)
            last = input_pos.max(dim=1, keepdim=True).values  # [B, 1]
            keep = valid & (input_pos > last - ring)
        else:
            keep = valid
        self.local_slots = torch.where(keep, input_pos % ring, ring)  # [B, T]
        cache.pos_local.scatter_(1, self.local_slots, input_pos)
        cache.pos_local[:, -1] = -1
        if not self.local_concat:
            self.local_mask = attention_mask(input_pos, cache.pos_local[:, :self.n_local], window, dtype)

    @staticmethod
    def starts_at_zero(cfg: GemmaConfig, input_pos: torch.Tensor) -> bool:
        """Whether every row's queries are positions 0..T-1 (T > 1): a prompt's first chunk.

        Then each query sees exactly the new keys up to itself (older cache contents hold no
        position below T, or only padding), so attention is plain causal attention over the new
        keys, which skips the masked half of the scores (the 270M's 512-token prefill had spent
        38% of its time in masked attention over [ring; new] = 1,025 keys per local layer).
        Only without soft-capping (whose attention is built on explicit masks).
        """
        T = input_pos.shape[1]
        if (T < 2 or cfg.attn_softcap is not None or input_pos.device.type != "cpu"
                or torch.compiler.is_compiling()):
            return False
        return bool((input_pos == torch.arange(T)).all())

    @staticmethod
    def visible_slots(input_pos: torch.Tensor, n: int) -> int:
        """How many leading slots of an ``n``-slot layer can hold a key visible to these queries.

        A global slot holds the position equal to its index, a ring slot ``position % n``; keys
        after the latest query position are masked anyway. So while every query sits before
        position ``n - 1``, slots past ``max(input_pos)`` hold nothing any query may see and need
        not be read (a short prompt in a long cache: most of the decode attention's bytes). The
        count is rounded up to 64 so nearby steps share shapes.
        """
        if input_pos.device.type != "cpu" or torch.compiler.is_compiling():
            return n + 1
        need = int(input_pos.max()) + 1
        return n + 1 if need >= n else min(n, -(-need // 64) * 64)

    def _write(self, cache_t: torch.Tensor, new: torch.Tensor, local: bool) -> None:
        """Store ``new`` [B, KV, T, D] at this step's slots of ``cache_t`` [B, KV, slots, D] (which
        may be a strided view). index_put_, not scatter_: scatter_ has no fast bf16 CPU kernel
        (36 us vs 3 us per one-token write). Duplicate indices only ever hit the trash slot."""
        key = (local, new.shape[1])
        if key not in self._index:
            slots = self.local_slots if local else self.global_slots  # [B, T]
            B, dev = slots.shape[0], slots.device
            self._index[key] = (torch.arange(B, device=dev).view(B, 1, 1),
                                torch.arange(new.shape[1], device=dev).view(1, -1, 1), slots[:, None, :])
        # .to: a no-op except under autocast (a bf16 training run sampling from fp32 master
        # weights), where v arrives in bf16 and k, past its fp32 norm and RoPE, in fp32
        cache_t.index_put_(self._index[key], new.to(cache_t.dtype))  # indices broadcast to [B, KV, T]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store layer ``layer``'s new keys/values [B, KV, T, D]; return (keys, values, mask) to
        attend over, where mask None means causal over the new keys (:meth:`starts_at_zero`)."""
        local = self.config.is_local(layer)
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        if self.fresh and not (local and k.shape[2] > self.config.sliding_window):
            self._write(ck, k, local)
            self._write(cv, v, local)
            return k, v, None
        n = self.n_local if local else self.n_global
        if local and self.local_concat:
            keys = torch.cat([ck[:, :, :n], k], dim=2)  # [B, KV, n + T, D]
            values = torch.cat([cv[:, :, :n], v], dim=2)
            self._write(ck, k, local)
            self._write(cv, v, local)
            return keys, values, self.local_mask
        self._write(ck, k, local)
        self._write(cv, v, local)
        return ck[:, :, :n], cv[:, :, :n], (self.local_mask if local else self.global_mask)  # [B, KV, n, D]
