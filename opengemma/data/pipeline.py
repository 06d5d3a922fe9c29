"""``opengemma data prepare``: raw sources -> filtered, deduplicated, decontaminated, tokenized shards.

The run is a sequence of datatrove executor stages (``LocalPipelineExecutor`` here; its Slurm and
Ray executors run the same steps on a cluster). Every stage is split into tasks (one per input
chunk, see :func:`opengemma.data.mixture.chunks`) that run on ``workers`` processes, and datatrove
marks each finished task (``work/logs/<stage>/completions``), so a killed run resumes where it
stopped without redoing finished tasks. Every file is written to a temp name and renamed.

1. ``filter`` (a task per chunk): read -> heuristic filters -> decontamination -> quality model ->
   toxicity -> PII (drop/redact per severity) -> ``work/filtered/<task>.jsonl.gz`` + exact-hash file
   + per-step statistics;
2. ``exact``: merge the sorted hash files (flat memory) -> copies to remove;
3. ``minhash-sig``, 4. ``minhash-buckets``, 5. ``minhash-cluster``: datatrove's MinHash LSH blocks;
6. ``tokenize`` (a task per chunk): drop exact and near duplicates (datatrove's filter block),
   split off held-out documents, tokenize (``[BOS] + ids + [EOS]``) into uint32 shards.

Then the data card (``report.md``, ``report.json``) and, last, ``manifest.json``.

Memory stays flat: documents stream through every step, per-task files are bounded by the chunk
size, and the MinHash and exact steps work on sorted files. The decontamination index and quality
model are built once, before the stages (``work/decontam``, ``DIR/quality.npz``).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import OpenGemmaError
from . import filters as filter_mod
from . import mixture as mixture_mod
from . import pii as pii_mod
from .shards import _json_bytes, write_atomic

_EXAMPLES = 3  # removed-document examples kept per rule and task
_SNIPPET = 240  # characters of an example
_BATCH = 256  # documents scored together by the quality and toxicity models


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "..."


class StepStats:
    """Documents and bytes through one step, removals per reason with a few examples."""

    def __init__(self):
        self.docs_in = self.docs_out = self.bytes_in = self.bytes_out = 0
        self.removed: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def seen(self, text: str) -> None:
        self.docs_in += 1
        self.bytes_in += len(text.encode("utf-8"))

    def kept(self, text: str) -> None:
        self.docs_out += 1
        self.bytes_out += len(text.encode("utf-8"))

    def drop(self, reason: str, text: str, note: str = "") -> None:
        self.removed[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < _EXAMPLES:
            ex.append((f"[{note}] " if note else "") + _snippet(text))

    def as_dict(self) -> dict:
        return {"docs_in": self.docs_in, "docs_out": self.docs_out, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "removed": dict(self.removed), "examples": self.examples}


# -- stage 1: filter -------------------------------------------------------------------------------
class FilterTask:
    """Stage 1 for one chunk (a datatrove pipeline callable: ``(data, rank, world_size)``)."""

    def __init__(self, mix: mixture_mod.Mixture, chunks: list[mixture_mod.Chunk], out: Path, quality_model: Path | None):
        self.mix, self.chunks, self.out, self.quality_model = mix, chunks, out, quality_model

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        from . import dedup

        chunk = self.chunks[rank]
        src = self.mix.sources[chunk.source]
        heuristics = [filter_mod.build(name, opts) for name, opts in src.filters.items()]
        heuristics.append(filter_mod.MinLength(src.min_chars))
        steps = {name: StepStats() for name in ["read", *(f.name for f in heuristics), "decontam", "quality",
                                                 "toxicity", "pii"]}
        index = None
        if self.mix.decontam["enabled"]:
            from .decontam import Index

            index = Index.load(self.out / "work" / "decontam")
        quality = None
        if src.quality is not None:
            from .quality import QualityModel

            quality = QualityModel.load(self.quality_model)
        toxicity = None
        if src.toxicity is not None:
            from . import toxicity as toxicity_mod

            toxicity = toxicity_mod
        contamination: dict[str, dict] = {}
        pii_found = {"docs_sensitive": 0, "docs_personal": 0, "by_kind": Counter(), "docs_dropped": 0,
                     "spans_redacted": 0}
        scores = {"quality": [], "toxicity": []}
        hashes: list[int] = []
        final = self.out / "work" / "filtered" / f"{rank:05d}.jsonl.gz"
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{final.name}.*.tmp"):  # left by a killed run of this task
            stale.unlink()
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        batch: list[tuple[str, str]] = []

        def flush(f):
            texts = [t for _, t in batch]
            q = quality.score(texts) if quality is not None else [None] * len(batch)
            x = toxicity.score_document(texts) if toxicity is not None else [None] * len(batch)
            for (doc_id, text), qs, ts in zip(batch, q, x):
                st = steps["quality"]
                st.seen(text)
                if qs is not None:
                    scores["quality"].append(qs)
                    if qs < src.quality:
                        st.drop("below_quality_threshold", text, f"score {qs:.3f}")
                        continue
                st.kept(text)
                st = steps["toxicity"]
                st.seen(text)
                if ts is not None:
                    scores["toxicity"].append(ts)
                    if ts > src.toxicity:
                        st.drop("above_toxicity_threshold", text, f"score {ts:.3f}")
                        continue
                st.kept(text)
                st = steps["pii"]
                st.seen(text)
                new, findings = pii_mod.apply_policy(text, self.mix.pii)
                if findings:
                    worst = "sensitive" if any(g.severity == pii_mod.SENSITIVE for g in findings) else "personal"
                    pii_found[f"docs_{worst}"] += 1
                    pii_found["by_kind"].update(g.kind for g in findings)
                if new is None:
                    pii_found["docs_dropped"] += 1
                    st.drop(f"pii_{worst}", text, ", ".join(sorted({g.kind for g in findings})))
                    continue
                if new != text:
                    pii_found["spans_redacted"] += sum(self.mix.pii[g.severity] == "redact" for g in findings)
                st.kept(new)
                f.write(json.dumps({"id": doc_id, "text": new}, ensure_ascii=False).encode("utf-8") + b"\n")
                hashes.append(dedup.content_hash(new))
            batch.clear()

        try:
            with gzip.open(tmp, "wb", compresslevel=1) as f:
                for doc_id, text in mixture_mod.read_chunk(chunk, src):
                    steps["read"].seen(text)
                    steps["read"].kept(text)
                    for flt in heuristics:
                        st = steps[flt.name]
                        st.seen(text)
                        new, reason = flt(text)
                        if new is None:
                            st.drop(reason, text)
                            break
                        text = new
                        st.kept(text)
                    else:
                        st = steps["decontam"]
                        st.seen(text)
                        hits = index.find(text) if index is not None else []
                        if hits:
                            for task, item, gram in hits:
                                c = contamination.setdefault(task, {"docs": 0, "items": set(), "examples": []})
                                c["items"].add(item)
                                if len(c["examples"]) < _EXAMPLES:
                                    c["examples"].append({"doc": doc_id, "item": item, "ngram": gram})
                            for task in {t for t, _, _ in hits}:
                                contamination[task]["docs"] += 1
                            st.drop("benchmark_overlap", text, ", ".join(sorted({t for t, _, _ in hits})))
                            continue
                        st.kept(text)
                        batch.append((doc_id, text))
                        if len(batch) >= _BATCH:
                            flush(f)
                flush(f)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dedup.write_hashes(self.out / "work" / "hashes" / f"{rank:05d}.npy", hashes)
        stats = {"source": src.name, "chunk": chunk.as_list(), "steps": {k: v.as_dict() for k, v in steps.items()},
                 "contamination": {t: {"docs": c["docs"], "items": sorted(c["items"]), "examples": c["examples"]}
                                   for t, c in contamination.items()},
                 "pii": {**pii_found, "by_kind": dict(pii_found["by_kind"])},
                 "scores": {k: np.histogram(v, bins=10, range=(0, 1))[0].tolist() for k, v in scores.items() if v}}
        _save_stats(self.out / "work" / "stats" / "filter" / f"{rank:05d}.json", stats)


def _save_stats(path: Path, stats: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, _json_bytes(stats))


def _filtered_docs(out: Path, rank: int, skip: frozenset[int]):
    """datatrove Documents of one task's filtered file, without the exact duplicates in ``skip``."""
    from datatrove.data import Document

    path = out / "work" / "filtered" / f"{rank:05d}.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i not in skip:
                rec = json.loads(line)
                yield Document(text=rec["text"], id=rec["id"])


