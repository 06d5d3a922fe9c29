"""The Gemma chat format: one formatter for SFT, reward pairs, RL rollouts, evaluation and serving.

Report section "Instruction Tuning / Formatting", Tables 3 and 4: a dialogue is a sequence of turns
``<start_of_turn>{user|model}\\n{content}<end_of_turn>\\n``, preceded by ``<bos>``; the model is
prompted with an opening ``<start_of_turn>model\\n`` and ends its answer with ``<end_of_turn>``.

The layout follows the Hugging Face chat template shipped with Gemma 3 (text part):

* ``<bos>`` once, then the turns;
* each message's content is ``trim``-med (``str.strip()``), exactly as the template's
  ``message['content'] | trim`` does, so a trailing newline in a message does not change the ids;
* Gemma has no system role: a leading system message is folded into the first user turn as
  ``system + "\\n\\n" + user`` (the system text itself is not trimmed, as in the template);
* ``"assistant"`` is accepted as an alias of ``"model"``;
* roles must alternate user/model, starting with user;
* ``add_generation_prompt`` appends ``<start_of_turn>model\\n``.

Stricter than the template (which would render these silently): a system message anywhere but
first, a system message alone, and a generation prompt after a model turn are errors.

Unlike rendering the template to a string and re-tokenizing it, message contents are tokenized
with :meth:`Tokenizer.encode_plain` and control tokens are inserted by id, so text in a message
can never forge ``<start_of_turn>``/``<end_of_turn>``. For benign text the ids are identical to
tokenizing the rendered string (tests check this against transformers).

Loss mask: 1 on the tokens of each model turn's content and on its closing ``<end_of_turn>``
(the model must learn to stop, and ``<end_of_turn>`` is one of the tokenizer's ``stop_ids``); 0 on
everything else, including the ``"\\n"`` after ``<end_of_turn>``: generation stops at
``<end_of_turn>``, so the model never emits that newline -- it is template glue that the formatter
re-inserts when the conversation continues.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import OpenGemmaError
from .tokenizer import Tokenizer

USER, MODEL, SYSTEM = "user", "model", "system"
_ROLE_ALIASES = {USER: USER, MODEL: MODEL, "assistant": MODEL, SYSTEM: SYSTEM}
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"


@dataclass(frozen=True)
class ChatTokens:
    """A formatted conversation.

    ``ids``: token ids, starting with ``<bos>``. ``mask``: same length; 1 on tokens the model is
    trained to produce (model-turn contents and their ``<end_of_turn>``), else 0. ``text``: the
    rendered conversation, for display (control tokens spelled out).
    """

    ids: list[int]
    mask: list[int]
    text: str

    def __len__(self) -> int:
        return len(self.ids)


def _validate(messages, add_generation_prompt: bool) -> tuple[str | None, list[tuple[str, str]]]:
    """(system text or None, [(role, content), ...]) with roles normalized to user/model."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise OpenGemmaError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise OpenGemmaError("messages is empty: a conversation needs at least one user message")
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise OpenGemmaError(
                f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        if "role" not in message or "content" not in message:
            raise OpenGemmaError(f"message {i} must have both 'role' and 'content' keys")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or role not in _ROLE_ALIASES:
            raise OpenGemmaError(
                f"message {i} has unknown role {role!r}; expected 'system', 'user', 'model' or 'assistant'"
            )
        if not isinstance(content, str):
            raise OpenGemmaError(f"message {i} ({role}) content must be a string, got {type(content).__name__}")
        turns.append((_ROLE_ALIASES[role], content))

    system = None
    if turns[0][0] == SYSTEM:
        system = turns.pop(0)[1]
        if not turns:
            raise OpenGemmaError("a system message must be followed by a user message")
    offset = 0 if system is None else 1  # so error messages index the caller's list
    for i, (role, _) in enumerate(turns):
        if role == SYSTEM:
            raise OpenGemmaError(f"message {i + offset} is a system message; only the first message may be one")
        expected = USER if i % 2 == 0 else MODEL
        if role != expected:
            raise OpenGemmaError(
                f"message {i + offset} has role {role!r} but {expected!r} was expected: "
                "roles must alternate user/model, starting with user"
            )
    if add_generation_prompt and turns[-1][0] == MODEL:
        raise OpenGemmaError(
            "add_generation_prompt=True needs the conversation to end with a user message, not a model one"
        )
    return system, turns


def format_chat(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
) -> ChatTokens:
    """Token ids, loss mask and display text of a conversation in Gemma's chat format.

    ``messages``: ``[{"role": "system"|"user"|"model"|"assistant", "content": str}, ...]``; an
    optional system message first, then user and model turns alternating, starting with user.
    With ``add_generation_prompt`` (the default, for prompting) the conversation must end with a
    user message and ``<start_of_turn>model\\n`` is appended; pass False to format complete
    dialogues for training or scoring.
    """
    system, turns = _validate(messages, add_generation_prompt)
    sot, eot = tokenizer.start_of_turn_id, tokenizer.end_of_turn_id
    newline = tokenizer.encode_plain("\n")
    ids, mask, text = [tokenizer.bos_id], [0], [tokenizer.id_to_piece(tokenizer.bos_id)]

    for k, (role, content) in enumerate(turns):
        body = content.strip()
        if k == 0 and system is not None:
            body = system + "\n\n" + body
        ids.append(sot)
        mask.append(0)
        if role == USER:
            part = tokenizer.encode_plain(f"{role}\n{body}")
            ids += part
            mask += [0] * len(part)
        else:
            # Header and content are encoded separately so the mask boundary is exact. This gives
            # the same ids as encoding "model\n" + body in one go: "\n" is a user-defined piece,
            # which sentencepiece (and HF, and llama.cpp) never merges with its neighbours, and the
            # trimmed body cannot start with another newline.
            header, part = tokenizer.encode_plain(f"{role}\n"), tokenizer.encode_plain(body)
            ids += header + part
            mask += [0] * len(header) + [1] * len(part)
        ids.append(eot)
        mask.append(1 if role == MODEL else 0)
        ids += newline
        mask += [0] * len(newline)
        text.append(f"{START_OF_TURN}{role}\n{body}{END_OF_TURN}\n")

    if add_generation_prompt:
        header = tokenizer.encode_plain(f"{MODEL}\n")
        ids += [sot] + header
        mask += [0] * (1 + len(header))
        text.append(f"{START_OF_TURN}{MODEL}\n")
    return ChatTokens(ids=ids, mask=mask, text="".join(text))
