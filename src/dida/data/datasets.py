"""Segmentation datasets (GTA, SYNTHIA, Cityscapes, generic folder) resolved from `DatasetConfig`.

A dataset is a sorted list of (image, trainId label) file pairs found by a recursive scan
(the folders `dida convert` writes); layout problems are reported at construction. `ValDataset`
is the evaluation view: image resized to the eval scale, label at full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dida.config import DatasetConfig
from dida.data import io
from dida.data.convert import OUT_SUFFIX, SPECS
from dida.data.labels import CLASSES, PALETTE
from dida.data.transforms import eval_pipeline, resize_label
from dida.errors import DataError


@dataclass(frozen=True)
class Layout:
    """Where a dataset kind keeps images and labels (relative to its root) and their suffixes."""

    img_dir: str
    ann_dir: str
    img_suffix: str
    seg_suffix: str


def default_layout(kind: str, split: str) -> Layout:
    """The kind's default folders and suffixes: where `dida convert` writes."""
    if kind in ("gta", "synthia"):
        spec = SPECS[kind]
        return Layout(spec.img_dir, spec.gt_dir, ".png", OUT_SUFFIX)
    if kind == "cityscapes":
        spec = SPECS[kind]
        return Layout(
            f"{spec.img_dir}/{split}",
            f"{spec.gt_dir}/{split}",
            "_leftImg8bit.png",
            f"_gtFine{OUT_SUFFIX}",
        )
    if kind == "folder":
        return Layout("", "", ".png", ".png")
    raise DataError(f"dataset kind '{kind}': expected one of cityscapes, folder, gta, synthia")


def resolve_layout(cfg: DatasetConfig, with_labels: bool = True) -> Layout:
    """`cfg`'s folders and suffixes, empty strings replaced by the kind's defaults.

    A `folder` dataset needs `img_dir`, and `ann_dir` unless its labels are not read (a target).
    """
    base = default_layout(cfg.kind, cfg.split)
    if cfg.kind == "folder" and not (cfg.img_dir and (cfg.ann_dir or not with_labels)):
        needs = "img_dir and ann_dir" if with_labels else "img_dir"
        raise DataError(f"dataset root {cfg.root}: kind 'folder' needs {needs}")
    return Layout(
        img_dir=cfg.img_dir or base.img_dir,
        ann_dir=cfg.ann_dir or base.ann_dir,
        img_suffix=cfg.img_suffix or base.img_suffix,
        seg_suffix=cfg.seg_suffix or base.seg_suffix,
    )


def _palette_for(num_classes: int) -> list[tuple[int, int, int]]:
    palette = list(PALETTE[:num_classes])
    rng = np.random.default_rng(num_classes)  # deterministic extra colours beyond Cityscapes'
    while len(palette) < num_classes:
        palette.append(tuple(int(v) for v in rng.integers(0, 256, 3)))
    return palette


class SegDataset:
    """Sorted (image, label) pairs of one folder layout; loads raw RGB uint8 and uint8 trainIds."""

    def __init__(
        self,
        img_root: str | Path,
        ann_root: str | Path | None,
        img_suffix: str,
        seg_suffix: str,
        classes: tuple[str, ...] = CLASSES,
    ) -> None:
        self.img_root = Path(img_root)
        self.ann_root = None if ann_root is None else Path(ann_root)
        self.classes = tuple(classes)
        self.palette = _palette_for(len(self.classes))
        self.files = self._scan(img_suffix, seg_suffix)
        self.label_path_to_index = {
            Path(lbl).name: i for i, (_, lbl) in enumerate(self.files) if lbl is not None
        }

    def _scan(self, img_suffix: str, seg_suffix: str) -> list[tuple[str, str | None]]:
        if not self.img_root.is_dir():
            raise DataError(f"{self.img_root}: image folder not found")
        if self.ann_root is not None and not self.ann_root.is_dir():
            raise DataError(f"{self.ann_root}: label folder not found")
        images = sorted(
            p for p in self.img_root.rglob(f"*{img_suffix}") if not p.name.startswith(".")
        )
        if self.ann_root is not None and self.ann_root == self.img_root:
            # same folder (folder kind): do not take label files for images
            images = [
                p for p in images if not p.name.endswith(seg_suffix) or img_suffix == seg_suffix
            ]
        if not images:
            raise DataError(f"{self.img_root}: no images (*{img_suffix}) found")
        files: list[tuple[str, str | None]] = []
        for image in images:
            if self.ann_root is None:
                files.append((str(image), None))
                continue
            rel = image.relative_to(self.img_root).as_posix()
            label = self.ann_root / (rel[: -len(img_suffix)] + seg_suffix)
            if not label.is_file():
                raise DataError(f"{image}: no label {label} (run `dida convert` first?)")
            files.append((str(image), str(label)))
        return files

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Image and label; a label of another size than its image is resized to it (nearest).

        Shapes: returns image [H, W, 3] uint8 RGB, label [H, W] uint8 (or None).
        """
        img_path, label_path = self.files[index]
        image = io.read_image(img_path)
        label = None if label_path is None else io.read_label(label_path, len(self.classes))
        if label is not None and label.shape != image.shape[:2]:
            label = resize_label(label, (image.shape[1], image.shape[0]))
        return image, label

    def size_mismatches(self) -> list[str]:
        """Pairs whose label size differs from the image size, from the file headers (fast)."""
        found = []
        for img_path, label_path in self.files:
            if label_path is None:
                continue
            image_hw, label_hw = io.image_size(img_path), io.image_size(label_path)
            if image_hw != label_hw:
                found.append(f"{label_path}: image {image_hw[1]}×{image_hw[0]}, "
                             f"label {label_hw[1]}×{label_hw[0]}")  # fmt: skip
        return found


def build_dataset(cfg: DatasetConfig, with_labels: bool = True) -> SegDataset:
    """The dataset described by `cfg`; `with_labels=False` lists images only (UDA target)."""
    layout = resolve_layout(cfg, with_labels)
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    classes = tuple(cfg.classes) if cfg.classes else CLASSES
    if cfg.kind != "folder" and len(classes) != len(CLASSES):
        raise DataError(f"dataset {cfg.root}: kind '{cfg.kind}' uses the 19 Cityscapes classes")
    return SegDataset(
        root / layout.img_dir,
        root / layout.ann_dir if with_labels else None,
        layout.img_suffix,
        layout.seg_suffix,
        classes,
    )


class ValDataset(Dataset):
    """Evaluation items: dict(img [3, h, w] float32 at `scale`, label [H0, W0] int64, paths)."""

    def __init__(self, dataset: SegDataset, scale: tuple[int, int]) -> None:
        if dataset.ann_root is None:
            raise DataError(f"{dataset.img_root}: evaluation needs labels")
        self.dataset = dataset
        self.scale = (int(scale[0]), int(scale[1]))
        self.classes = dataset.classes
        self.palette = dataset.palette
        self.img_root = dataset.img_root

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        image, label = self.dataset.load(index)
        img, lbl = eval_pipeline(image, label, self.scale)
        img_path, label_path = self.dataset.files[index]
        return {"img": img, "label": lbl, "img_path": img_path, "label_path": str(label_path)}
