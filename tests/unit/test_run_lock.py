"""The run folder's lock: a flock the OS releases when its holder dies, a heartbeat across
hosts, only one's own lock removed, and ``--break-lock`` naming the holder it breaks."""

import json
import multiprocessing
import os
import signal
import socket
import threading
import time

import pytest

from mmlens.cli import main
from mmlens.experiments.runfolder import lock as lock_module
from mmlens.experiments.runfolder.lock import (
    LOCK_NAME,
    STALE_SECONDS,
    FolderBusyError,
    RunLock,
    read_holder,
)
from mmlens.zoo import BUNDLED


def _hold(folder, locked):
    with RunLock(folder):
        locked.set()
        time.sleep(120)


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path``'s lock (forked: no second start-up of torch)."""
    context = multiprocessing.get_context("fork")
    locked = context.Event()
    process = context.Process(target=_hold, args=(tmp_path, locked), daemon=True)
    process.start()
    assert locked.wait(60), "the holder did not take the lock"
    yield process
    process.kill()
    process.join()


def test_a_live_holder_is_named_with_its_lock_file_and_the_way_out(tmp_path, holder):
    with pytest.raises(FolderBusyError) as refused:
        RunLock(tmp_path).acquire()
    message = str(refused.value)
    assert f"pid {holder.pid} on {socket.gethostname()}" in message
    assert f"lock file {tmp_path / LOCK_NAME}" in message
    assert "pass another --out folder" in message and "pass --break-lock" in message


def test_a_holder_killed_with_sigkill_no_longer_blocks(tmp_path, holder):
    with pytest.raises(FolderBusyError):
        RunLock(tmp_path).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    with RunLock(tmp_path) as taken:
        assert read_holder(tmp_path / LOCK_NAME)["token"] == taken.holder["token"]
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_restarted_container_is_not_locked_out(tmp_path):
    """mmlens is PID 1 again after a restart: the old record names a live pid (ours), but no
    process holds the flock any more."""
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": "before the restart",
         "heartbeat": time.time()}))
    with RunLock(tmp_path) as taken:
        assert taken.held and read_holder(tmp_path / LOCK_NAME)["started"] != "before the restart"


def test_a_lock_from_another_host_goes_by_its_heartbeat(tmp_path):
    """Where flock does not reach across hosts, a recent heartbeat keeps the folder locked and
    an old one (the job was requeued elsewhere) lets the new host in."""
    record = {"pid": 4242, "host": "node-7", "started": "earlier", "heartbeat": time.time() - 5}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(FolderBusyError, match=r"pid 4242 on node-7, .*last heartbeat 5 s ago"):
        RunLock(tmp_path).acquire()
    record["heartbeat"] = time.time() - STALE_SECONDS - 1
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with RunLock(tmp_path) as taken:
        assert read_holder(tmp_path / LOCK_NAME)["host"] == taken.holder["host"]


def test_the_holder_keeps_its_heartbeat_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.05)
    with RunLock(tmp_path):
        first = read_holder(tmp_path / LOCK_NAME)["heartbeat"]
        deadline = time.time() + 10
        while read_holder(tmp_path / LOCK_NAME)["heartbeat"] == first:
            assert time.time() < deadline, "no heartbeat written"
            time.sleep(0.02)


@pytest.mark.filterwarnings("ignore:breaking the lock")
def test_two_concurrent_breakers_cannot_both_win(tmp_path, monkeypatch):
    breakers = 8
    real_read = lock_module.read_holder
    for _ in range(3):
        first = RunLock(tmp_path)
        first.acquire()
        start = threading.Barrier(breakers)
        seen = threading.local()

        def read_then_wait(path, start=start, seen=seen):
            holder = real_read(path)
            if not getattr(seen, "done", False):  # every breaker has read the holder
                seen.done = True
                start.wait()
            return holder

        monkeypatch.setattr(lock_module, "read_holder", read_then_wait)
        won, refused = [], []

        def breaker(won=won, refused=refused):
            attempt = RunLock(tmp_path, break_lock=True)
            try:
                attempt.acquire()
                won.append(attempt)
            except FolderBusyError as err:
                refused.append(str(err))

        threads = [threading.Thread(target=breaker) for _ in range(breakers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        monkeypatch.setattr(lock_module, "read_holder", real_read)
        assert len(won) == 1 and len(refused) == breakers - 1, refused
        assert all("changed hands while breaking it" in message for message in refused)
        assert read_holder(tmp_path / LOCK_NAME)["token"] == won[0].holder["token"]
        first.release()
        won[0].release()


def test_on_exit_a_run_leaves_another_runs_lock_alone(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.warns(UserWarning, match=rf"breaking the lock .* of pid {os.getpid()} on "):
        second = RunLock(tmp_path, break_lock=True)
        second.acquire()
    first.release()  # its lock was broken: the file is the second run's now
    assert read_holder(tmp_path / LOCK_NAME)["token"] == second.holder["token"]
    with pytest.raises(FolderBusyError):
        RunLock(tmp_path).acquire()
    second.release()
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.skipif(not (BUNDLED["shapes-llava"] / "config.json").is_file(),
                    reason="shapes-llava is not bundled here")
def test_break_lock_on_the_command_line_names_the_holder(tmp_path, holder, capsys):
    run = ["flow", "--per-task", "1", "--tasks", "ChooseAttr", "--quiet", "--out", str(tmp_path)]
    assert main(run) == 2
    err = capsys.readouterr().err
    assert f"lock file {tmp_path / LOCK_NAME}" in err and "pass --break-lock" in err
    with pytest.warns(UserWarning, match=rf"breaking the lock .*\.mmlens\.lock of pid "
                                         rf"{holder.pid} on {socket.gethostname()}, started"):
        assert main([*run, "--break-lock"]) == 0
