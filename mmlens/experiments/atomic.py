"""Files that are either the old version or the new one, never a half-written mix.

    write_atomic(out / "run.json", json.dumps(summary))
    write_csv_atomic(frame, out / "flow.csv")

The new content goes to a temporary file in the same folder (so the rename stays on one file
system), is flushed to disk, and ``os.replace`` swaps it in: a crash at any point leaves the
previous file whole. Temporary names start with ``.`` and end with ``.tmp``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pandas as pd


def write_atomic(path: str | Path, content: str | bytes) -> Path:
    """Replace ``path`` with ``content`` (text is written as UTF-8) in one rename."""
    path = Path(path)
    data = content.encode("utf-8") if isinstance(content, str) else content
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path


def write_csv_atomic(frame: pd.DataFrame, path: str | Path) -> Path:
    """``frame.to_csv(path, index=False)``, atomically."""
    return write_atomic(path, frame.to_csv(index=False))
