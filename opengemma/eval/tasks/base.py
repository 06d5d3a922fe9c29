"""What every task module shares (report section "Evaluation", Table 6): reading records with their
original field names from a local JSONL directory or the Hugging Face hub, the multiple-choice item
type, and the few-shot sampler.

A task is a plain module with these attributes:

* ``NAME``, ``KIND`` ("mc" for log-likelihood choice, "gen" for generation), ``SHOTS`` (the Gemma
  report's Table 6 count) and optionally ``CARD_SHOTS`` (the Gemma 3 model card's), ``MAIN``
  (the metric quoted in the table), ``PROTOCOL`` (one paragraph saying exactly what is scored);
* ``load(source) -> (eval docs, few-shot pool docs, pool_is_eval_split)``;
* multiple choice: ``to_mc(doc) -> MCItem`` and ``shot_text(doc) -> str`` (a solved example);
  optionally ``description(doc)`` and ``shots_for(doc, pool, k, rng)``;
* generation: ``prompt(doc, shots) -> str``, ``STOP``, ``MAX_TOKENS``, ``score(doc, text) -> dict``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ...errors import OpenGemmaError


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item: per choice, the context and the continuation scored after it.

    Most tasks have one context and the choices as continuations (each ``" " + choice``);
    WinoGrande's partial scoring has one context per option and a shared continuation.
    ``choices`` are the strings whose character lengths normalise acc_norm.
    """

    pairs: tuple[tuple[str, str], ...]
    gold: int
    choices: tuple[str, ...]

    @staticmethod
    def simple(context: str, choices: Sequence[str], gold: int, delimiter: str = " ") -> MCItem:
        return MCItem(tuple((context, delimiter + c) for c in choices), int(gold), tuple(choices))


class DataSource:
    """Where records come from: ``data_dir`` (JSONL files with the original field names, laid out
    as ``../shared/benchmarks``) or, when it is None, the Hugging Face hub through ``datasets``."""

    def __init__(self, data_dir: str | Path | None):
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise OpenGemmaError(f"--data-dir {self.data_dir}: no such directory")

    def jsonl(self, relpath: str, hub: tuple | None = None) -> list[dict]:
        """Records of ``relpath`` under the data directory, or of ``hub`` = (path, name, split)."""
        if self.data_dir is None:
            if hub is None:
                raise OpenGemmaError(f"{relpath}: no hub copy is known for it; give --data-dir")
            return hub_records(*hub)
        path = self.data_dir / relpath
        if not path.is_file():
            raise OpenGemmaError(f"{path}: missing (expected JSONL with the original field names)")
        out = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise OpenGemmaError(f"{path}:{n}: not valid JSON") from None
        return out

    def text(self, relpath: str) -> str:
        if self.data_dir is None:
            raise OpenGemmaError(f"{relpath}: needs a local copy; give --data-dir")
        path = self.data_dir / relpath
        if not path.is_file():
            raise OpenGemmaError(f"{path}: missing")
        return path.read_text(encoding="utf-8")

    def exists(self, relpath: str) -> bool:
        return self.data_dir is not None and (self.data_dir / relpath).is_file()


def hub_records(path: str, name: str | None, split: str) -> list[dict]:
    """Records of a hub dataset split through ``datasets`` (the optional ``[eval]`` extra)."""
    try:
        import datasets  # lazily: an optional dependency
    except ImportError:
        raise OpenGemmaError("no --data-dir given and the `datasets` package is missing "
                             "(pip install 'opengemma[eval]', or pass --data-dir)") from None
    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # offline, gated, renamed: one line for the user
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OpenGemmaError(f"cannot load {path}/{name or ''}:{split} from the hub ({msg}); "
                             "pass --data-dir") from None
    return [dict(r) for r in ds]


def fixed_shots(doc: dict, pool: Sequence[dict], k: int, seed: int = 1234) -> list[dict]:
    """The few-shot examples for ``doc``: the first ``k`` of one seeded permutation of ``pool``,
    the same for every item (so the few-shot prefix is computed once and reused), skipping the
    item itself when the pool is the evaluated split."""
    if k <= 0:
        return []
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    out = []
    for i in order:
        if pool[i] is doc or pool[i] == doc:
            continue
        out.append(pool[i])
        if len(out) == k:
            break
    return out
