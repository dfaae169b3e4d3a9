"""One study at a time per run folder.

    with RunLock(out):          # refuses while another live process holds ``out``
        ...

The lock is a file ``.mmlens.lock`` created with ``O_EXCL`` (atomic on local and NFS v3+ file
systems) holding the holder's pid, host and start time. A lock whose holder is gone (same host,
pid not alive) is taken over, so a killed run never blocks its own resume.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".mmlens.lock"


class FolderBusyError(RuntimeError):
    """Another live process is running a study in this folder."""


class RunLock:
    """An exclusive lock on a run folder, held from ``__enter__`` to ``__exit__``."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        for _ in range(3):  # a stale lock is removed, then the create is retried
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                if holder is not None and _alive(holder):
                    raise FolderBusyError(
                        f"{self.path.parent} is in use by another mmlens run (pid "
                        f"{holder.get('pid')} on {holder.get('host')}, started "
                        f"{holder.get('started')}): wait for it to finish, or pass another "
                        "--out folder") from None
                try:
                    os.unlink(self.path)  # its holder is gone
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(handle, "w") as file:
                json.dump(me, file)
            self.held = True
            return
        raise FolderBusyError(f"could not lock {self.path.parent}: another process keeps taking "
                              "it; pass another --out folder")

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _read_holder(path: Path) -> dict | None:
    """The holder's record; None while it is still being written or if it is unreadable."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        # Written right after the create: give the holder a moment before calling it stale.
        time.sleep(0.2)
        try:
            holder = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            age = time.time() - path.stat().st_mtime
            return {"pid": "?", "host": "?", "started": f"{age:.0f} s ago", "unreadable": age}
    return holder if isinstance(holder, dict) else None


def _alive(holder: dict) -> bool:
    """Whether the holder may still run: a live pid on this host, or any other host's lock."""
    if "unreadable" in holder:  # a holder killed between creating and writing the file
        return holder["unreadable"] < 30
    if holder.get("host") != socket.gethostname():
        return True  # no way to check another host's processes: trust its lock
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, KeyError, TypeError):
        return True
    return True
