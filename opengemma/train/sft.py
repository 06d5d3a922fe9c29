"""Supervised fine-tuning data: conversations -> filtered -> Gemma chat format -> packed rows.

Report section "Instruction Tuning": SFT on prompt-response pairs formatted with the control
tokens of Tables 3-4, on data filtered for personal information, unsafe or toxic outputs,
mistaken self-identification and duplicates.

* **Filtering** (:func:`filter_conversations`), blocks shared with the data pipeline: personal
  data (:mod:`opengemma.data.pii`: sensitive data drops the conversation, personal data is
  redacted, per the pipeline's policy), toxic model turns (:mod:`opengemma.data.toxicity`, the
  worst 64-word window of each reply), mistaken self-identification (:func:`self_identification`:
  a reply claiming to be another assistant, "I am ChatGPT", "I'm Open Assistant, trained by
  LAION", which a Gemma model must not learn), and exact duplicates (the whole conversation's
  text, :func:`opengemma.data.dedup.content_hash`) or near ones (MinHash, ``dedup-near``). The
  :class:`FilterReport` says what each filter removed, with examples.
* **Formatting** (:func:`encode`): :func:`opengemma.chat.format_chat` gives ids and a loss mask
  that is 1 on model-turn tokens (and their ``<end_of_turn>``) only. Over-long examples are
  truncated (kept when a model token survives) or dropped, and counted either way.
* **Packing** (:func:`pack_examples`): examples laid back to back in rows of ``seq_len + 1``
  tokens with :class:`opengemma.data.packing.Packer` (whole examples only: one never straddles a
  row), segment ids keeping documents apart; the row's loss mask is the packer's (no prediction
  across a document boundary) AND the chat mask of each target.
* **Held-out split**: an example is held out when a hash of its formatted text falls in the
  lowest ``heldout_pct`` percent (stable whatever the order or the size of the file).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..chat import format_chat
from ..data.packing import PackedRow, Packer
from ..errors import OpenGemmaError
from .config import ALL_SFT_FILTERS as ALL_FILTERS
from .config import SFT_FILTERS as FILTERS
from .config import TOXICITY_THRESHOLD
from .prefs import Skips

# A reply that names itself as another assistant or as made by another lab. Mentions of such
# systems in third person ("ChatGPT is a model by OpenAI") are not self-identification.
_OTHER = (r"(?:chat\s?gpt|gpt-?[345](?:\.5)?(?:-turbo)?|open\s?assistant|claude|bard|llama|vicuna|alpaca|"
          r"bing(?: chat)?|copilot|koala|dolly|an? (?:ai|language model|assistant) (?:made|created|developed|"
          r"trained|built) by (?:openai|anthropic|meta|laion|microsoft|the open ?assistant (?:team|project)))")
_SELF_ID = re.compile(
    r"\b(?:i am|i'm|i’m|im|my name is)\s+(?:an?\s+|the\s+)?" + _OTHER
    + r"|\bas\s+(?:an?\s+)?" + _OTHER + r"\s*,\s*(?:i|my)\b"  # "As Open Assistant, I ..." (not "as the ChatGPT model")
    + r"|\b(?:i was|i am|i'm|i’m)\s+(?:an? \w+ )?(?:\w+ )?(?:made|created|developed|trained|built|programmed)\s+by\s+"
      r"(?:openai|anthropic|meta|laion|microsoft|the open ?assistant)", re.IGNORECASE)


def self_identification(text: str) -> str | None:
    """The phrase where ``text`` identifies itself as another assistant, or None."""
    m = _SELF_ID.search(text)
    return m.group(0) if m else None


@dataclass
class FilterReport:
    kept: int = 0
    total: int = 0
    removed: Counter = field(default_factory=Counter)
    redacted: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def note(self, kind: str, text: str) -> None:
        self.examples.setdefault(kind, [])
        if len(self.examples[kind]) < 3:
            self.examples[kind].append(text[:160])

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "removed": dict(self.removed),
                "redacted": dict(self.redacted), "examples": self.examples}

    def summary(self) -> str:
        parts = [f"{k} {v}" for k, v in sorted(self.removed.items())]
        red = [f"{k} {v}" for k, v in sorted(self.redacted.items())]
        return (f"kept {self.kept} of {self.total}; removed: {', '.join(parts) or 'none'}"
                + (f"; redacted: {', '.join(red)}" if red else ""))


def _is_model(m: dict) -> bool:
    return m.get("role") in ("model", "assistant")


def conversation_text(messages: Sequence[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content'].strip()}" for m in messages)


def filter_conversations(convs: list[list[dict]], filters: Sequence[str] = FILTERS, *, pii_policy: dict | None = None,
                         toxicity_threshold: float = TOXICITY_THRESHOLD, work_dir=None,
                         ) -> tuple[list[list[dict]], FilterReport]:
    """The conversations that pass ``filters`` (in order), and what was removed and why."""
    unknown = [f for f in filters if f not in ALL_FILTERS]
    if unknown:
        raise OpenGemmaError(f"unknown SFT filter(s) {', '.join(unknown)}; known: {', '.join(ALL_FILTERS)}")
    rep = FilterReport(total=len(convs))
    out = list(convs)
    if "pii" in filters:
        from ..data import pii

        policy = pii.check_policy(pii_policy)
        kept = []
        for conv in out:
            new, dropped = [], False
            for m in conv:
                text, found = pii.apply_policy(m["content"], policy)
                if text is None:
                    dropped = True
                    break
                if found and text != m["content"]:
                    rep.redacted["pii"] += 1
                new.append({**m, "content": text})
            if dropped:
                rep.removed["pii"] += 1
                rep.note("pii", conversation_text(conv))
            else:
                kept.append(new)
        out = kept
    if "selfid" in filters:
        kept = []
        for conv in out:
            hit = next((h for m in conv if _is_model(m) and (h := self_identification(m["content"]))), None)
            if hit:
                rep.removed["selfid"] += 1
                rep.note("selfid", hit)
            else:
                kept.append(conv)
        out = kept
    if "toxicity" in filters and out:
        from ..data import toxicity

        replies = ["\n".join(m["content"] for m in conv if _is_model(m)) for conv in out]
        scores = toxicity.score_document(replies)
        kept = []
        for conv, s, text in zip(out, scores, replies):
            if s >= toxicity_threshold:
                rep.removed["toxicity"] += 1
                rep.note("toxicity", text)
            else:
                kept.append(conv)
        out = kept
    if "dedup" in filters:
        try:
            import xxhash  # noqa: F401  (content_hash's hash)
        except ImportError:
            raise OpenGemmaError("the dedup filter needs xxhash: pip install 'opengemma[data]' "
                                 "(or leave dedup out of --filters)") from None
        from ..data.dedup import content_hash

        seen, kept = set(), []
        for conv in out:
            h = content_hash(conversation_text(conv))
            if h in seen:
                rep.removed["dedup"] += 1
                rep.note("dedup", conversation_text(conv))
            else:
                seen.add(h)
                kept.append(conv)
        out = kept
    if "dedup-near" in filters and len(out) > 1:
        import tempfile

        from ..data.dedup import near_duplicates

        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            drop = set(near_duplicates([conversation_text(c) for c in out], tmp))
        for i in sorted(drop):
            rep.note("dedup-near", conversation_text(out[i]))
        rep.removed["dedup-near"] += len(drop)
        out = [c for i, c in enumerate(out) if i not in drop]
    rep.kept = len(out)
    return out, rep


# -- formatting ---------------------------------------------------------------------------------------
@dataclass
class Example:
    ids: np.ndarray  # int64 [n]
    mask: np.ndarray  # int64 [n]: 1 on tokens the model is trained to produce


def encode(tokenizer, convs: list[list[dict]], max_len: int, *, overlong: str = "truncate",
           skips: Skips | None = None) -> tuple[list[Example], Skips]:
    """Format every conversation (ids + chat loss mask); examples longer than ``max_len`` tokens are
    truncated (``overlong="truncate"``: dropped anyway if no model token is left) or dropped; both
    are counted in ``skips`` (truncations under ``truncated``, which are kept)."""
    if overlong not in ("truncate", "drop"):
        raise OpenGemmaError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    skips = skips or Skips()
    out = []
    for i, conv in enumerate(convs):
        try:
            ct = format_chat(tokenizer, conv, add_generation_prompt=False)
        except OpenGemmaError as e:
            skips.add("format_error", f"conversation {i}: {e}")
            continue
        ids, mask = np.asarray(ct.ids, dtype=np.int64), np.asarray(ct.mask, dtype=np.int64)
        if len(ids) > max_len:
            if overlong == "drop":
                skips.add("overlong_dropped", f"conversation {i} ({len(ids)} tokens)")
                continue
            ids, mask = ids[:max_len], mask[:max_len]
            if not mask[1:].any():
                skips.add("overlong_no_target", f"conversation {i}")
                continue
            skips.add("truncated", f"conversation {i} ({len(ct.ids)} -> {max_len} tokens)")
        if not mask[1:].any():
            skips.add("no_target", f"conversation {i}")
            continue
        out.append(Example(ids, mask))
    return out, skips


def in_heldout(ids: Sequence[int], pct: float) -> bool:
    """Whether the example with token ``ids`` belongs to the held-out split: the BLAKE2b-64 hash of
    its ids (int64 little-endian), as a fraction of 2**64, below ``pct`` / 100."""
    data = np.asarray(ids, dtype="<i8").tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") < pct / 100 * 2**64


def pack_examples(examples: Sequence[Example], seq_len: int, pad_id: int = 0) -> list[PackedRow]:
    """Rows of ``seq_len + 1`` tokens, whole examples only (each must hold at most ``seq_len + 1``
    tokens), loss mask = the packer's document mask AND the chat mask of each target."""
    ids_p = Packer(seq_len, pad_id=pad_id, split_across_rows=False)
    mask_p = Packer(seq_len, pad_id=0, split_across_rows=False)
    rows = []

    def emit(a: PackedRow, b: PackedRow) -> None:
        # The two packers see documents of the same lengths, so their layouts are identical.
        rows.append(PackedRow(tokens=a.tokens, segment_ids=a.segment_ids,
                              loss_mask=a.loss_mask & (b.tokens[1:] == 1), source=None))

    for ex in examples:
        if len(ex.ids) > seq_len + 1:
            raise OpenGemmaError(f"an example of {len(ex.ids)} tokens does not fit rows of {seq_len + 1}")
        for a, b in zip(ids_p.add(ex.ids), mask_p.add(ex.mask)):
            emit(a, b)
    a, b = ids_p.flush(), mask_p.flush()
    if a is not None:
        emit(a, b)
    return rows


