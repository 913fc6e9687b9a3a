"""Dataset converters: GTA / SYNTHIA / Cityscapes labels -> trainId PNGs + RCS class statistics.

As the original's tools/convert_datasets scripts. Each input label gets a
`<stem>_labelTrainIds.png` beside it; the three statistics files (and for Cityscapes the split
lists) go to the output folder. A `folder` dataset's labels are class indices already: they are
checked, and only the statistics are written. Existing files are never overwritten: an identical
existing output is left as it is, a different one is an error.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dida.data import io
from dida.data.labels import (
    CITYSCAPES_ID_TO_TRAINID,
    IGNORE_INDEX,
    SYNTHIA_ID_TO_TRAINID,
    lookup_table,
)
from dida.errors import DataError

OUT_SUFFIX = "_labelTrainIds.png"
STATS_FILES = ("sample_class_stats.json", "sample_class_stats_dict.json", "samples_with_class.json")
# GTA/SYNTHIA inputs end in a digit, so our own `_labelTrainIds.png` outputs are never inputs
_SOURCE_LABEL = re.compile(r".*\d\.png$")
_CITYSCAPES_SPLITS = ("train", "val", "test")
Progress = Callable[[Iterable, int], Iterable]


@dataclass(frozen=True)
class Spec:
    """How one dataset kind is laid out and read."""

    gt_dir: str
    img_dir: str
    default_nproc: int


SPECS: dict[str, Spec] = {
    "gta": Spec(gt_dir="labels", img_dir="images", default_nproc=4),
    "synthia": Spec(gt_dir="GT/LABELS", img_dir="RGB", default_nproc=4),
    "cityscapes": Spec(gt_dir="gtFine", img_dir="leftImg8bit", default_nproc=1),
    "folder": Spec(gt_dir="", img_dir="", default_nproc=4),  # your own; `gt_dir` is required
}


@dataclass(frozen=True)
class Task:
    """One label file to convert: how to read it and where to write (also its `file` entry;
    None: nothing to write, the label is its own `file`)."""

    kind: str
    src: str
    out: str | None
    with_stats: bool
    # the label's image, to report pairs whose sizes differ (GTA5 has some)
    image: str | None = None
    num_classes: int | None = None  # folder: the values are checked against it


@dataclass
class Conversion:
    """What `convert_dataset` did: the per-file statistics and the image/label size mismatches."""

    stats: list[dict[str, int | str]]
    # "label: image H×W, label H×W" for every pair whose sizes differ
    size_mismatches: list[str]


def class_counts(train_ids: np.ndarray) -> dict[str, int]:
    """Pixel count per present trainId (ignore excluded), keys as strings in ascending order."""
    counts = np.bincount(train_ids.ravel(), minlength=256)
    return {str(c): int(counts[c]) for c in range(IGNORE_INDEX) if counts[c] > 0}


def _cityscapes_polygons_to_train_ids(path: str) -> np.ndarray:
    try:
        from cityscapesscripts.helpers.annotation import Annotation
        from cityscapesscripts.helpers.labels import name2label
        from cityscapesscripts.preparation.json2labelImg import createLabelImage
    except ImportError:
        raise DataError(f"{path}: polygons need `pip install cityscapesscripts`") from None
    annotation = Annotation()
    try:
        annotation.fromJsonFile(path)
    except Exception as err:  # json or schema errors
        raise DataError(f"{path}: cannot read polygon JSON ({type(err).__name__})") from None
    for obj in annotation.objects:
        name = obj.label
        if name not in name2label and name.endswith("group"):
            name = name[: -len("group")]
        if name not in name2label:  # createLabelImage would sys.exit() here
            raise DataError(f"{path}: unknown Cityscapes label '{obj.label}'")
    return np.array(createLabelImage(annotation, "trainIds"), dtype=np.uint8)


_CITYSCAPES_TABLE = lookup_table(CITYSCAPES_ID_TO_TRAINID, 256)  # also GTA's palette indices
_SYNTHIA_TABLE = lookup_table(SYNTHIA_ID_TO_TRAINID, 65536)


def to_train_ids(kind: str, src: str, num_classes: int | None = None) -> np.ndarray:
    """Read one input label file of `kind` and map it to trainIds (255 = ignore); a `folder`
    label is read as it is, its values checked against `num_classes`.

    Shapes:
        returns: [H, W] uint8, same size as the input label.
    """
    if kind == "folder":
        return io.read_label(src, num_classes)
    if kind == "gta":
        return _CITYSCAPES_TABLE[io.read_palette_indices(src)]
    if kind == "synthia":
        return _SYNTHIA_TABLE[io.read_synthia_ids(src)]
    if src.endswith(".json"):
        return _cityscapes_polygons_to_train_ids(src)
    ids = io.read_unchanged(src)
    if ids.ndim != 2 or ids.dtype != np.uint8:
        raise DataError(f"{src}: expected a single-channel 8-bit labelIds PNG, got {ids.shape}")
    return _CITYSCAPES_TABLE[ids]


def convert_one(task: Task) -> tuple[dict[str, int | str] | None, str | None]:
    """Convert one label file; returns its stats dict (None when stats are not kept) and a
    size-mismatch note (None when the label has its image's size or no image is known)."""
    train_ids = to_train_ids(task.kind, task.src, task.num_classes)
    mismatch = None
    if task.image is not None:
        image_hw = io.image_size(task.image)
        if image_hw != train_ids.shape:
            (ih, iw), (lh, lw) = image_hw, train_ids.shape
            mismatch = f"{task.src}: image {iw}×{ih}, label {lw}×{lh}"
    if task.out is not None:
        out = Path(task.out)
        if out.exists():
            if not np.array_equal(io.read_label(out), train_ids):
                raise DataError(f"{out}: exists and differs from the conversion; remove it to redo")
        else:
            io.write_new_file(out, io.encode_png(train_ids))
    if not task.with_stats:
        return None, mismatch
    stats: dict[str, int | str] = dict(class_counts(train_ids))
    stats["file"] = task.out or task.src
    return stats, mismatch


def _gta_synthia_tasks(kind: str, root: Path, label_root: Path) -> list[Task]:
    labels = sorted(p for p in label_root.rglob("*.png") if _SOURCE_LABEL.match(p.name))
    if not labels:
        raise DataError(f"{label_root}: no label PNGs (names ending in a digit + .png) found")
    tasks = []
    for label in labels:
        rel = label.relative_to(label_root)
        image = root / SPECS[kind].img_dir / rel
        if not image.is_file():
            raise DataError(f"{label}: label without image (expected {image})")
        out = label.with_name(label.stem + OUT_SUFFIX)
        tasks.append(Task(kind, str(label), str(out), with_stats=True, image=str(image)))
    return tasks


def _cityscapes_tasks(label_root: Path) -> list[Task]:
    sources: dict[str, Path] = {}
    for path in label_root.rglob("*_polygons.json"):
        sources[str(path)[: -len("_polygons.json")]] = path
    for path in label_root.rglob("*_labelIds.png"):  # preferred over polygons when both exist
        sources[str(path)[: -len("_labelIds.png")]] = path
    if not sources:
        raise DataError(f"{label_root}: no *_labelIds.png or *_polygons.json files found")
    tasks = []
    for stem in sorted(sources):
        rel = Path(stem).relative_to(label_root).as_posix()
        out = stem + OUT_SUFFIX
        tasks.append(Task("cityscapes", str(sources[stem]), out, with_stats="train/" in rel))
    return tasks


def _folder_tasks(label_root: Path, seg_suffix: str, num_classes: int | None) -> list[Task]:
    if num_classes is None or not 1 <= num_classes < IGNORE_INDEX:
        raise DataError(f"--num-classes {num_classes}: expected 1..{IGNORE_INDEX - 1}")
    labels = sorted(
        p for p in label_root.rglob(f"*{seg_suffix}") if p.is_file() and not p.name.startswith(".")
    )
    if not labels:
        raise DataError(f"{label_root}: no labels (*{seg_suffix}) found")
    seen: dict[str, Path] = {}
    for label in labels:
        if label.name in seen:
            raise DataError(
                f"{label} and {seen[label.name]}: rare-class sampling matches labels by file "
                "name, so names must be unique (or set data.rcs.enabled=false)"
            )
        seen[label.name] = label
    return [Task("folder", str(p), None, with_stats=True, num_classes=num_classes) for p in labels]


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".dida-write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DataError(f"{folder}: output folder is not writable ({err.strerror})") from None


def _write_text(path: Path, text: str) -> None:
    if path.exists():
        if path.read_text() != text:
            raise DataError(f"{path}: exists and differs from this conversion; remove it to redo")
        return
    io.write_new_file(path, text.encode())


def stats_files(stats: list[dict[str, int | str]]) -> dict[str, str]:
    """The three rare-class-sampling statistics files as JSON texts, keyed by file name."""
    as_dict: dict[str, dict[str, int]] = {}
    with_class: dict[str, list[list[int | str]]] = {}
    for sample in stats:
        counts = {k: v for k, v in sample.items() if k != "file"}
        as_dict[str(sample["file"])] = counts  # type: ignore[assignment]
        for c, n in counts.items():
            with_class.setdefault(c, []).append([sample["file"], n])
    with_class = {c: with_class[c] for c in sorted(with_class, key=int)}
    texts = (stats, as_dict, with_class)
    return {
        name: json.dumps(t, indent=2) + "\n" for name, t in zip(STATS_FILES, texts, strict=True)
    }


def _split_lists(root: Path) -> dict[str, str]:
    suffix = "_leftImg8bit.png"
    lists = {}
    for split in _CITYSCAPES_SPLITS:
        folder = root / SPECS["cityscapes"].img_dir / split
        stems = sorted(
            p.relative_to(folder).as_posix()[: -len(suffix)] for p in folder.rglob(f"*{suffix}")
        )
        lists[f"{split}.txt"] = "".join(f"{s}\n" for s in stems)
    return lists


def _run(tasks: list[Task], nproc: int, progress: Progress) -> list:
    if nproc <= 1:
        return [convert_one(t) for t in progress(tasks, len(tasks))]
    import multiprocessing

    with multiprocessing.get_context().Pool(nproc) as pool:
        # imap keeps input order, so the outputs do not depend on nproc
        return list(progress(pool.imap(convert_one, tasks, chunksize=8), len(tasks)))


def convert_dataset(
    kind: str,
    root: str | Path,
    out_dir: str | Path | None = None,
    gt_dir: str | None = None,
    nproc: int | None = None,
    progress: Progress | None = None,
    num_classes: int | None = None,
    seg_suffix: str = ".png",
) -> Conversion:
    """Convert every label of a dataset root and write the statistics files.

    A `folder` dataset's labels (`gt_dir`, every file ending in `seg_suffix`, recursively) are
    class indices already: each is checked (single-channel 8-bit or palette PNG, values in
    [0, num_classes) or 255) and nothing is written but the statistics; sampling matches files by
    name, so two labels of one name are an error.

    GTA/SYNTHIA image/label pairs whose sizes differ are reported (GTA5 has such pairs); their
    converted labels keep the label's size, and training resizes them to the image.

    Args:
        kind: "gta", "synthia", "cityscapes" or "folder".
        root: dataset root as given by the user; `file` entries are built from it.
        out_dir: where the statistics files go (default: `root`).
        gt_dir: label folder relative to `root` (default: the kind's).
        nproc: worker processes (default: 4 for GTA/SYNTHIA, 1 for Cityscapes).
        progress: `progress(iterable, total)` wraps the results, e.g. with `tqdm`.
        num_classes, seg_suffix: folder only.

    Returns:
        The per-file stats dicts in sorted file order, and the size mismatches.
    """
    if kind not in SPECS:
        raise DataError(f"unknown dataset kind '{kind}', expected one of {sorted(SPECS)}")
    spec = SPECS[kind]
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    out = Path(out_dir) if out_dir is not None else root
    _check_writable(out)
    label_root = root / (gt_dir or spec.gt_dir)
    if not label_root.is_dir():
        raise DataError(f"{label_root}: label folder not found")
    if kind == "cityscapes":
        tasks = _cityscapes_tasks(label_root)
    elif kind == "folder":
        tasks = _folder_tasks(label_root, seg_suffix, num_classes)
    else:
        tasks = _gta_synthia_tasks(kind, root, label_root)
    results = _run(tasks, nproc or spec.default_nproc, progress or (lambda it, total: it))
    stats = [s for s, _ in results if s is not None]
    mismatches = [m for _, m in results if m is not None]
    texts = stats_files(stats)
    if kind == "cityscapes":
        texts.update(_split_lists(root))
    for name, text in texts.items():
        _write_text(out / name, text)
    return Conversion(stats, mismatches)
