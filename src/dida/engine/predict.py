"""The `dida predict` run: loaders over images and videos, batched prediction, output files.

Output kinds: `label` (trainId PNG, or a labelId PNG through `label_table`), `color` (palette
PNG: class colours in viewers, trainIds as pixel values) and `overlay` (image blended with the
colours) for images and video frames, and `video` (the overlay at the source frame rate, mp4v)
for videos. Outputs mirror the inputs' relative paths, are written atomically (temporary file +
rename), and an existing file is never replaced unless `overwrite`. A file that cannot be read is
reported, counted and skipped.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torch.utils.data import DataLoader

from dida.data.inputs import ImageInputs, InputFile, VideoFrames, video_info
from dida.data.io import encode_png
from dida.errors import DataError, UserError
from dida.eval.predict import Predictor
from dida.io_safety import WriteError, atomic_output, atomic_write, check_writable_dir
from dida.viz import colorize, overlay

FRAME_KINDS = ("label", "color", "overlay")
_VIDEO_FOURCC = "mp4v"
_VIDEO_SUFFIX = "_overlay.mp4"
_OUTPUT_SUFFIXES = ("_trainIds.png", "_labelIds.png", "_color.png", "_overlay.png", _VIDEO_SUFFIX)
_DEFAULT_FPS = 30.0  # for containers that do not state their frame rate
_PENDING_WRITES = 32  # PNG writes queued before the loop waits for the writer threads


@dataclass
class OutputOptions:
    """Where and what to write. `image_kinds` apply to images, `video_kinds` to videos (frames as
    PNG with `label`/`color`/`overlay`, the overlay video with `video`)."""

    out_dir: Path
    image_kinds: frozenset[str]
    video_kinds: frozenset[str]
    opacity: float = 0.5
    palette: Any = None
    label_table: np.ndarray | None = None  # [256] uint8 trainId -> written id
    overwrite: bool = False

    @property
    def label_suffix(self) -> str:
        return "_trainIds.png" if self.label_table is None else "_labelIds.png"


@dataclass
class PredictSummary:
    images: int = 0
    videos: int = 0
    frames: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def processed(self) -> int:
        return self.images + self.frames

    def text(self) -> str:
        rate = self.processed / self.seconds if self.seconds > 0 else 0.0
        done = f"predicted {self.images} images"
        if self.videos:
            done += f" and {self.videos} videos ({self.frames} frames)"
        done += f" in {self.seconds:.1f} s ({rate:.2f} img/s)"
        if self.skipped:
            done += f"; skipped {len(self.skipped)} unreadable file(s)"
        return done


def _base(rel: Path) -> Path:
    """`a/b_leftImg8bit.png` -> `a/b`: Cityscapes names lose their image suffix (--format-only)."""
    stem = rel.stem.removesuffix("_leftImg8bit")
    return rel.with_name(stem)


def _suffix(kind: str, options: OutputOptions) -> str:
    return options.label_suffix if kind == "label" else f"_{kind}.png"


def image_outputs(rel: Path, options: OutputOptions) -> dict[str, Path]:
    base = options.out_dir / _base(rel)
    kinds = [k for k in FRAME_KINDS if k in options.image_kinds]
    return {k: base.with_name(base.name + _suffix(k, options)) for k in kinds}


def frame_outputs(rel: Path, index: int, options: OutputOptions) -> dict[str, Path]:
    folder = options.out_dir / _base(rel)
    kinds = [k for k in FRAME_KINDS if k in options.video_kinds]
    return {k: folder / f"{index:06d}{_suffix(k, options)}" for k in kinds}


def video_output(rel: Path, options: OutputOptions) -> Path:
    base = options.out_dir / _base(rel)
    return base.with_name(base.name + _VIDEO_SUFFIX)


def is_output(path: Path, out_dir: Path) -> bool:
    """Whether `path` is an earlier output of `dida predict` into `out_dir` (not an input)."""
    return path.name.endswith(_OUTPUT_SUFFIXES) and path.resolve().is_relative_to(out_dir.resolve())


def check_outputs(entries: Sequence[InputFile], options: OutputOptions) -> None:
    """Refuse two inputs with one output, and (without `overwrite`) outputs that exist already.

    Raises:
        UserError: naming the first conflicting output.
    """
    planned: dict[Path, Path] = {}
    for entry in entries:
        if entry.is_video:
            paths = [video_output(entry.rel, options)] if "video" in options.video_kinds else []
            if set(FRAME_KINDS) & options.video_kinds:
                paths.append(options.out_dir / _base(entry.rel))  # the frames folder
        else:
            paths = list(image_outputs(entry.rel, options).values())
        for path in paths:
            if path in planned:
                raise UserError(f"{planned[path]} and {entry.path} would both write {path}")
            planned[path] = entry.path
    check_writable_dir(options.out_dir)
    if options.overwrite:
        return
    existing = [p for p in planned if p.is_file() or (p.is_dir() and any(p.iterdir()))]
    if existing:
        more = f" (and {len(existing) - 1} more outputs)" if len(existing) > 1 else ""
        raise UserError(
            f"{existing[0]}: exists already{more}; not overwritten: pass --overwrite or another -o"
        )


def encode_palette_png(label: np.ndarray, palette: Any = None) -> bytes:
    """A palette ('P') PNG: shows the class colours, and its pixel values are the trainIds.

    Shapes:
        label: [H, W] uint8 trainIds.
    """
    from PIL import Image

    colors = colorize(np.arange(256, dtype=np.uint8)[None], palette)[0]  # [256, 3] lookup table
    image = Image.fromarray(label, mode="P")
    image.putpalette(colors.ravel().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_png(path: Path, data: np.ndarray | bytes) -> None:
    """Write a uint8 [H, W] or RGB [H, W, 3] array (or encoded PNG bytes) atomically."""
    atomic_write(path, data if isinstance(data, bytes) else encode_png(data), what="prediction")


class _VideoWriter:
    """An mp4v video writer, opened at the first frame (whose size it takes)."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path, self.fps = path, fps
        self.writer: cv2.VideoWriter | None = None

    def write(self, rgb: np.ndarray) -> None:
        """Shapes: rgb: [H, W, 3] uint8."""
        if self.writer is None:
            fourcc = cv2.VideoWriter_fourcc(*_VIDEO_FOURCC)
            self.writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, rgb.shape[1::-1])
            if not self.writer.isOpened():
                raise WriteError(
                    f"{self.path}: cannot write video ({_VIDEO_FOURCC}, {self.fps} fps)"
                )
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def release(self) -> None:
        if self.writer is not None:
            self.writer.release()


