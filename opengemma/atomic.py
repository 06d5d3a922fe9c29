"""All-or-nothing files: checkpoints, data shards, manifests and run records are written to a
hidden temp file in the same folder, fsynced and renamed over the target, so a killed process
leaves either the old file or the new one, never half of one (the robustness bar of every
command that writes). Torch-free on purpose: data workers import it without paying for torch.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path


def new_temp_file(path) -> tuple[str, int]:
    """An empty, new hidden file next to ``path``, and its mode. Made with ``os.open(..., 0o666)``
    rather than ``mkstemp`` (always 0600), so the kernel applies the umask as for any new file:
    outputs are ordinary files that other users may read where the umask says so."""
    path = Path(path)
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, os.fstat(fd).st_mode & 0o777
        finally:
            os.close(fd)
    raise FileExistsError(f"no free temporary name next to {path}")


def fsync_dir(folder) -> None:
    """Make a rename in ``folder`` durable (a machine crash, not only a killed process)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Create ``path`` all-or-nothing: ``write(tmp)`` fills a temp file in the same directory,
    which is fsynced and renamed over ``path``; on any error the temp file is removed."""
    path = Path(path)
    tmp, mode = new_temp_file(path)
    try:
        write(tmp)
        # A writer may replace the file (safetensors' save_file leaves it 0600): give the result
        # the mode an ordinary new file gets, 0666 less the umask (0644 under the usual 022).
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    """:func:`atomic_write` of a byte string."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)
