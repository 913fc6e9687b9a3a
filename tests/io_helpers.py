"""Test helpers for write failures: a simulated full disk (ENOSPC) and a read-only folder."""

from __future__ import annotations

import contextlib
import errno
import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import dida.io_safety


class _FullDiskFile(io.RawIOBase):
    """A raw file that accepts `room` bytes, then fails as a full disk does (ENOSPC)."""

    def __init__(self, path: Path, room: int) -> None:
        self._raw = open(path, "wb", buffering=0)  # noqa: SIM115
        self._room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # noqa: ANN001
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._raw.write(data)

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        self._raw.close()
        super().close()


def fill_disk(monkeypatch: pytest.MonkeyPatch, room: int = 64) -> None:
    """From now on every atomic write of dida fails with ENOSPC after `room` bytes."""
    monkeypatch.setattr(dida.io_safety, "_open_for_write", lambda p: _FullDiskFile(p, room))


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A real tmpfs at `path` (e.g. 'ro' or 'size=64k'); skips the test where mounting is denied."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
