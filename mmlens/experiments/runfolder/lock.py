"""One study at a time per run folder.

    with RunLock(out):                    # refuses while another run holds ``out``
        ...
    with RunLock(out, break_lock=True):   # takes the lock from a holder known to be gone
        ...

The lock is ``fcntl.flock`` on the file ``.mmlens.lock`` in the folder: the operating system
releases it when its holder dies, however it dies, so a killed run, or a restarted container
whose run is PID 1 again, never blocks its own resume. The file holds the holder's host, pid,
start time and a heartbeat rewritten every ``HEARTBEAT_SECONDS``. Where the file system does
not carry flock locks between hosts, a lock held on another host is judged by its heartbeat:
older than ``STALE_SECONDS``, its holder is gone (a job requeued on another node takes over).

A run removes the lock file on exit only while it is still its own (the same file it locked),
never a lock another run took since. ``break_lock`` (``--break-lock``) takes over a lock whose
holder is still registered, naming it; breakers go one at a time under a second flock, and each
breaks only the holder it read, so two breakers cannot both win.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from mmlens.experiments.runfolder.atomic import file_mode, remove_stale_temporaries

LOCK_NAME = ".mmlens.lock"
BREAK_NAME = ".mmlens.lock.break"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0


class FolderBusyError(RuntimeError):
    """Another live process is running a study in this folder."""


class RunLock:
    """An exclusive lock on a run folder, held from ``__enter__`` to ``__exit__``."""

    def __init__(self, folder: str | Path, *, break_lock: bool = False):
        self.path = Path(folder) / LOCK_NAME
        self.break_lock = break_lock
        self.held = False
        self.holder: dict[str, Any] = {}
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(5):  # the file was replaced between open and flock: open it again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
            if not _flock(fd, self.path):
                os.close(fd)
                holder = read_holder(self.path)
                if self.break_lock:
                    self._break(holder)
                    return
                raise FolderBusyError(busy_message(self.path, holder))
            if not _same_file(fd, self.path):
                os.close(fd)
                continue
            holder = _parse(os.pread(fd, 4096, 0))
            if holder is not None and _elsewhere_and_alive(holder) and not self.break_lock:
                os.close(fd)
                raise FolderBusyError(busy_message(self.path, holder, flock_local=True))
            if holder is not None and self.break_lock:
                _announce(self.path, holder)
            self._take(fd)
            return
        raise FolderBusyError(f"could not lock {self.path}: other processes keep replacing it; "
                              "pass another --out folder")

    def release(self) -> None:
        """Give the lock back; the file is removed only while it is still the one we lock."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if _same_file(self._fd, self.path):
            try:
                os.unlink(self.path)  # while still locked: nobody else holds this file
            except FileNotFoundError:
                pass
        os.close(self._fd)
        self._fd = None

    def _take(self, fd: int) -> None:
        now = time.time()
        self._fd, self.held = fd, True
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now)),
                       "heartbeat": now, "token": uuid.uuid4().hex}
        _write(fd, self.holder)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                      name=f"mmlens lock {self.path.parent}")
        self._beat.start()
        remove_stale_temporaries(self.path.parent)  # left by runs killed while writing

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self.holder["heartbeat"] = time.time()
            with contextlib.suppress(OSError):  # a full disk: the next beat tries again
                _write(self._fd, self.holder)

    def _break(self, holder: dict[str, Any] | None) -> None:
        """Take the lock from ``holder``, if it still holds it: one breaker at a time."""
        guard = os.open(self.path.with_name(BREAK_NAME), os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            now = read_holder(self.path)
            if _token(now) != _token(holder):
                raise FolderBusyError(f"the lock {self.path} changed hands while breaking it: "
                                      f"{_describe(now)} holds it now; it is not broken")
            _announce(self.path, holder)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, file_mode())
            except FileExistsError:
                raise FolderBusyError(busy_message(self.path, read_holder(self.path))) from None
            if not _flock(fd, self.path) or not _same_file(fd, self.path):
                os.close(fd)
                raise FolderBusyError(busy_message(self.path, read_holder(self.path)))
            self._take(fd)
        finally:
            os.close(guard)


def read_holder(path: str | Path) -> dict[str, Any] | None:
    """What the lock file says of its holder; None when it is missing or unreadable."""
    try:
        return _parse(Path(path).read_bytes())
    except OSError:
        return None


def busy_message(path: Path, holder: dict[str, Any] | None, flock_local: bool = False) -> str:
    """Who holds the lock file ``path`` and the ways out."""
    why = (" (the file system does not share flock locks between hosts, so its heartbeat "
           f"decides: it is stale after {STALE_SECONDS:.0f} s)") if flock_local else ""
    return (f"{path.parent} is in use by another mmlens run ({_describe(holder)}; lock file "
            f"{path}){why}: wait for it to finish, or pass another --out folder; if that run is "
            "gone (killed, or its host shut down), pass --break-lock to take the lock over")


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "a process that left no record"
    beat = holder.get("heartbeat")
    age = f", last heartbeat {time.time() - beat:.0f} s ago" if isinstance(
        beat, (int, float)) else ""
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started "
            f"{holder.get('started')}{age}")


def _announce(path: Path, holder: dict[str, Any] | None) -> None:
    warnings.warn(f"breaking the lock {path} of {_describe(holder)}", stacklevel=4)


def _token(holder: dict[str, Any] | None) -> Any:
    return None if holder is None else holder.get("token", json.dumps(holder, sort_keys=True))


def _parse(data: bytes) -> dict[str, Any] | None:
    try:  # a shorter record written over a longer one may leave bytes after the JSON
        holder, _ = json.JSONDecoder().raw_decode(data.decode("utf-8", "replace").lstrip())
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _write(fd: int, holder: dict[str, Any]) -> None:
    data = json.dumps(holder).encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    os.fsync(fd)


def _flock(fd: int, path: Path) -> bool:
    """Take the flock without waiting; False when another holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        os.close(fd)
        raise FolderBusyError(f"cannot lock {path}: this file system does not support flock "
                              f"({err.strerror}); pass an --out folder on a local disk") from err
    return True


def _same_file(fd: int | None, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed or replaced)."""
    if fd is None:
        return False
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _elsewhere_and_alive(holder: dict[str, Any]) -> bool:
    """A holder on another host whose heartbeat is recent: its flock may not be visible here.
    On this host the flock is the whole truth (an unlocked file's holder is gone)."""
    if holder.get("host") == socket.gethostname():
        return False
    beat = holder.get("heartbeat")
    return isinstance(beat, (int, float)) and time.time() - beat < STALE_SECONDS
