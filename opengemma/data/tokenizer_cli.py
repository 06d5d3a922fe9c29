"""``opengemma tokenizer``: train a Gemma-style SentencePiece tokenizer, or measure one.

  opengemma tokenizer train --input corpus.jsonl more.txt.gz --vocab-size 8192 --output tok/
  opengemma tokenizer train --input ../shared/datasets/pretrain_*/*.json* ../shared/datasets/pretrain_*/*.txt \\
      --text-field text,content,question,answer --vocab-size 8192 --output tok8k/
  opengemma tokenizer stats --tokenizer tok/tokenizer.model --input heldout.jsonl   # bytes per token vs Gemma 3

``train`` writes ``DIR/tokenizer.model`` (loadable by :class:`opengemma.tokenizer.Tokenizer`, the
chat formatter and ``opengemma data prepare --tokenizer``) and ``DIR/tokenizer.json`` (the
report: options, inputs, training time, bytes per token on held-out text for the new tokenizer
and for the embedded Gemma 3 tokenizer). See :mod:`opengemma.data.tokenize_train`.

The package's ``cli.py`` wires this in with one line, ``add_tokenizer_parser(sub)``, which also
registers the command's runner.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from ..cli import float_range, int_range
from ..errors import OpenGemmaError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[iI]?[bB]?\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def byte_size(text: str) -> int:
    """An argparse type: a number of bytes, with an optional k/M/G/T suffix (binary units)."""
    m = _SIZE.match(text.replace("_", ""))
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size such as 64M or 1000000, got {text[:60]!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text[:60]!r}")
    return value


def _fields(text: str) -> list[str]:
    fields = [f.strip() for f in text.split(",") if f.strip()]
    if not fields:
        raise argparse.ArgumentTypeError("expected one or more field names, comma-separated")
    return fields


def add_tokenizer_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tokenizer", help="train a SentencePiece tokenizer, or measure bytes per token",
                              description="Train a Gemma-style SentencePiece tokenizer (report section "
                                          "'Tokenizer': BPE, split digits, whitespace kept, byte fallback, "
                                          "Gemma's special ids and turn tokens) or measure one.")
    verbs = p.add_subparsers(dest="tokenizer_command", metavar="VERB", parser_class=type(p))
    verbs.required = True

    t = verbs.add_parser("train", help="train a tokenizer: DIR/tokenizer.model + DIR/tokenizer.json")
    _input_args(t)
    t.add_argument("--vocab-size", type=int_range(300, 1 << 22), required=True, metavar="N",
                   help="pieces in the vocabulary, special and byte pieces included (e.g. 8192, 32768, 262144)")
    t.add_argument("--output", "-o", required=True, metavar="DIR", help="output directory")
    t.add_argument("--sample-bytes", type=byte_size, default=64 << 20, metavar="SIZE",
                   help="train on at most this much text, a deterministic sample of lines (default 64M)")
    t.add_argument("--heldout", nargs="+", action="extend", default=[], metavar="FILE",
                   help="files to measure bytes per token on (default: a held-out fraction of --input)")
    t.add_argument("--heldout-fraction", type=float_range(0.0, 0.5), default=0.02, metavar="F",
                   help="without --heldout: the fraction of input documents kept out of training and measured "
                        "(by a hash of their text; default 0.02)")
    t.add_argument("--seed", type=int_range(0, 2**63 - 1), default=0, help="sampling and held-out seed (default 0)")
    t.add_argument("--threads", type=int_range(1, 1024), default=2, help="trainer threads (default 2)")
    t.add_argument("--character-coverage", type=float_range(0.9, 1.0), default=0.9995, metavar="F",
                   help="share of characters covered by pieces; the rest fall back to bytes (default 0.9995)")
    t.add_argument("--max-whitespace-run", type=int_range(1, 64), default=31, metavar="N",
                   help="user-defined pieces for runs of up to N newlines, spaces and tabs (Gemma 3: 31)")
    t.add_argument("--force", action="store_true", help="replace an existing DIR/tokenizer.model")

    s = verbs.add_parser("stats", help="bytes per token of a tokenizer on text, against another")
    s.add_argument("--tokenizer", required=True, metavar="TOKENIZER",
                   help="a tokenizer.model, a .gguf file, a directory with a tokenizer.model, or 'embedded'")
    _input_args(s)
    s.add_argument("--max-bytes", type=byte_size, default=8 << 20, metavar="SIZE",
                   help="measure on at most this much text per file, its first documents (default 8M)")
    from ..cli import COMMANDS

    COMMANDS.setdefault("tokenizer", run_tokenizer)
    return p


def _input_args(p) -> None:
    p.add_argument("--input", "-i", nargs="+", action="extend", required=True, metavar="FILE",
                   help="text (a document per line), JSONL or Parquet files, optionally .gz")
    p.add_argument("--text-field", type=_fields, default=["text"], metavar="NAME[,NAME...]",
                   help="JSONL/Parquet field(s) holding the text; a record's listed fields are joined by a "
                        "newline (default: text)")
    p.add_argument("--compare", default="embedded", metavar="TOKENIZER",
                   help="tokenizer to compare bytes per token with: 'embedded' (Gemma 3, default), a "
                        "tokenizer.model, a .gguf file, or 'none'")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run_tokenizer(args) -> int:
    from . import tokenize_train as tt

    compare = None if args.compare == "none" else args.compare
    if args.tokenizer_command == "train":
        report = tt.train_tokenizer(
            args.input, args.vocab_size, args.output, sample_bytes=args.sample_bytes, heldout=args.heldout,
            heldout_fraction=args.heldout_fraction, text_fields=args.text_field, seed=args.seed,
            threads=args.threads, character_coverage=args.character_coverage,
            max_whitespace_run=args.max_whitespace_run, compare=compare, force=args.force,
            log=lambda msg: print(msg, file=sys.stderr))
        if args.json:
            print(json.dumps(report, indent=1))
        else:
            print(f"wrote {args.output}/tokenizer.model ({report['vocab_size']:,} pieces, trained in "
                  f"{report['train_seconds']:.1f} s on {report['training_sample']['bytes'] / 1e6:.1f} MB) "
                  f"and tokenizer.json")
            if report["heldout"]["documents"]:
                print(tt.format_report(report))
        return 0
    if args.tokenizer_command == "stats":
        name, tok = tt.load_compare_tokenizer(args.tokenizer)
        other = tt.load_compare_tokenizer(compare) if compare is not None else None
        docs = []
        for f in args.input:
            size = 0
            for doc in tt.read_documents(f, args.text_field):
                if size >= args.max_bytes:
                    break
                docs.append((str(f), doc))
                size += len(doc.encode("utf-8"))
        if not docs:
            raise OpenGemmaError("the inputs hold no text")
        report = tt.heldout_report(docs, tok, other, source=f"the first {args.max_bytes:,} bytes of each file")
        report["tokenizer"] = {"name": name, "vocab_size": tok.vocab_size}
        print(json.dumps(report, indent=1) if args.json else tt.format_report(report, "tokenizer"))
        return 0
    raise OpenGemmaError(f"unknown tokenizer command {args.tokenizer_command!r}")
