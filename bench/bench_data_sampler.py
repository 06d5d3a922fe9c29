"""Data-loading micro-benchmark: the staged mixture sampler and packing vs raw memmap slicing.

Training must never wait for its rows. This builds a synthetic shard directory (three sources,
log-normal document lengths with means 600 / 2,000 / 150 tokens, ids up to Gemma's 262,144, in
4M-token shards) of ``--tokens`` tokens and measures, in the same run:

* **open** -- ``ShardSet.open`` (manifest, size and index checks, memory maps) and ``verify=True``
  (every shard's SHA-256 as well);
* **sampler** -- ``MixtureSampler`` rows of ``--seq-len + 1`` tokens (deficit choice per piece,
  document pieces cut at row ends, segment ids, loss masks, per-segment sources);
* **pack** -- ``pack()`` over every document of one source, in order;
* **floor** -- the least any loader can do: contiguous ``seq_len + 1`` slices of the same memory
  maps copied to int64, no documents, no mixture.

Printed: seconds per million tokens and sampler / floor (how much the mixture and the document
bookkeeping cost on top of reading the bytes). The first pass over freshly written shards reads
from the page cache, as training over a local disk would after the first epoch.

    python bench/bench_data_sampler.py                 # 10M tokens, seq_len 2048: a few seconds
    python bench/bench_data_sampler.py --tokens 2e6 --seq-len 512
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opengemma.data.packing import pack  # noqa: E402
from opengemma.data.sampler import MixtureSampler  # noqa: E402
from opengemma.data.shards import ShardSet, build_shard_set  # noqa: E402

SOURCES = {"web": 600, "wiki": 2000, "code": 150}  # mean document length in tokens


def build(root: Path, tokens: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    docs = {}
    for name, mean in SOURCES.items():
        budget, lst = tokens // len(SOURCES), []
        while budget > 0:
            n = int(min(max(2, rng.lognormal(np.log(mean), 1.0)), 50_000))
            lst.append(rng.integers(0, 262_144, size=n, dtype=np.uint32))
            budget -= n
        docs[name] = lst
    stages = [{"name": "main", "tokens": tokens, "weights": {"web": 0.5, "wiki": 0.3, "code": 0.2}},
              {"name": "anneal", "tokens": tokens // 5, "weights": {"web": 0.2, "wiki": 0.5, "code": 0.3},
               "ramp_tokens": tokens // 10}]
    return build_shard_set(root, docs, stages=stages, shard_tokens=1 << 22)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=float, default=10e6, help="tokens in the synthetic shard set (default 10M)")
    p.add_argument("--seq-len", type=int, default=2048)
    args = p.parse_args(argv)
    total, L = int(args.tokens), args.seq_len + 1
    with tempfile.TemporaryDirectory() as tmp:
        t_build, root = timed(lambda: build(Path(tmp) / "set", total))
        t_open, ss = timed(lambda: ShardSet.open(root))
        t_verify, _ = timed(lambda: ShardSet.open(root, verify=True))
        n_tokens = sum(ss.source(n).num_tokens for n in SOURCES)
        print(f"shard set: {n_tokens:,} tokens in {sum(len(ss.source(n).shards) for n in SOURCES)} shards "
              f"(built in {t_build:.1f} s)")
        print(f"open:          {t_open * 1e3:8.1f} ms   with SHA-256 verify: {t_verify * 1e3:8.1f} ms "
              f"({t_verify / n_tokens * 1e6:.3f} s per 1M tokens)")

        def floor():
            n = 0
            for name in SOURCES:
                for shard in ss.source(name).shards:
                    toks = shard.tokens
                    for a in range(0, len(toks) - L + 1, L):
                        row = np.empty(L, dtype=np.int64)
                        row[:] = toks[a : a + L]
                        n += L
            return n

        def sampler():
            s, n = MixtureSampler(ss, seq_len=args.seq_len, seed=0), 0
            while n < n_tokens:
                n += len(next(s).tokens)
            return n, s

        def packing():
            return sum(len(r.tokens) for r in pack(ss.source("web").iter_docs(), args.seq_len))

        t_floor, n_floor = timed(floor)
        t_sampler, (n_sampler, s) = timed(sampler)
        t_pack, n_pack = timed(packing)
        per = {k: t / n * 1e6 for k, t, n in (("floor", t_floor, n_floor), ("sampler", t_sampler, n_sampler),
                                               ("pack", t_pack, n_pack))}
        print(f"floor:         {per['floor']:8.3f} s per 1M tokens (contiguous memmap slices -> int64)")
        print(f"sampler:       {per['sampler']:8.3f} s per 1M tokens ({n_sampler / t_sampler / 1e6:.1f}M tokens/s; "
              f"sampler / floor = {per['sampler'] / per['floor']:.2f})")
        print(f"pack:          {per['pack']:8.3f} s per 1M tokens (web source, in order)")
        shares = ", ".join(f"{k} {v:.3f}" for k, v in s.realised_shares().items())
        target = ", ".join(f"{k} {v:.3f}" for k, v in s.target_shares().items())
        print(f"shares after {s.tokens_seen:,} tokens: realised {shares}; target {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
