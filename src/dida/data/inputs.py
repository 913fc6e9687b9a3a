"""Inputs of `dida predict`: image files, folders (recursive), globs and videos, read for inference.

Every image goes through the test pipeline of `dida test` (`read_image`, keep-ratio resize to the
test scale, normalisation), so predictions match it exactly. Grayscale, alpha and 16-bit images
are converted as OpenCV's colour decode does, with a note saying so; a file that cannot be decoded
becomes an item with an `error` message instead of stopping the run.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torch.utils.data import Dataset, IterableDataset

from dida.data.io import read_image
from dida.data.transforms import eval_pipeline
from dida.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")
_GLOB_CHARS = "*?["
# PIL modes whose colour decode changes the pixels, and what the note says about them
_MODE_NOTES = {
    "1": "1-bit, converted to RGB",
    "L": "grayscale, converted to RGB",
    "LA": "grayscale with alpha, alpha dropped",
    "I": "32-bit grayscale, converted to 8-bit RGB",
    "I;16": "16-bit grayscale, converted to 8-bit RGB",
    "I;16B": "16-bit grayscale, converted to 8-bit RGB",
    "RGBA": "RGBA, alpha dropped",
    "PA": "palette with alpha, alpha dropped",
    "CMYK": "CMYK, converted to RGB",
}


@dataclass(frozen=True)
class InputFile:
    """One image or video to predict and where its outputs go, relative to the output folder."""

    path: Path
    rel: Path
    is_video: bool


def _media(paths: Sequence[Path], skip: Callable[[Path], bool] | None) -> list[Path]:
    suffixes = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    found = []
    for path in paths:
        if path.suffix.lower() in suffixes and path.is_file() and not (skip and skip(path)):
            found.append(path)
    return sorted(found)


def _glob_base(pattern: str) -> Path:
    """The folder part of `pattern` before its first wildcard (`data/**/*.png` -> `data`)."""
    fixed = []
    for part in Path(pattern).parts:
        if set(part) & set(_GLOB_CHARS):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def collect_inputs(
    inputs: Sequence[str], skip: Callable[[Path], bool] | None = None
) -> list[InputFile]:
    """Expand files, folders (recursively), and globs into images and videos.

    An output keeps its input's path relative to the folder (or the glob's fixed part); with
    several inputs, a folder's or glob's files go under a sub-folder named after it. Files of
    folders and globs for which `skip` is true (earlier outputs) are left out, and a file named
    twice is taken once.

    Raises:
        DataError: an input that does not exist, or a folder or glob without images or videos.
    """
    several = len(inputs) > 1
    entries: dict[Path, InputFile] = {}
    for item in inputs:
        path = Path(item)
        if path.is_file():
            pairs = [(path, Path(path.name))]
        else:
            if path.is_dir():
                base, found = path, _media(list(path.rglob("*")), skip)
            elif set(item) & set(_GLOB_CHARS):
                base = _glob_base(item)
                found = _media([Path(p) for p in glob.glob(item, recursive=True)], skip)
            else:
                raise DataError(f"{item}: no such file or folder, and no glob pattern")
            if not found:
                kinds = ", ".join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)
                raise DataError(f"{item}: no images or videos found ({kinds})")
            prefix = Path(base.resolve().name) if several else Path()
            pairs = [(p, prefix / p.relative_to(base)) for p in found]
        for file, rel in pairs:
            is_video = file.suffix.lower() in VIDEO_SUFFIXES
            entries.setdefault(file.resolve(), InputFile(file, rel, is_video))
    return list(entries.values())


def _mode_note(path: Path) -> str | None:
    """A note on the conversion the colour decode applies, from the header only (cheap)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            mode = image.mode
    except Exception:  # not a format PIL knows: OpenCV may still decode it
        return None
    return _MODE_NOTES.get(mode)


def load_input(path: Path, scale: Sequence[int], keep_image: bool) -> dict[str, Any]:
    """Read and preprocess one image; never raises for a bad file (the item has an `error`).

    Shapes:
        returns["img"]: [3, h, w] float32 at the test scale; returns["image"]: [H, W, 3] uint8
        RGB (only with `keep_image`); returns["size"]: (H, W).
    """
    try:
        rgb = read_image(path)
    except DataError as err:
        return {"error": str(err)}
    img, _ = eval_pipeline(rgb, None, tuple(scale))
    note = _mode_note(path)
    return {
        "img": img,
        "size": tuple(rgb.shape[:2]),
        "image": rgb if keep_image else None,
        "note": f"{path}: {note}" if note else None,
    }


class ImageInputs(Dataset):
    """Map-style dataset over image files; items carry their `index` into `files`."""

    def __init__(self, files: Sequence[InputFile], scale: Sequence[int], keep_image: bool) -> None:
        self.files, self.scale, self.keep_image = list(files), tuple(scale), keep_image

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = load_input(self.files[index].path, self.scale, self.keep_image)
        return {"index": index, **item}


@dataclass(frozen=True)
class VideoInfo:
    frames: int  # the container's count; may be approximate or 0
    fps: float  # 0 when the container does not say


def video_info(path: Path) -> VideoInfo:
    """Frame count and frame rate of a video.

    Raises:
        DataError: OpenCV cannot open it (missing, corrupt or an unsupported codec).
    """
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise DataError(f"{path}: cannot open video (corrupt or unsupported format)")
        frames = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    finally:
        capture.release()
    return VideoInfo(frames, fps if np.isfinite(fps) else 0.0)


class VideoFrames(IterableDataset):
    """The frames of one video in order, preprocessed as images (use at most one loader worker)."""

    def __init__(self, path: Path, scale: Sequence[int], keep_image: bool) -> None:
        self.path, self.scale, self.keep_image = path, tuple(scale), keep_image

    def __iter__(self) -> Iterator[dict[str, Any]]:
        capture = cv2.VideoCapture(str(self.path))
        try:
            index = 0
            while capture.isOpened():
                ok, bgr = capture.read()
                if not ok:
                    break
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # [H, W, 3]
                img, _ = eval_pipeline(rgb, None, self.scale)
                image = rgb if self.keep_image else None
                yield {"index": index, "img": img, "size": tuple(rgb.shape[:2]), "image": image}
                index += 1
        finally:
            capture.release()