class _Renderer:
    """Builds and writes the output images of one prediction; PNG encoding runs in threads."""

    def __init__(self, options: OutputOptions, pool: ThreadPoolExecutor) -> None:
        self.options, self.pool = options, pool
        self.pending: list[Future] = []

    def images(self, item: dict[str, Any], label: np.ndarray, kinds: set[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "label" in kinds:
            table = self.options.label_table
            out["label"] = label if table is None else table[label]
        if "color" in kinds:
            out["color"] = encode_palette_png(label, self.options.palette)
        if kinds & {"overlay", "video"}:
            color = colorize(label, self.options.palette)
            out["overlay"] = overlay(item["image"], color, self.options.opacity)
        return out

    def write(self, paths: dict[str, Path], arrays: dict[str, Any]) -> None:
        for kind, path in paths.items():
            self.pending.append(self.pool.submit(_write_png, path, arrays[kind]))
        while len(self.pending) > _PENDING_WRITES:
            self.pending.pop(0).result()

    def flush(self) -> None:
        while self.pending:
            self.pending.pop(0).result()  # re-raises a write error


class _Run:
    """One `run_predictions` call: loaders, prediction, outputs, progress and the summary."""

    def __init__(
        self, predictor: Predictor, render: _Renderer, scale: Sequence[int], batch_size: int,
        num_workers: int, bar: Any, log: Callable[[str], None],
    ) -> None:  # fmt: skip
        self.predictor, self.render, self.scale = predictor, render, tuple(scale)
        self.batch_size, self.num_workers, self.bar, self.log = batch_size, num_workers, bar, log
        self.summary = PredictSummary()

    def skip(self, message: str) -> None:
        self.summary.skipped.append(message)
        self.log(f"skipped: {message}")

    def _loader(self, dataset: Any, num_workers: int) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, num_workers=num_workers, collate_fn=list
        )

    def images(self, entries: list[InputFile]) -> None:
        options = self.render.options
        kinds = set(options.image_kinds)
        dataset = ImageInputs(entries, self.scale, keep_image="overlay" in kinds)
        for batch in self._loader(dataset, self.num_workers):
            ready = []
            for item in batch:
                if "error" in item:
                    self.skip(item["error"])
                    continue
                if item["note"]:
                    self.log(f"note: {item['note']}")
                ready.append(item)
            for item, label in self.predictor.predict_items(ready):
                arrays = self.render.images(item, label.numpy().astype(np.uint8), kinds)
                self.render.write(image_outputs(entries[item["index"]].rel, options), arrays)
                self.summary.images += 1
            self.bar.update(len(batch))

    def video(self, entry: InputFile, fps: float) -> None:
        options = self.render.options
        kinds = set(options.video_kinds)
        frames = VideoFrames(entry.path, self.scale, keep_image=bool(kinds & {"overlay", "video"}))
        count = 0
        try:
            with contextlib.ExitStack() as stack:
                video = None
                if "video" in kinds:  # written to a temporary file, renamed when complete
                    path = video_output(entry.rel, options)
                    tmp = stack.enter_context(atomic_output(path, "video"))
                    video = _VideoWriter(tmp, fps if fps > 0 else _DEFAULT_FPS)
                    stack.callback(video.release)
                # one loader worker at most, so that frames arrive in order
                for batch in self._loader(frames, min(self.num_workers, 1)):
                    for item, label in self.predictor.predict_items(batch):
                        arrays = self.render.images(item, label.numpy().astype(np.uint8), kinds)
                        self.render.write(frame_outputs(entry.rel, item["index"], options), arrays)
                        if video is not None:
                            video.write(arrays["overlay"])
                    count += len(batch)
                    self.bar.update(len(batch))
                if count == 0:
                    raise DataError(f"{entry.path}: no frame could be decoded")
        except DataError as err:
            self.skip(str(err))
            return
        self.summary.videos += 1
        self.summary.frames += count


def run_predictions(
    predictor: Predictor,
    entries: Sequence[InputFile],
    *,
    scale: Sequence[int],
    options: OutputOptions,
    batch_size: int = 4,
    num_workers: int = 2,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> PredictSummary:
    """Predict every image and video frame of `entries` and write the outputs of `options`.

    Call `check_outputs` first: it refuses outputs that exist (without `overwrite`).
    """
    from tqdm import tqdm

    start = time.perf_counter()
    images = [e for e in entries if not e.is_video]
    videos, unreadable = [], []
    for entry in (e for e in entries if e.is_video):
        try:
            videos.append((entry, video_info(entry.path)))
        except DataError as err:
            unreadable.append(str(err))
    total = len(images) + sum(info.frames for _, info in videos)
    bar = tqdm(total=total, desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    with bar, ThreadPoolExecutor(max_workers=2) as pool:
        render = _Renderer(options, pool)
        run = _Run(predictor, render, scale, batch_size, num_workers, bar, log)
        for message in unreadable:
            run.skip(message)
        try:
            if images:
                run.images(images)
            for entry, info in videos:
                run.video(entry, info.fps)
        finally:
            render.flush()
    run.summary.seconds = time.perf_counter() - start
    return run.summary
