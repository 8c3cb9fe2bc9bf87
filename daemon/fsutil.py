"""Small file-system helpers shared by the CSV report and the daemon's heartbeat."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, *, fsync: bool = True, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: a temp file beside it, then a rename, so a reader
    sees the old content or the new, never a part. Raises OSError; no temp file is left.
    ``fsync=False`` for files that are only a cache (a lost update costs nothing)."""
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
