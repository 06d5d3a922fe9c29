"""opengemma: an open, complete and fast PyTorch implementation of the Gemma models.

    import opengemma
    g = opengemma.load()                      # the embedded Gemma 3 270M
    g.generate("The capital of France is", max_new_tokens=16)

See README.md for the tour; the modules map onto the Gemma technical report's sections.
The heavy API is imported on first use, so ``import opengemma.config`` stays cheap.
"""

from .config import PRESETS, GemmaConfig
from .errors import OpenGemmaError

__all__ = ["Gemma", "GemmaConfig", "OpenGemmaError", "PRESETS", "load"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Gemma", "load"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'opengemma' has no attribute {name!r}")
