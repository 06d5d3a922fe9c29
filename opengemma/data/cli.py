"""``opengemma data``: the pretraining data pipeline (report "Pretraining / Training Data", "Filtering").

  prepare        MIXTURE -> DIR: filter, remove PII, deduplicate, decontaminate, tokenize into shards,
                 write the data card (report.md/.json) and, last, manifest.json; resumable
  quality-train  train the model-based quality classifier (curated vs web text) and print its
                 held-out precision/recall
  decontam       which documents of a file overlap a benchmark of `opengemma eval` (13-grams)

Every problem with the input (missing file, malformed mixture, unreadable line, non-UTF-8 file)
is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import float_range, int_range
from ..errors import OpenGemmaError

_positive = int_range(1)

DESCRIPTION = ("Turn raw text (JSONL / text / Parquet) into the tokenized, packed shards training reads: Gopher and "
               "C4 heuristic filters, a trained quality classifier, an offline toxicity scorer, PII removal by "
               "severity, exact and MinHash near-duplicate removal, 13-gram decontamination against every "
               "benchmark of `opengemma eval`, and a staged mixture. Runs on datatrove's executor: both cores, "
               "resumable after a kill.")


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="prepare pretraining data: filter, dedup, decontaminate, tokenize",
                              description=DESCRIPTION)
    verbs = p.add_subparsers(dest="data_command", metavar="VERB", parser_class=type(p))
    verbs.required = True

    v = verbs.add_parser("prepare", help="run a mixture file into a shard directory",
                         description="Run the pipeline of MIXTURE (TOML or JSON; see "
                                     "examples/mixture-shared-corpus.toml) into DIR. A killed run resumes when run "
                                     "again with the same arguments; DIR is complete once DIR/manifest.json exists.")
    v.add_argument("--mixture", required=True, metavar="MIX", help="mixture file (.toml or .json)")
    v.add_argument("--output", "-o", required=True, metavar="DIR", help="output directory")
    v.add_argument("--workers", "-j", type=_positive, default=None,
                   help="worker processes (default: the mixture's `workers`, else 2)")
    v.add_argument("--restart", action="store_true", help="discard a previous (partial or complete) run in DIR")
    v.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="tokenize with this tokenizer.model / .gguf (or a folder from `opengemma tokenizer "
                        "train`, or 'embedded') instead of the mixture's `tokenizer`")

    v = verbs.add_parser("quality-train", help="train the quality classifier (curated vs web)",
                         description="Fit the linear quality classifier on curated text (--positive) against web "
                                     "text (--negative), report held-out precision/recall, save MODEL.npz + "
                                     "MODEL.json. Inputs are read as in a mixture (JSONL field --text-field, "
                                     "text files a document per line, .gz allowed).")
    v.add_argument("--positive", nargs="+", required=True, metavar="FILE", help="curated text (e.g. Wikipedia, books)")
    v.add_argument("--negative", nargs="+", required=True, metavar="FILE", help="raw web text (e.g. C4)")
    v.add_argument("--text-field", default="text", metavar="NAME", help="JSONL field with the text (default: text)")
    v.add_argument("--output", "-o", required=True, metavar="MODEL", help="model path (.npz; a .json goes next to it)")
    v.add_argument("--window", type=_positive, default=128, help="words per training window (default 128)")
    v.add_argument("--heldout", type=float_range(0.0, 0.9, lo_open=True), default=0.1,
                   help="held-out fraction (default 0.1)")

    v = verbs.add_parser("decontam", help="report documents of FILE that overlap an eval benchmark",
                         description="Build the n-gram index of every `opengemma eval` task found under --root and "
                                     "print, as JSON lines, each document of FILE that overlaps one.")
    v.add_argument("file", metavar="FILE", help="JSONL or text file")
    v.add_argument("--root", action="append", required=True, help="benchmark folder (repeatable)")
    v.add_argument("--text-field", default="text", metavar="NAME")
    v.add_argument("--n", type=_positive, default=13, help="n-gram length (default 13)")

    from ..cli import COMMANDS

    COMMANDS.setdefault("data", run_data)
    return p


def _documents(files: list[str], field: str):
    from . import mixture

    for name in files:
        path = Path(name).expanduser()
        if not path.is_file():
            raise OpenGemmaError(f"{path}: no such file")
        src = mixture.Source("input", [path], [field])
        for chunk in mixture.chunks(_Single(src)):
            for _, text in mixture.read_chunk(chunk, src):
                yield text


class _Single:
    """The two fields of a Mixture that :func:`mixture.chunks` reads, for one source."""

    def __init__(self, src):
        self.sources, self.chunk_mb = {src.name: src}, 1 << 20


def run_data(args) -> int:
    if args.data_command == "prepare":
        from .pipeline import prepare

        prepare(args.mixture, args.output, workers=args.workers, restart=args.restart, tokenizer=args.tokenizer)
        return 0
    if args.data_command == "quality-train":
        from .quality import train

        model = train(_documents(args.positive, args.text_field), _documents(args.negative, args.text_field),
                      window=args.window, heldout=args.heldout)
        path = model.save(args.output)
        info = model.info
        print(f"held-out precision {info['heldout_precision']:.3f}, recall {info['heldout_recall']:.3f}, "
              f"F1 {info['heldout_f1']:.3f} ({info['heldout_windows']} windows); saved {path}")
        return 0
    if args.data_command == "decontam":
        from .decontam import Index

        if not Path(args.file).expanduser().is_file():  # before the index, which takes seconds to build
            raise OpenGemmaError(f"{args.file}: no such file")
        index = Index.build(args.root, n=args.n)
        for t in index.tasks:
            if t.missing:
                print(f"opengemma: note: {t.name}: {t.missing}", file=sys.stderr)
        for i, text in enumerate(_documents([args.file], args.text_field)):
            hits = index.find(text)
            if hits:
                print(json.dumps({"doc": i, "hits": [{"task": t, "item": item, "ngram": g} for t, item, g in hits]}))
        return 0
    raise OpenGemmaError(f"unknown data command {args.data_command!r}")
