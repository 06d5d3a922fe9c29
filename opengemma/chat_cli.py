"""``opengemma chat``: the interactive multi-turn chat over the one chat formatter (report
Tables 3-4): streaming replies, line editing and history (readline), Ctrl-C that stops a reply and
keeps the session; piped input behaves as every other verb. Split from :mod:`opengemma.cli`,
which owns the parser and the shared loading and sampling options.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .checkpoints.cache import base_dir
from .cli import _load, _new_stats, _one_line, _sampling
from .errors import OpenGemmaError


def _chat_history_file() -> Path | None:
    """Where the REPL keeps its input history: $OPENGEMMA_CHAT_HISTORY (empty: nowhere), else
    chat_history in opengemma's cache directory."""
    if "OPENGEMMA_CHAT_HISTORY" in os.environ:
        return Path(os.environ["OPENGEMMA_CHAT_HISTORY"]) if os.environ["OPENGEMMA_CHAT_HISTORY"] else None
    return base_dir() / "chat_history"


def _line_editing():
    """Turn on readline for input() (arrow keys, Ctrl-R, history across sessions) where the
    platform has it; returns a function that saves the history, or None."""
    try:
        import readline
    except ImportError:  # e.g. Windows without a readline port: plain input()
        return None
    path = _chat_history_file()
    readline.set_history_length(1000)
    if path is None:
        return None
    try:
        readline.read_history_file(path)
    except OSError:  # none yet, or unreadable: start empty
        pass

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
            os.chmod(path, 0o600)  # what was typed into a chat is private
        except OSError:
            pass

    return save


def run_chat(args) -> int:
    g = _load(args)
    interactive = sys.stdin.isatty()
    save_history = _line_editing() if interactive else None
    try:
        return _repl(g, args, interactive)
    finally:
        if save_history is not None:
            save_history()


def _repl(g, args, interactive: bool) -> int:
    """The chat loop. Interactive (a terminal): Ctrl-C during a reply stops that reply, whose
    text so far stays in the history as the model's turn (dropped with the user's turn if
    nothing came yet); Ctrl-C at the prompt asks for a second one, which quits; an error in one
    turn (a conversation grown past the context) is reported and the session goes on. Piped
    input: errors and Ctrl-C end the program as in every other verb."""
    if interactive:
        print(f"Chatting with {g.name}. /reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply.",
              file=sys.stderr)
        if args.model is None and not getattr(args, "adapter", None):
            print("Note: the embedded model is pretrained, not instruction-tuned: its replies ramble and may "
                  "not end by themselves (-n caps them). --adapter default adds the shipped chat adapter, "
                  "whose turns mostly end.", file=sys.stderr)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    base = len(history)
    quitting = False  # the last input was a Ctrl-C at the prompt
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            if not interactive or quitting:
                print(file=sys.stderr)
                return 0 if interactive else 130
            quitting = True
            print("\n(Ctrl-C again, Ctrl-D or /exit quits)", file=sys.stderr)
            continue
        quitting = False
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            del history[base:]
            print("(history cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": line})
        if interactive:
            sys.stdout.write("gemma> ")
            sys.stdout.flush()
        reply: list[str] = []
        stats = _new_stats(args)
        try:
            for piece in g.chat(history, stream=True, **_sampling(args, g, stats)):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            if not interactive:
                raise
            kept = "kept in the history" if "".join(reply).strip() else "nothing to keep"
            print(f"\n(reply stopped: {kept})", file=sys.stderr, end="")
        except OpenGemmaError as e:
            if not interactive:
                raise
            history.pop()
            print(f"\nopengemma: error: {_one_line(e)} (/reset starts over)", file=sys.stderr, end="")
            reply = None
        sys.stdout.write("\n")
        sys.stdout.flush()
        if stats is not None and reply is not None:
            print(stats.summary(), file=sys.stderr)
        if reply is None:
            continue
        if "".join(reply).strip():
            history.append({"role": "model", "content": "".join(reply)})
        else:  # no text to answer with: forget the question too, so turns keep alternating
            history.pop()
