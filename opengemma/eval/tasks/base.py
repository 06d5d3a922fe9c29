"""What every task module shares (report section "Evaluation", Tables 6-8): reading records with
their original field names from local directories (JSONL, CSV/TSV, gzip'd text) or the Hugging
Face hub, the multiple-choice item type, and the few-shot sampler.

A task is a plain module with these attributes:

* ``NAME``, ``KIND`` ("mc" for log-likelihood choice, "gen" for generation), ``SHOTS`` (the Gemma
  report's count) and optionally ``CARD_SHOTS`` (the Gemma 3 model card's), ``MAIN`` (the metric
  quoted in the table), ``PROTOCOL`` (one paragraph saying exactly what is scored);
* ``load(source) -> (eval docs, few-shot pool docs, pool_is_eval_split)``;
* multiple choice: ``to_mc(doc) -> MCItem`` and ``shot_text(doc) -> str`` (a solved example);
  optionally ``description(doc)``, ``shots_for(doc, pool, k, rng)``, ``aggregate(docs, items,
  results) -> (metrics, details)`` for metrics other than acc/acc_norm (``results``: per item, per
  choice ``(loglik, is_greedy)``), and ``CHAT_FORMAT = False`` to score raw text even with ``--chat``;
* generation: ``prompt(doc, shots) -> str``, ``STOP``, ``MAX_TOKENS``, and ``score(doc, text) ->
  dict`` per document or ``score_all(docs, samples_per_doc) -> (metrics, details)`` over the run
  (offline classifiers score in batches); optionally ``SAMPLES``, ``TEMPERATURE``, ``TOP_P`` (the
  task's published sampling settings, recorded in the result);
* optionally ``check()``: raises :class:`OpenGemmaError` when a scorer the task needs is not
  installed (called before the model loads), and ``decontam_texts(doc) -> list[str]``: the test
  text the data pipeline's decontamination should look for when it is not the MC context (else it
  uses the contexts + gold continuation of ``to_mc(doc)`` or ``prompt(doc, [])``).

``metrics`` is a flat ``{name: float}`` (``<name>_stderr`` next to a mean); ``details`` holds
per-group breakdowns and the scorer's name (``details["scorer"]``).
"""

from __future__ import annotations

import csv
import gzip
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
    """Where records come from: one or more local directories searched in order (JSONL/CSV/TSV with
    the original field names, laid out as ``../shared/benchmarks`` and ``../shared/datasets``) or,
    when ``roots`` is None, the Hugging Face hub through ``datasets``.

    ``data_dir`` is the first root (None for the hub). Every reader names the file and, for a bad
    record, its line and the missing field: one clear line instead of a KeyError deep in a task.
    """

    def __init__(self, roots: str | Path | Sequence[str | Path] | None):
        if roots is None:
            self.roots: list[Path] = []
        else:
            items = [roots] if isinstance(roots, (str, Path)) else list(roots)
            self.roots = [Path(r).expanduser() for r in items]
            for root in self.roots:
                if not root.is_dir():
                    raise OpenGemmaError(f"--data-dir {root}: no such directory")
        self.data_dir = self.roots[0] if self.roots else None

    def find(self, relpath: str) -> Path:
        """The first root holding ``relpath``; a clear error naming every root searched if none does."""
        if not self.roots:
            raise OpenGemmaError(f"{relpath}: needs a local copy; give --data-dir")
        for root in self.roots:
            if (root / relpath).is_file():
                return root / relpath
        where = ", ".join(str(r) for r in self.roots)
        raise OpenGemmaError(f"{relpath}: missing (searched {where}); give --data-dir with the directory that holds it")

    def exists(self, relpath: str) -> bool:
        return any((root / relpath).is_file() for root in self.roots)

    def jsonl(self, relpath: str, hub: tuple | None = None, fields: Sequence[str] = ()) -> list[dict]:
        """Records of ``relpath`` (gzip'd if it ends in .gz), or of ``hub`` = (path, name, split) when
        there is no local directory; each must have ``fields``."""
        if not self.roots:
            if hub is None:
                raise OpenGemmaError(f"{relpath}: no hub copy is known for it; give --data-dir")
            return require(hub_records(*hub), fields, "/".join(str(h) for h in hub if h))
        path = self.find(relpath)
        out = []
        for n, line in enumerate(self.lines(relpath), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise OpenGemmaError(f"{path}:{n}: not valid JSON") from None
                if not isinstance(rec, dict):
                    raise OpenGemmaError(f"{path}:{n}: expected a JSON object per line")
                require([rec], fields, f"{path}:{n}")
                out.append(rec)
        return out

    def table(self, relpath: str, fields: Sequence[str] = (), delimiter: str = ",") -> list[dict]:
        """Rows of a CSV/TSV file with a header line (as ``csv.DictReader``), each with ``fields``."""
        path = self.find(relpath)
        with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: some sources have a BOM
            rows = list(csv.DictReader(f, delimiter=delimiter))
        for n, row in enumerate(rows, 2):
            require([row], fields, f"{path}:{n}")
        return rows

    def lines(self, relpath: str) -> list[str]:
        """The lines of a text file (gzip'd if it ends in .gz), without their line ends."""
        path = self.find(relpath)
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                # iterate the file, not str.splitlines(): JSON strings may hold U+2028, U+0085 and
                # other characters that splitlines() treats as line ends
                return [line.rstrip("\r\n") for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise OpenGemmaError(f"{path}: unreadable ({e})") from None

    def text(self, relpath: str) -> str:
        return self.find(relpath).read_text(encoding="utf-8")


def require(records: Sequence[dict], fields: Sequence[str], where: str) -> list[dict]:
    """``records`` unchanged, or one clear error naming the first record without a needed field
    (a null value counts as missing)."""
    for i, rec in enumerate(records):
        for name in fields:
            if rec.get(name) is None:
                at = where if len(records) == 1 else f"{where} record {i + 1}"
                raise OpenGemmaError(f"{at}: record has no {name!r} field")
    return list(records)


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


def interleave(groups: Sequence[Sequence[dict]]) -> list[dict]:
    """Round-robin over groups (categories, prompt files): every prefix of the result is a
    balanced deterministic subset, so ``--limit N`` samples each group alike."""
    out, i = [], 0
    while any(i < len(g) for g in groups):
        out.extend(g[i] for g in groups if i < len(g))
        i += 1
    return out


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