@dataclass
class SFTData:
    train: list[PackedRow]
    heldout: list[PackedRow]
    report: dict


def prepare(tokenizer, convs: list[list[dict]], seq_len: int, *, skips: Skips, filters: Sequence[str] = FILTERS,
            overlong: str = "truncate", heldout_pct: float = 5.0, pii_policy: dict | None = None,
            toxicity_threshold: float = TOXICITY_THRESHOLD) -> SFTData:
    """Filter, format, split and pack conversations; the report says what happened to every one."""
    kept, frep = filter_conversations(convs, filters, pii_policy=pii_policy, toxicity_threshold=toxicity_threshold)
    examples, skips = encode(tokenizer, kept, seq_len + 1, overlong=overlong, skips=skips)
    held = [e for e in examples if in_heldout(e.ids, heldout_pct)]
    train = [e for e in examples if not in_heldout(e.ids, heldout_pct)]
    pad = getattr(tokenizer, "pad_id", 0)
    pad = pad if isinstance(pad, int) and pad >= 0 else 0
    rows, hrows = pack_examples(train, seq_len, pad), pack_examples(held, seq_len, pad)
    report = {"read_skips": skips.to_dict(), "filters": frep.to_dict(), "examples": len(examples),
              "train_examples": len(train), "heldout_examples": len(held), "train_rows": len(rows),
              "heldout_rows": len(hrows), "seq_len": seq_len,
              "supervised_tokens": int(sum(int(r.loss_mask.sum()) for r in rows)),
              "heldout_rule": f"blake2b-64(token ids) < {heldout_pct}% of 2**64",
              "filter_summary": frep.summary()}
    return SFTData(rows, hrows, report)
