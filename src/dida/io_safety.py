"""Safe writing of files the user names: nothing existing is replaced by accident, nothing is
written in place, and every write failure is one line that says what went wrong.

Used by every command that writes a user-named file (`dida weights convert`, `dida bank`,
`dida test --out`, `dida demo`, ...) and by the training checkpoints:

    out = check_output(args.output, inputs=[args.source], overwrite=args.overwrite,
                       suffixes=(".pt", ".safetensors"), what="bank file")
    atomic_write(out, lambda f: torch.save(obj, f), what="bank file")

`check_output` runs before any long work (existing output without `--overwrite`, output equal to
an input, unsupported extension, folder that cannot be written); `atomic_write` writes a temporary
file beside the target, fsyncs and renames it over the target, so a failure (disk full, read-only
file system) leaves the previous file untouched and no partial file behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from dida.errors import UserError

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a parent of it is a file, not a folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "it is a folder",
    errno.ENOENT: "its folder does not exist",
    errno.ENAMETOOLONG: "file name too long",
    errno.EFBIG: "file too large for this file system",
}


class WriteError(UserError, OSError):
    """A file could not be written; the message names the file and the reason in one line."""


def os_error_reason(err: OSError) -> str:
    """A short reason for an OSError: 'no space left on device', 'read-only file system', ..."""
    if err.errno in _REASONS:
        return _REASONS[err.errno]
    return (err.strerror or str(err) or type(err).__name__).splitlines()[0].lower()


def write_error(err: OSError, path: str | Path, what: str = "file") -> WriteError:
    """The one-line error for a failed write of `path`."""
    return WriteError(f"{path}: cannot write {what}: {os_error_reason(err)}")


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_writable_dir(
    folder: str | Path, what: str = "output folder", create: bool = True
) -> Path:
    """Make sure files can be created in `folder` (created when `create`); one-line errors.

    A probe file is created and removed, so read-only file systems and missing permissions are
    found before any long work starts.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise WriteError(f"{folder}: {what} is a file, not a folder")
    probe_dir = folder
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(err, folder, what) from None
    else:
        while not probe_dir.exists() and probe_dir != probe_dir.parent:
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            raise WriteError(f"{folder}: cannot write {what}: {probe_dir} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".dida-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise write_error(err, folder, what) from None
    return folder


def check_output(
    path: str | Path,
    *,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    suffixes: Iterable[str] | None = None,
    what: str = "output",
) -> Path:
    """Validate a user-named output file before any work is done; returns it as a Path.

    Refuses (one-line `WriteError`): an extension not in `suffixes`, a folder, the same file as
    one of `inputs`, an existing file unless `overwrite`, a parent that cannot be written.
    """
    path = Path(path)
    if suffixes is not None:
        suffixes = tuple(suffixes)
        if path.suffix.lower() not in suffixes:
            raise WriteError(f"{path}: {what} must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise WriteError(f"{path}: {what} is a folder; give a file name")
    for item in inputs:
        if _same_file(path, Path(item)):
            raise WriteError(f"{path}: {what} is the input {item}; choose another output name")
    if path.exists() and not overwrite:
        raise WriteError(f"{path}: exists; pass --overwrite to replace it")
    check_writable_dir(path.parent, what=f"folder of the {what}", create=False)
    return path


def _temp_name(path: Path) -> Path:
    """A hidden temporary name beside `path` that keeps its extension (image writers need it)."""
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_output(path: str | Path, what: str = "file") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`.

    OSErrors (also of the caller's writing) become one-line `WriteError`s; the temporary file is
    always removed, and `path` is left as it was on any failure.
    """
    path = Path(path)
    tmp = _temp_name(path)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            os.replace(tmp, path)
        except WriteError:
            raise
        except OSError as err:
            raise write_error(err, path, what) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


class _RecordingWriter:
    """A file wrapper that remembers the first OSError of a write.

    Some writers (torch.save's zip writer) turn an OSError of the stream into an unrelated
    RuntimeError ("unexpected pos ..."); the recorded error is raised instead.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str):  # noqa: ANN204  (tell, seek, fileno, ...)
        return getattr(self._file, name)


def _open_for_write(path: Path) -> IO[bytes]:
    """Open a temporary file for writing (a separate function so tests can fill the disk)."""
    return open(path, "wb")  # noqa: SIM115


def atomic_write(
    path: str | Path, data: bytes | str | Callable[[IO[bytes]], None], what: str = "file"
) -> None:
    """Write `data` (bytes, text, or a function writing to a binary file) to `path` atomically.

    Raises `WriteError` with the reason ('no space left on device', 'read-only file system', ...);
    an existing `path` is then unchanged.
    """
    with atomic_output(path, what) as tmp:
        with _open_for_write(tmp) as raw:
            stream = _RecordingWriter(raw)
            try:
                if callable(data):
                    data(stream)  # type: ignore[arg-type]
                else:
                    stream.write(data.encode() if isinstance(data, str) else data)
                stream.flush()
                os.fsync(raw.fileno())
            except Exception:
                if stream.error is not None:
                    raise stream.error from None
                raise
