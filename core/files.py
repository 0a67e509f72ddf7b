"""Crash-safe file writes shared by every part that keeps state on disk (run status, privacy ledgers).

A reader (a resumed run, a sweep, `fedlora privacy report`) must never see half a file: each write
goes to a temporary file in the same folder, is flushed to disk, then renamed over the target, so
a crash leaves the old content or the new one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_text_atomic"]


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Replace `path` with `text` atomically (its folder is created if needed).

    The temporary file is named `.<name>.<random>.tmp`: readers that list a folder skip names
    starting with a dot.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
