"""User-facing errors.

Every problem caused by the user's input (a missing file, a corrupt checkpoint, an unknown
preset, an over-long prompt, ...) is raised as :class:`OpenGemmaError`. The CLI catches exactly
this class and prints its message as one line on stderr with a non-zero exit status; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class OpenGemmaError(Exception):
    """A clear, one-line problem with the user's input or files."""
