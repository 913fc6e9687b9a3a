"""Ownership of a run directory: one writer at a time, and no silent restart over an old run.

`claim_run_dir(run_dir, resume)` refuses a folder that already holds a run unless the training
resumes it, and takes `run.lock` for the run's lifetime: an exclusive `flock` (released by the
kernel when the process dies, so a lock left by a killed process is stale and taken over) plus
the owner's pid and host in the file, for the error message of a second writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from dida.errors import UserError

LOCK_NAME = "run.lock"
log = logging.getLogger("dida.train")


class RunDirError(UserError):
    """The run directory holds another run, or another process is writing it."""


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` already holds (part of) a training run."""
    if not run_dir.is_dir():
        return False
    markers = ("latest.pth", "train.log", "metrics.jsonl")
    if any((run_dir / name).exists() for name in markers):
        return True
    return any(run_dir.glob("iter_*.pth")) or any(run_dir.glob("*.json"))


class RunLock:
    """An exclusive lock on `run_dir/run.lock`, held until `release()`."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            owner = self._owner()
            who = f"process {owner.get('pid', '?')} on {owner.get('host', '?')}" if owner else ""
            raise RunDirError(
                f"{self.path.parent}: another training ({who or 'another process'}) is writing "
                f"this run (lock {self.path}); wait for it or choose another --work-dir"
            ) from None
        previous = self._owner()
        if previous and previous.get("pid") != os.getpid():
            log.warning(
                "%s: took over the stale lock of process %s (no longer running)",
                self.path, previous.get("pid"),
            )  # fmt: skip
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd
        return self

    def _owner(self) -> dict:
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.path.read_text() or "{}")
            return data if isinstance(data, dict) else {}
        return {}

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def claim_run_dir(run_dir: Path, resume: str | None) -> RunLock:
    """Create `run_dir`, lock it, and refuse an existing run unless `resume` is given."""
    from dida.io_safety import check_writable_dir

    check_writable_dir(run_dir, what="run directory")
    lock = RunLock(run_dir).acquire()
    if resume is None and holds_run(run_dir):
        lock.release()
        raise RunDirError(
            f"{run_dir}: already holds a training run; continue it with --resume {run_dir}, "
            "or choose another --work-dir (nothing was changed)"
        )
    return lock
