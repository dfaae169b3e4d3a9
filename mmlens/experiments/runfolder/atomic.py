"""Files that are either the old version or the new one, never a half-written mix.

    write_atomic(out / "run.json", json.dumps(summary))
    write_csv_atomic(frame, out / "flow.csv")
    remove_stale_temporaries(out)    # what killed writers left, once the folder is locked

The new content goes to a temporary file in the same folder (so the rename stays on one file
system), is flushed to disk, and ``os.replace`` swaps it in: a crash at any point leaves the
previous file whole. The file gets the mode a plain ``open`` would give (``0o666`` less the
umask: 0644 under umask 022), not ``mkstemp``'s 0600. Temporary names are
``.{name}.{host}-{pid}.{random}.tmp``, so a later run can tell a dead writer's leftovers from
a live one's.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

TEMPORARY = re.compile(r"^\..+\.(?P<host>[^.]*)-(?P<pid>\d+)\.[^.]+\.tmp$")
STALE_SECONDS = 24 * 3600  # another host's temporary file this old: its writer is gone
_UMASK_LOCK = threading.Lock()
_WRITING: set[str] = set()  # this process's temporary files being written now


def _host() -> str:
    return socket.gethostname().split(".")[0]


def file_mode() -> int:
    """``0o666`` less this process's umask: the mode ``open(path, "w")`` gives a new file."""
    with _UMASK_LOCK:  # reading the umask means setting it: keep other threads out meanwhile
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str | Path, content: str | bytes) -> Path:
    """Replace ``path`` with ``content`` (text is written as UTF-8) in one rename."""
    path = Path(path)
    data = content.encode("utf-8") if isinstance(content, str) else content
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp",
                                         prefix=f".{path.name}.{_host()}-{os.getpid()}.")
    temporary = os.path.abspath(temporary)
    _WRITING.add(temporary)
    try:
        with os.fdopen(handle, "wb") as file:
            os.fchmod(file.fileno(), file_mode())
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    finally:
        _WRITING.discard(temporary)
    return path


def write_csv_atomic(frame: pd.DataFrame, path: str | Path) -> Path:
    """``frame.to_csv(path, index=False)``, atomically."""
    return write_atomic(path, frame.to_csv(index=False))


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files of ``write_atomic`` calls whose process is gone; the paths
    removed. On this host: the pid is not running, or is this process but is not writing it
    (a restarted container's PID 1); from another host: untouched for a day. Files named
    otherwise are never touched."""
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        match = TEMPORARY.match(path.name)
        if match is None:
            continue
        try:
            if match["host"] == _host():
                pid = int(match["pid"])
                # this pid may be ours after a restart (a container's PID 1): ours only if
                # this process is writing it now
                if os.path.abspath(path) in _WRITING or (pid != os.getpid() and _running(pid)):
                    continue
            elif time.time() - path.stat().st_mtime < STALE_SECONDS:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
