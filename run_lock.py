"""One run per checkpoint folder: a lock file that a second run finds, and that outlives no dead run for long.

Two runs writing one `ckpt_dir` publish, prune and overwrite each other's checkpoints and final model. Rank 0 of a run
therefore creates `<ckpt_dir>/.lock` (exclusively) at start-up, with its host, PID and job id, and touches it every
`HEARTBEAT_S` seconds while it lives. A run that finds the lock refuses to start and names the holder, unless the
holder is gone: its PID no longer exists on this host, or (on another host of a shared filesystem, where PIDs mean
nothing) the lock has not been touched for `STALE_AFTER_S` seconds. Such a stale lock is taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from errors import RecipeError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats: far beyond clock skew or a slow filesystem


class CheckpointDirLockedError(RecipeError, RuntimeError):
    """Another live run holds the checkpoint folder; the message names it and what to do."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    job = f", job {holder['job_id']}" if holder.get("job_id") else ""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"PID {holder.get('pid')} on {holder.get('host')}{job}, started {started}"


class RunLock:
    """The lock of one checkpoint folder, held by this process from `acquire` until `release`."""

    def __init__(self, ckpt_dir: Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S) -> None:
        self.path = Path(ckpt_dir) / LOCK_NAME
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID"),
            "started": time.time(),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def staleness(self, holder: dict[str, Any]) -> str | None:
        """Why the run holding the lock is gone, or None while it may be alive."""
        if holder.get("host") == self.holder["host"] and not _pid_alive(int(holder.get("pid", -1))):
            return "its process no longer exists"
        try:
            silent = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it was just released"
        if silent > self.stale_after_s:
            return (
                f"it has not been refreshed for {silent:.0f} s (a live run refreshes it every {self.heartbeat_s:.0f} s)"
            )
        return None

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # being written, or unreadable: judged by its age alone

    def acquire(self) -> RunLock:
        """Take the lock (or a stale one over); raise `CheckpointDirLockedError` when a live run holds it."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                reason = self.staleness(holder)
                if reason is None:
                    raise CheckpointDirLockedError(
                        f"checkpoint.ckpt_dir={str(self.path.parent)!r} is in use by another run ({describe(holder)}; "
                        f"lock file {self.path}). Two runs on one folder destroy each other's checkpoints: wait for "
                        "it to end, stop it, or give this run another checkpoint.ckpt_dir. If that run is gone (its "
                        f"host died), the lock goes stale {self.stale_after_s:.0f} s after its last refresh, or delete "
                        "the lock file."
                    ) from None
                if self._read() == holder:  # unchanged since it was judged: nobody else took it over meanwhile
                    logger.warning("Taking over the lock of %s: %s (%s).", self.path, reason, describe(holder))
                    self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(self.holder, handle)
            self._thread = threading.Thread(target=self._heartbeat, name="ckpt-dir-lock", daemon=True)
            self._thread.start()
            return self
        raise CheckpointDirLockedError(f"could not take the lock {self.path}: other runs keep taking it.")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.refresh()

    def refresh(self) -> None:
        """Tell other runs this one is alive (the lock file's modification time is its heartbeat)."""
        try:
            os.utime(self.path)
        except OSError as exc:  # the folder went away or became read-only: saving will say so too
            logger.warning("Could not refresh the lock %s: %s.", self.path, exc)

    def release(self) -> None:
        """Stop refreshing and remove the lock, if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._read() == self.holder:
                self.path.unlink(missing_ok=True)