# -- stage 3: minhash signatures -------------------------------------------------------------------
class SignatureTask:
    def __init__(self, out: Path, sig_step):
        self.out, self.sig = out, sig_step

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        from .dedup import load_exact

        skip = load_exact(self.out / "work" / "exact", rank)
        self.sig.run(_filtered_docs(self.out, rank, skip), rank, world_size)


class StepTask:
    """A datatrove block that reads no documents (LSH buckets, clustering) as a pipeline callable."""

    def __init__(self, step):
        self.step = step

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        result = self.step.run(None, rank, world_size)
        if result is not None:
            for _ in result:
                pass


# -- stage 6: tokenize -----------------------------------------------------------------------------
class TokenizeTask:
    def __init__(self, mix: mixture_mod.Mixture, chunks: list[mixture_mod.Chunk], out: Path, filter_step):
        self.mix, self.chunks, self.out, self.filter_step = mix, chunks, out, filter_step

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        import xxhash

        from ..tokenizer import Tokenizer
        from .dedup import load_exact
        from .shards import ShardWriter

        chunk = self.chunks[rank]
        src = self.mix.sources[chunk.source]
        tok = Tokenizer.from_file(self.out / "tokenizer.model")
        skip = load_exact(self.out / "work" / "exact", rank)
        docs = _filtered_docs(self.out, rank, skip)
        if self.filter_step is not None:
            docs = self.filter_step.run(docs, rank, world_size)
        prefix = f"{rank:05d}-"
        for split in ("shards", "heldout"):  # a rerun of this task replaces what it wrote before
            for pattern in (f"{prefix}*", f".{prefix}*.tmp"):  # finished shards, and temp files of a killed run
                for old in (self.out / split / src.name).glob(pattern):
                    old.unlink()
        counts = Counter()
        writers = {split: ShardWriter(self.out / split / src.name, self.mix.shard_tokens, root=self.out,
                                      prefix=prefix, vocab_size=tok.vocab_size) for split in ("shards", "heldout")}
        with writers["shards"], writers["heldout"]:
            for doc in docs:
                counts["docs_in"] += 1
                raw = doc.text.encode("utf-8")
                held = src.heldout and xxhash.xxh3_64_intdigest(raw) % 1_000_000 < src.heldout * 1_000_000
                split = "heldout" if held else "shards"
                ids = tok.encode_plain(doc.text)
                writers[split].add(ids, bos=tok.bos_id, eos=tok.eos_id)
                counts[f"{split}_docs"] += 1
                counts[f"{split}_tokens"] += len(ids) + 2
                counts[f"{split}_bytes"] += len(raw)
                counts["text_tokens"] += len(ids)
                counts["text_bytes"] += len(raw)
        stats = {"source": src.name, "exact_removed": len(skip), **counts}
        _save_stats(self.out / "work" / "stats" / "tokenize" / f"{rank:05d}.json", stats)


