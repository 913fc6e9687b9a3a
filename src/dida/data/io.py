"""Image and label file I/O: OpenCV decode, the three label formats, no-overwrite writes.

Every read failure raises `DataError` with a one-line message naming the file. OpenCV is used for
decoding because it was measured faster than PIL on 1914x1052 PNGs (see benchmarks/data_speed.py);
PIL is used only where it is required (palette indices: GTA labels, palette label PNGs).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np

from dida.data.labels import IGNORE_INDEX
from dida.errors import DataError

_capture: tuple[int, int] | None = None  # (pid, file descriptor of an unlinked temporary file)


@contextlib.contextmanager
def _c_messages_as_warnings(path: str | Path) -> Iterator[None]:
    """What C libraries write straight to file descriptor 2 meanwhile (libpng: "libpng error:
    IDAT: CRC error", "libpng warning: iCCP: ...") becomes a Python warning naming `path`, which
    the CLI sends to the run's log instead of the console."""
    global _capture
    try:
        if _capture is None or _capture[0] != os.getpid():  # one file per (forked) process
            fd, name = tempfile.mkstemp(prefix="dida-stderr-")
            os.unlink(name)
            _capture = (os.getpid(), fd)
        capture = _capture[1]
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no file descriptor 2 or no temporary folder: leave as is
        yield
        return
    os.dup2(capture, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    size = os.lseek(capture, 0, os.SEEK_CUR)
    if size:
        os.lseek(capture, 0, os.SEEK_SET)
        text = os.read(capture, size).decode(errors="replace").strip()
        os.lseek(capture, 0, os.SEEK_SET)
        os.ftruncate(capture, 0)
        if text:
            warnings.warn(f"{path}: {' / '.join(text.splitlines())}", RuntimeWarning, stacklevel=3)


def _file_bytes(path: str | Path) -> np.ndarray:
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    return np.fromfile(str(path), dtype=np.uint8)


def read_unchanged(path: str | Path, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """Decode an image file with OpenCV (default: unchanged depth and channels, BGR order)."""
    return _decode(_file_bytes(path), flags, path)


def _decode(data: np.ndarray, flags: int, path: str | Path) -> np.ndarray:
    """OpenCV's decode of a file's bytes `data`; errors and C library messages name `path`."""
    array = None
    if data.size:
        with _c_messages_as_warnings(path):
            array = cv2.imdecode(data, flags)
    if array is None:
        raise DataError(f"{path}: cannot decode image (corrupt or not an image file)")
    return array


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{path}: cannot read image header: {err}") from None
    return height, width


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8.

    Shapes:
        returns: [H, W, 3] uint8, RGB order.
    """
    bgr = read_unchanged(path, cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_palette_png(data: np.ndarray) -> bool:
    """Whether a file's bytes `data` are a PNG of palette indices (IHDR colour type 3)."""
    head = data[:26].tobytes()
    return (
        len(head) == 26 and head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" and head[25] == 3
    )


def read_label(path: str | Path, num_classes: int | None = None) -> np.ndarray:
    """Read a single-channel uint8 trainId label map (255 = ignore); with `num_classes`, check
    that every value is a class index or 255 (`check_label_values`).

    A palette PNG gives its indices, as mmseg's label loading does (OpenCV would give the
    palette's colours): labels saved with class colours, e.g. `dida predict`'s colour PNGs.

    Shapes:
        returns: [H, W] uint8.
    """
    data = _file_bytes(path)  # read once, decoded by PIL or OpenCV
    if _is_palette_png(data):
        label = read_palette_indices(path, data)
    else:
        label = _decode(data, cv2.IMREAD_UNCHANGED, path)
        if label.ndim != 2 or label.dtype != np.uint8:
            raise DataError(
                f"{path}: expected a single-channel 8-bit trainId label, got shape {label.shape} "
                f"dtype {label.dtype}"
            )
    if num_classes is not None:
        check_label_values(label, num_classes, path)
    return label


def check_label_values(label: np.ndarray, num_classes: int, path: str | Path) -> None:
    """Raise a `DataError` naming `path` when a label value is neither a class index below
    `num_classes` nor the ignore index 255 (the loss and the metrics would fail on it later, far
    from the file).

    Shapes: label: [H, W] uint8
    """
    if label.size == 0 or num_classes >= IGNORE_INDEX:
        return
    # OpenCV's range test: 0.14 ms on a GTA-sized label, against 2.5 for np.bincount
    if cv2.countNonZero(cv2.inRange(label, num_classes, IGNORE_INDEX - 1)):
        bad = np.unique(label[(label >= num_classes) & (label != IGNORE_INDEX)])
        shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
        raise DataError(
            f"{path}: has label values {shown}; expected the indices 0..{num_classes - 1} of "
            f"the dataset's {num_classes} classes, or {IGNORE_INDEX} (ignore)"
        )


def read_palette_indices(path: str | Path, data: np.ndarray | None = None) -> np.ndarray:
    """Read the palette indices of a 'P' (or 'L') PNG, as GTA labels store Cityscapes labelIds
    (from the file's bytes `data` when they were read already).

    Shapes:
        returns: [H, W] uint8.
    """
    from PIL import Image

    try:
        with Image.open(path if data is None else BytesIO(data.tobytes())) as image:
            image.load()
            mode = image.mode
            indices = np.array(image)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as err:  # PIL raises many types for broken files
        raise DataError(f"{path}: cannot decode label PNG ({type(err).__name__})") from None
    if mode not in ("P", "L"):
        raise DataError(f"{path}: expected a palette ('P') label PNG, got mode '{mode}'")
    return indices


def read_synthia_ids(path: str | Path) -> np.ndarray:
    """Read a SYNTHIA 16-bit label PNG and return the class ids (the file's first, R channel).

    PIL would silently reduce 16-bit RGB to 8 bits, so OpenCV is used; its BGR order puts the
    file's R channel last.

    Shapes:
        returns: [H, W] uint16.
    """
    label = read_unchanged(path, cv2.IMREAD_UNCHANGED)
    if label.dtype != np.uint16:
        raise DataError(
            f"{path}: expected a 16-bit SYNTHIA label PNG, got {label.dtype} "
            "(8-bit copies lose the class ids)"
        )
    return label[..., -1] if label.ndim == 3 else label


def encode_png(array: np.ndarray) -> bytes:
    """PNG-encode a uint8 [H, W] (grayscale) or [H, W, 3] (RGB) array."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise DataError(f"cannot PNG-encode an array of shape {array.shape}")
    return buf.tobytes()


def write_new_file(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file; never replaces an existing file.

    Raises:
        DataError: the folder is not writable or `path` appeared meanwhile.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
    except OSError as err:
        raise DataError(f"{path}: cannot write ({err.strerror or err})") from None
    try:
        os.link(tmp, path)  # fails if `path` exists: no overwrite, even in a race
    except FileExistsError:
        raise DataError(f"{path}: exists already, not overwritten") from None
    except OSError:  # filesystems without hard links
        if path.exists():
            raise DataError(f"{path}: exists already, not overwritten") from None
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
