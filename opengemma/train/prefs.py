"""Readers for instruction-tuning data: conversations (SFT), preference pairs (reward model) and
prompts (RL), in the formats the ecosystem uses, converted to one shape: message lists
``[{"role": "system"|"user"|"model", "content": str}, ...]`` for :func:`opengemma.chat.format_chat`.

Conversations (one JSONL record each):

* TRL's conversational format ``{"messages": [...]}`` (roles ``system``/``user``/``assistant``;
  ``model`` is accepted as an alias), and TRL's prompt-completion format ``{"prompt": ...,
  "completion": ...}`` (strings or message lists);
* GSM8K as shipped (``{"question", "answer"}``): user question -> model solution, the calculator
  annotations ``<<48/2=24>>`` removed and the final ``#### 72`` written ``The answer is 72.`` (the
  phrase the GSM8K evaluation's strict match looks for);
* instruction records (``{"instruction", "input"?, "output"}``, and self-instruct's
  ``{"instruction", "instances": [{"input", "output"}]}``);
* OpenAssistant message trees as shipped (``{"message_tree_id", "prompt": {...}}``): one thread per
  tree, following the best-ranked reply at every branch (as the guanaco/oasst top-1 threads);
  deleted, synthetic (model-written) and review-failed messages are cut with their subtrees.

Preference pairs:

* TRL's ``{"chosen": [...], "rejected": [...]}`` message lists, optionally with a shared ``prompt``
  (messages or a string), and plain strings (implicit prompt); optional ``margin``;
* hh-rlhf as shipped (``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` dialogue strings);
* OpenAssistant trees: every two ranked sibling replies of one parent make a (better, worse) pair.

Every record that cannot be used is a **counted skip** with a reason (:class:`Skips`), never a
silent loss and never a traceback: unknown roles, empty turns, turns that do not alternate,
identical chosen/rejected sides, malformed JSON.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OpenGemmaError

ROLES = {"system": "system", "user": "user", "human": "user", "prompter": "user", "model": "model",
         "assistant": "model"}


class BadExample(ValueError):
    """A record that cannot be used; ``reason`` is the counter's key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Skips:
    """Counted skips by reason, with the first few places for the report."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.counts), "first": self.examples}

    def summary(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "none"


@dataclass
class Pair:
    chosen: list[dict]
    rejected: list[dict]
    margin: float | None = None


# -- files --------------------------------------------------------------------------------------------
def read_jsonl(path, skips: Skips) -> Iterator[tuple[str, object]]:
    """(``file:line``, record) for every JSON line of ``path`` (``.gz`` is read through gzip); a
    line that is not JSON is a counted skip."""
    path = Path(path)
    if not path.is_file():
        raise OpenGemmaError(f"{path}: no such data file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path.name}:{n}", json.loads(line)
                except json.JSONDecodeError:
                    skips.add("bad_json", f"{path.name}:{n}")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise OpenGemmaError(f"{path}: unreadable ({e})") from None


# -- messages -----------------------------------------------------------------------------------------
def normalize(messages, *, need_model_last: bool = True) -> list[dict]:
    """Validated messages with roles normalised to system/user/model; raises :class:`BadExample`.

    Checks what :func:`opengemma.chat.format_chat` would refuse (so the reason can be counted) and
    what training needs: no empty turn, a model turn to learn from (last, when ``need_model_last``)."""
    if not isinstance(messages, list) or not messages:
        raise BadExample("malformed", "messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadExample("malformed", f"message {i} needs 'role' and 'content'")
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise BadExample("unknown_role", f"message {i} has role {role!r}")
        if not isinstance(content, str):
            raise BadExample("malformed", f"message {i} content is {type(content).__name__}")
        if not content.strip():
            raise BadExample("empty_turn", f"message {i} ({role}) is empty")
        out.append({"role": ROLES[role.lower()], "content": content})
    body = out[1:] if out[0]["role"] == "system" else out
    if not body:
        raise BadExample("no_model_turn", "only a system message")
    for i, m in enumerate(body):
        if m["role"] != ("user" if i % 2 == 0 else "model"):
            raise BadExample("not_alternating", f"turn {i} is {m['role']}")
    if need_model_last and body[-1]["role"] != "model":
        raise BadExample("no_model_turn" if len(body) == 1 else "ends_with_user", "the last turn is the user's")
    return out


def _as_messages(x, role: str) -> list[dict]:
    if isinstance(x, str):
        return [{"role": role, "content": x}]
    if isinstance(x, list):
        return list(x)
    raise BadExample("malformed", f"expected a string or a message list, got {type(x).__name__}")


_CALC = re.compile(r"<<[^<>]*>>")
_FINAL = re.compile(r"\n?####\s*(.+?)\s*$", re.DOTALL)


def gsm8k_solution(answer: str) -> str:
    """A GSM8K worked answer as the model should write it: calculator annotations removed, the
    final ``#### N`` as ``The answer is N.``"""
    text = _CALC.sub("", answer)
    m = _FINAL.search(text)
    if not m:
        raise BadExample("malformed", "GSM8K answer without '#### N'")
    return text[:m.start()].rstrip() + f"\nThe answer is {m.group(1).strip()}."