# -- the executor ----------------------------------------------------------------------------------
def _executor_class():
    from datatrove.executor import LocalPipelineExecutor

    class QuietExecutor(LocalPipelineExecutor):
        """datatrove's local executor with its per-task console logging sent to the task's log file
        only (``work/logs/<stage>/logs``): the CLI prints one line per stage."""

        def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
            with contextlib.redirect_stderr(_devnull()):
                return super()._run_for_rank(rank, local_rank, node_rank)

    return QuietExecutor


@functools.lru_cache(maxsize=1)
def _devnull():
    """One never-closed sink per process: datatrove's loguru handlers keep writing to it after a task."""
    return open(os.devnull, "w")


def _run_stage(name: str, step, tasks: int, workers: int, work: Path, log, times: dict) -> None:
    t0 = time.perf_counter()
    logs = work / "logs" / name
    done = len(list((logs / "completions").glob("*"))) if (logs / "completions").is_dir() else 0
    ex = _executor_class()(pipeline=[step], tasks=tasks, workers=max(1, min(workers, tasks)), logging_dir=str(logs))
    with contextlib.redirect_stderr(_devnull()):
        ex.run()
    extra = f", {done} done before" if done else ""
    times[name] = time.perf_counter() - t0
    log(f"{name}: {tasks} task(s){extra}, {times[name]:.1f} s")


