"""A small progress bar for long work (assembling the embedded model, converting checkpoints).

Writes to stderr, redraws at most ~10 times a second, and stays silent when stderr is not a
terminal unless forced, so logs and pipes are not flooded. No dependency beyond the standard library.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, *, unit: str = "MiB", scale: float = 1 / 2**20,
                 enabled: bool | None = None, stream=None):
        self.total, self.desc, self.unit, self.scale = total, desc, unit, scale
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.done = 0
        self._start = time.monotonic()
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        bar = "#" * int(frac * 30)
        rate = self.done * self.scale / max(now - self._start, 1e-6)
        self.stream.write(f"\r{self.desc}: {frac:4.0%} |{bar:<30}| {self.done * self.scale:.0f}/"
                          f"{self.total * self.scale:.0f} {self.unit} ({rate:.0f} {self.unit}/s)")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