def conversation(rec) -> list[dict]:
    """One training conversation from a record in any supported conversation format."""
    if not isinstance(rec, dict):
        raise BadExample("malformed", f"a record must be an object, got {type(rec).__name__}")
    if "messages" in rec:
        return normalize(rec["messages"])
    if "question" in rec and "answer" in rec:
        if not isinstance(rec["question"], str) or not isinstance(rec["answer"], str):
            raise BadExample("malformed", "question/answer must be strings")
        return normalize([{"role": "user", "content": rec["question"]},
                          {"role": "model", "content": gsm8k_solution(rec["answer"])}])
    if "prompt" in rec and "completion" in rec:
        return normalize(_as_messages(rec["prompt"], "user") + _as_messages(rec["completion"], "model"))
    if "instruction" in rec and ("output" in rec or "instances" in rec):
        inst = rec["instances"][0] if rec.get("instances") else rec
        if not isinstance(inst, dict):
            raise BadExample("malformed", "instances[0] must be an object")
        prompt = rec["instruction"] + (f"\n\n{inst['input']}" if str(inst.get("input") or "").strip() else "")
        return normalize([{"role": "user", "content": prompt}, {"role": "model", "content": str(inst.get("output", ""))}])
    raise BadExample("unknown_format", f"fields {sorted(rec)[:6]}")


# -- OpenAssistant trees --------------------------------------------------------------------------------
def _usable(msg: dict) -> bool:
    return not msg.get("deleted") and not msg.get("synthetic") and msg.get("review_result", True) is not False


def _turn(msg: dict) -> dict:
    return {"role": ROLES.get(str(msg.get("role")), "unknown"), "content": msg.get("text", "")}


def _rank(msg: dict) -> float:
    r = msg.get("rank")
    return r if isinstance(r, (int, float)) else float("inf")


def oasst_thread(tree: dict, skips: Skips, where: str) -> list[dict] | None:
    """The best-ranked thread of an OpenAssistant tree, cut after its last usable assistant turn."""
    msg = tree.get("prompt") if isinstance(tree, dict) else None
    if not isinstance(msg, dict):
        raise BadExample("malformed", "an oasst tree needs a 'prompt' message")
    if not _usable(msg):
        raise BadExample("oasst_synthetic_or_deleted", "the root prompt is deleted, synthetic or failed review")
    turns: list[dict] = []
    cut = 0
    while msg is not None:  # replies are filtered to usable ones: a bad message cuts its subtree
        turns.append(_turn(msg))
        if turns[-1]["role"] == "model":
            cut = len(turns)
        replies = [r for r in msg.get("replies") or [] if isinstance(r, dict) and _usable(r)]
        msg = min(replies, key=_rank) if replies else None
    if not cut:
        raise BadExample("no_model_turn", "no usable assistant reply")
    return normalize(turns[:cut])


def oasst_pairs(tree: dict, skips: Skips, where: str) -> list[Pair]:
    """(better, worse) pairs of ranked sibling assistant replies, each after its thread."""
    pairs: list[Pair] = []

    def walk(msg: dict, path: list[dict]) -> None:
        here = path + [_turn(msg)]
        replies = [r for r in msg.get("replies") or [] if isinstance(r, dict) and _usable(r)]
        ranked = sorted((r for r in replies if r.get("role") == "assistant" and r.get("rank") is not None), key=_rank)
        for i in range(len(ranked)):
            for j in range(i + 1, len(ranked)):
                if _rank(ranked[i]) == _rank(ranked[j]):
                    continue
                try:
                    pairs.append(make_pair(here + [_turn(ranked[i])], here + [_turn(ranked[j])]))
                except BadExample as e:
                    skips.add(e.reason, where)
        for r in replies:
            walk(r, here)

    root = tree.get("prompt") if isinstance(tree, dict) else None
    if not isinstance(root, dict):
        raise BadExample("malformed", "an oasst tree needs a 'prompt' message")
    if _usable(root):
        walk(root, [])
    else:
        skips.add("oasst_synthetic_or_deleted", where)
    return pairs


# -- preferences ---------------------------------------------------------------------------------------
_HH = re.compile(r"\n\n(Human|Assistant):[ ]?")


def hh_dialogue(text: str) -> list[dict]:
    """An hh-rlhf dialogue string as messages."""
    if not isinstance(text, str):
        raise BadExample("malformed", "hh-rlhf sides must be strings")
    parts = _HH.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise BadExample("malformed", "not an hh-rlhf dialogue ('\\n\\nHuman: ...')")
    return [{"role": "user" if role == "Human" else "model", "content": content}
            for role, content in zip(parts[1::2], parts[2::2])]