# -- the run ---------------------------------------------------------------------------------------
def prepare(mixture_path: str | Path, output: str | Path, *, workers: int | None = None, restart: bool = False,
            tokenizer: str | Path | None = None, log=None) -> dict:
    """Run the whole pipeline; returns the manifest. ``restart`` discards a previous partial run;
    ``tokenizer`` (a tokenizer.model or .gguf path, or "embedded") overrides the mixture's."""
    from loguru import logger

    from . import card as card_mod
    from .shards import finished_shards, read_manifest, source_totals, write_manifest

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    mix = mixture_mod.load(mixture_path)
    if workers is not None:
        mix.workers = workers
    if tokenizer is not None and str(tokenizer) != mix.tokenizer:
        mix.tokenizer = mixture_mod.tokenizer_path(tokenizer)
        # a resumed run must use the same tokenizer as the part already written
        mix.sha256 = hashlib.sha256(f"{mix.sha256} {mix.tokenizer}".encode()).hexdigest()
    out = Path(output).expanduser().resolve()
    work = out / "work"
    if (out / "manifest.json").is_file() and not restart:
        log(f"{out}: already complete (manifest.json exists); nothing to do (--restart to redo)")
        return read_manifest(out)
    run_file = work / "run.json"
    if restart and out.exists():
        for name in ("work", "shards", "heldout", "manifest.json", "report.md", "report.json", "tokenizer.model",
                     "quality.npz", "quality.json"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if run_file.is_file():
        previous = json.loads(run_file.read_text(encoding="utf-8"))
        if previous.get("mixture_sha256") != mix.sha256:
            raise OpenGemmaError(f"{out} holds a partial run of a different mixture; use another --output, or "
                                 "--restart to discard it")
        log(f"resuming the run in {out}")
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OpenGemmaError(f"cannot create {work}: {e.strerror or e}") from None
    write_atomic(run_file, _json_bytes({"mixture": str(mix.path), "mixture_sha256": mix.sha256}))
    shutil.copyfile(mix.path, work / f"mixture{mix.path.suffix}")
    times: dict[str, float] = {}
    t_start = time.perf_counter()
    with _quiet_loguru(logger, work):
        tok_info = _tokenizer(mix, out, log)
        index_tasks = _decontam_index(mix, work, log)
        quality_path, quality_info = _quality_model(mix, out, log)
        chunks = mixture_mod.chunks(mix)
        n = len(chunks)
        log(f"{len(mix.sources)} source(s), {n} chunk(s), {mix.workers} worker(s)")
        _run_stage("filter", FilterTask(mix, chunks, out, quality_path), n, mix.workers, work, log, times)
        t0 = time.perf_counter()
        if mix.dedup["exact"]:
            from .dedup import find_exact

            if not (work / "exact" / "done").is_file():
                find_exact([work / "hashes" / f"{r:05d}.npy" for r in range(n)], work / "exact")
                write_atomic(work / "exact" / "done", b"")
        times["exact"] = time.perf_counter() - t0
        filter_step = None
        if mix.dedup["near"]:
            from .dedup import minhash_config, minhash_steps

            cfg = minhash_config(mix.dedup["bands"], mix.dedup["rows"], mix.dedup["ngram"])
            sig, buckets, cluster, filter_step = minhash_steps(work / "minhash", cfg,
                                                                removed_dir=work / "minhash" / "removed")
            _run_stage("minhash-sig", SignatureTask(out, sig), n, mix.workers, work, log, times)
            _run_stage("minhash-buckets", StepTask(buckets), mix.dedup["bands"], mix.workers, work, log, times)
            _run_stage("minhash-cluster", StepTask(cluster), 1, 1, work, log, times)
        _run_stage("tokenize", TokenizeTask(mix, chunks, out, filter_step), n, mix.workers, work, log, times)
    sources = {}
    for name in mix.sources:
        train = [f"shards/{name}/{s}.bin" for s in finished_shards(out / "shards" / name)]
        held = [f"heldout/{name}/{s}.bin" for s in finished_shards(out / "heldout" / name)]
        t, h = source_totals(train, out), source_totals(held, out)
        sources[name] = {"shards": train, "tokens": t["tokens"], "docs": t["docs"], "heldout": held,
                         "heldout_tokens": h["tokens"], "heldout_docs": h["docs"]}
    wall = time.perf_counter() - t_start
    report = card_mod.build(mix, out, chunks, sources, tok_info, index_tasks, quality_info,
                            {"wall_s": wall, "stages_s": times, "workers": mix.workers})
    card_mod.write(out, report)
    manifest = {"tokenizer": tok_info, "sources": sources, "stages": [s.as_dict() for s in mix.stages],
                "mixture": {"name": mix.name, "file": mix.path.name, "sha256": mix.sha256}}
    write_manifest(out, manifest)  # last: the directory is complete only now
    log(f"done in {wall:.1f} s: {out}/manifest.json, report.md")
    return manifest


@contextlib.contextmanager
def _quiet_loguru(logger, work: Path):
    """datatrove logs through loguru to the console; during the run its messages go to the log file."""
    import datatrove.utils.logging  # noqa: F401  (its import resets loguru's handlers: do it first)

    logger.remove()
    logger.add(work / "logs" / "main.log", level="INFO")
    try:
        yield
    finally:
        logger.remove()  # datatrove's in-process tasks replace handlers too: reset them all
        logger.add(sys.stderr, level="WARNING")


def _tokenizer(mix, out: Path, log) -> dict:
    from ..tokenizer import Tokenizer
    from .shards import file_sha256

    target = out / "tokenizer.model"
    if not target.is_file():
        if mix.tokenizer == "embedded":
            from ..embedded import embedded_path

            tok = Tokenizer.from_gguf(embedded_path())
        elif mix.tokenizer.endswith(".gguf"):
            tok = Tokenizer.from_gguf(mix.tokenizer)
        else:
            tok = Tokenizer.from_file(mix.tokenizer)
        write_atomic(target, tok.model_bytes())
        log(f"tokenizer: {mix.tokenizer} ({tok.vocab_size:,} pieces)")
    tok = Tokenizer.from_file(target)
    return {"file": "tokenizer.model", "sha256": file_sha256(target), "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id, "source": mix.tokenizer}


def _decontam_index(mix, work: Path, log) -> list[dict]:
    from .decontam import Index

    if not mix.decontam["enabled"]:
        return []
    folder = work / "decontam"
    if not Index.exists(folder):
        t0 = time.perf_counter()
        index = Index.build(mix.decontam["roots"], mix.decontam["n"], mix.decontam["min_words"],
                            mix.decontam["tasks"])
        index.save(folder)
        missing = [t.name for t in index.tasks if t.missing]
        log(f"decontamination index: {len(index.hashes):,} n-grams from {len(index.tasks) - len(missing)} "
            f"benchmark(s) in {time.perf_counter() - t0:.1f} s" + (f"; data missing for {', '.join(missing)}"
                                                                     if missing else ""))
    return [vars(t) for t in Index.load(folder).tasks]


def _quality_model(mix, out: Path, log) -> tuple[Path | None, dict | None]:
    from .quality import QualityModel, train

    q = mix.quality
    if q.get("model"):
        model = QualityModel.load(q["model"])
        return Path(q["model"]), {"model": q["model"], **model.info}
    if not (q.get("positive") and q.get("negative")):
        return None, None
    path = out / "quality.npz"
    if not path.is_file():
        t0 = time.perf_counter()

        def texts(names):
            for name in names:
                src = mix.sources[name]
                for chunk in mixture_mod.chunks(mix):
                    if chunk.source == name:
                        for _, text in mixture_mod.read_chunk(chunk, src):
                            yield text

        model = train(texts(q["positive"]), texts(q["negative"]), window=q.get("window", 128),
                      heldout=q.get("heldout", 0.1))
        model.info.update({"positive": list(q["positive"]), "negative": list(q["negative"])})
        model.save(path)
        log(f"quality model: held-out precision {model.info['heldout_precision']:.3f}, recall "
            f"{model.info['heldout_recall']:.3f} ({time.perf_counter() - t0:.1f} s)")
    model = QualityModel.load(path)
    return path, {"model": "quality.npz", **model.info}
