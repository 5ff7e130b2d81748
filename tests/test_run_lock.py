"""One run per checkpoint folder: the lock refuses a live holder and takes over a dead or silent one."""

import json
import os
import subprocess
import sys

import pytest

from run_lock import LOCK_NAME, CheckpointDirLockedError, RunLock


def test_a_second_run_is_refused_and_told_who_holds_the_folder(tmp_path):
    first = RunLock(tmp_path).acquire()
    try:
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"]
        with pytest.raises(CheckpointDirLockedError, match=rf"is in use by another run \(PID {os.getpid()} on "):
            RunLock(tmp_path).acquire()
    finally:
        first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock(tmp_path).acquire().release()  # free again


def test_the_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = RunLock(tmp_path).holder | {"pid": int(dead.stdout)}
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    with caplog.at_level("WARNING"):
        lock = RunLock(tmp_path).acquire()
    assert "its process no longer exists" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_from_another_host_goes_stale_without_heartbeats(tmp_path, caplog):
    other = {"host": "gpu-node-17", "pid": 1, "job_id": "4242", "started": 0.0}
    (tmp_path / LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(CheckpointDirLockedError, match=r"PID 1 on gpu-node-17, job 4242"):
        RunLock(tmp_path).acquire()  # just written: its run may be alive
    old = (tmp_path / LOCK_NAME).stat().st_mtime - 301
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with caplog.at_level("WARNING"):
        RunLock(tmp_path).acquire().release()
    assert "has not been refreshed for 30" in caplog.text


def test_the_holder_refreshes_its_lock(tmp_path):
    lock = RunLock(tmp_path).acquire()
    try:
        path = tmp_path / LOCK_NAME
        os.utime(path, (0, 0))  # as if the heartbeat had stopped long ago (a frozen run, or its PID reused)
        assert "has not been refreshed" in lock.staleness(json.loads(path.read_text()))
        lock.refresh()  # what the heartbeat thread does every HEARTBEAT_S seconds
        assert path.stat().st_mtime > 1e9 and lock.staleness(json.loads(path.read_text())) is None
        assert lock._thread is not None and lock._thread.is_alive()
    finally:
        lock.release()
    assert lock._thread is None and not (tmp_path / LOCK_NAME).exists()