def make_pair(chosen: list[dict], rejected: list[dict], margin=None) -> Pair:
    c, r = normalize(chosen), normalize(rejected)
    if c == r or [m["content"].strip() for m in c] == [m["content"].strip() for m in r]:
        raise BadExample("identical_sides", "chosen and rejected are the same")
    if margin is not None and not isinstance(margin, (int, float)):
        raise BadExample("malformed", "margin must be a number")
    return Pair(c, r, None if margin is None else float(margin))


def pair(rec) -> Pair:
    """A preference pair from a TRL or hh-rlhf record."""
    if not isinstance(rec, dict) or "chosen" not in rec or "rejected" not in rec:
        raise BadExample("unknown_format", "a preference record needs 'chosen' and 'rejected'")
    ch, rj = rec["chosen"], rec["rejected"]
    if "prompt" in rec:  # TRL: a shared prompt (explicit)
        prompt = _as_messages(rec["prompt"], "user")
        return make_pair(prompt + _as_messages(ch, "model"), prompt + _as_messages(rj, "model"), rec.get("margin"))
    if isinstance(ch, str) and isinstance(rj, str):
        if _HH.match(ch):
            return make_pair(hh_dialogue(ch), hh_dialogue(rj), rec.get("margin"))
        raise BadExample("malformed", "string sides need a 'prompt' (or hh-rlhf dialogues)")
    return make_pair(_as_messages(ch, "model"), _as_messages(rj, "model"), rec.get("margin"))


def _is_oasst(rec) -> bool:
    return isinstance(rec, dict) and "message_tree_id" in rec and isinstance(rec.get("prompt"), dict)


def read_conversations(path, skips: Skips | None = None) -> tuple[list[list[dict]], Skips]:
    """Every usable conversation of a JSONL file (any supported format, oasst trees included)."""
    skips = skips or Skips()
    out = []
    for where, rec in read_jsonl(path, skips):
        try:
            out.append(oasst_thread(rec, skips, where) if _is_oasst(rec) else conversation(rec))
        except BadExample as e:
            skips.add(e.reason, where)
    return out, skips


def read_pairs(path, skips: Skips | None = None) -> tuple[list[Pair], Skips]:
    """Every usable preference pair of a JSONL file (TRL, hh-rlhf, or oasst trees)."""
    skips = skips or Skips()
    out: list[Pair] = []
    for where, rec in read_jsonl(path, skips):
        try:
            if _is_oasst(rec):
                out += oasst_pairs(rec, skips, where)
            else:
                out.append(pair(rec))
        except BadExample as e:
            skips.add(e.reason, where)
    return out, skips


@dataclass
class Prompt:
    """An RL prompt: the conversation so far (ends with a user turn) and what the reward needs
    (e.g. GSM8K's reference ``answer``)."""

    messages: list[dict]
    meta: dict = field(default_factory=dict)


def read_prompts(path, skips: Skips | None = None) -> tuple[list[Prompt], Skips]:
    """RL prompts: GSM8K records (``question``; ``answer`` kept for the reward), ``{"prompt": str |
    messages}``, ``{"messages": [...]}`` (a final model turn is dropped), preference records (their
    shared prompt) and oasst trees (the root prompt), or a JSON string per line (oasst prompt lists)."""
    skips = skips or Skips()
    out: list[Prompt] = []
    for where, rec in read_jsonl(path, skips):
        try:
            out.append(_prompt(rec))
        except BadExample as e:
            skips.add(e.reason, where)
    return out, skips


def _prompt(rec) -> Prompt:
    if isinstance(rec, str):
        return Prompt(normalize([{"role": "user", "content": rec}], need_model_last=False))
    if not isinstance(rec, dict):
        raise BadExample("malformed", f"a record must be an object or a string, got {type(rec).__name__}")
    if _is_oasst(rec):
        return Prompt(normalize([_turn(rec["prompt"])], need_model_last=False))
    if "question" in rec:
        if not isinstance(rec["question"], str):
            raise BadExample("malformed", "question must be a string")
        return Prompt(normalize([{"role": "user", "content": rec["question"]}], need_model_last=False),
                      {k: v for k, v in rec.items() if k != "question"})
    if "chosen" in rec and isinstance(rec["chosen"], str) and _HH.match(rec["chosen"]):
        msgs = hh_dialogue(rec["chosen"])
        return Prompt(normalize(msgs[:-1] if msgs[-1]["role"] == "model" else msgs, need_model_last=False))
    msgs = _as_messages(rec["prompt"], "user") if "prompt" in rec else rec.get("messages")
    if msgs is None:
        raise BadExample("unknown_format", f"fields {sorted(rec)[:6]}")
    msgs = normalize(msgs, need_model_last=False)
    if msgs[-1]["role"] == "model":
        msgs = msgs[:-1]
    if not msgs or msgs[-1]["role"] != "user":
        raise BadExample("no_user_turn", "the prompt must end with a user turn")
    return Prompt(msgs, {k: v for k, v in rec.items() if k not in ("prompt", "messages")})
