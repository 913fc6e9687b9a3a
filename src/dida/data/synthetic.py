"""Writers of small synthetic datasets in the real GTA / SYNTHIA / Cityscapes file formats.

Used by tests and benchmarks: label maps are blocky random trainId grids, images are per-class
colours with noise. PNGs are written with OpenCV (BGR order), palette PNGs with PIL.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from dida.data.labels import (
    CITYSCAPES_ID_TO_TRAINID,
    CLASSES,
    IGNORE_INDEX,
    PALETTE,
    SYNTHIA_ID_TO_TRAINID,
)

# trainId -> dataset id (255 / unknown -> 0 = void/unlabeled in both datasets), and the GTA label
# palette: labelId -> its class colour (unmapped ids black)
_TRAIN_TO_CS = np.zeros(256, dtype=np.uint8)
_TRAIN_TO_SYNTHIA = np.zeros(256, dtype=np.uint16)
_GTA_PALETTE = np.zeros((256, 3), dtype=np.uint8)
for _cs_id, _train_id in CITYSCAPES_ID_TO_TRAINID.items():
    _TRAIN_TO_CS[_train_id] = _cs_id
    _GTA_PALETTE[_cs_id] = PALETTE[_train_id]
for _sy_id, _train_id in SYNTHIA_ID_TO_TRAINID.items():
    _TRAIN_TO_SYNTHIA[_train_id] = _sy_id
# random_sample's class colours by trainId (rows past the palette black), signed for the noise
_COLOURS = np.zeros((256, 3), dtype=np.int16)
_COLOURS[: len(PALETTE)] = PALETTE
_DEFAULT_CLASSES = (0, 1, 2, 8, 10, 13)


def _imwrite(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3 and array.dtype == np.uint8:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"{path}: cv2.imwrite failed")


def write_gta_sample(
    root: str | Path, stem: str, image_rgb: np.ndarray, train_ids: np.ndarray
) -> Path:
    """Write `images/<stem>.png` and the palette label `labels/<stem>.png` (indices = labelIds).

    Shapes:
        image_rgb: [H, W, 3] uint8; train_ids: [H, W] uint8 (255 = ignore).
    """
    from PIL import Image

    root = Path(root)
    _imwrite(root / "images" / f"{stem}.png", image_rgb)
    label = Image.fromarray(_TRAIN_TO_CS[train_ids], mode="P")
    label.putpalette(_GTA_PALETTE.ravel().tolist())
    path = root / "labels" / f"{stem}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    label.save(path)
    return path


def write_synthia_sample(
    root: str | Path, stem: str, image_rgb: np.ndarray, train_ids: np.ndarray
) -> Path:
    """Write `RGB/<stem>.png` and the 16-bit 3-channel `GT/LABELS/<stem>.png` (id in R channel).

    Shapes:
        image_rgb: [H, W, 3] uint8; train_ids: [H, W] uint8 (255 = ignore).
    """
    root = Path(root)
    _imwrite(root / "RGB" / f"{stem}.png", image_rgb)
    ids = _TRAIN_TO_SYNTHIA[train_ids]
    # BGR channel order in cv2: the last channel is the file's R channel; G/B hold instance-like ids
    label = np.stack([np.full_like(ids, 7), np.zeros_like(ids), ids], axis=-1)  # [H, W, 3]
    path = root / "GT" / "LABELS" / f"{stem}.png"
    _imwrite(path, label)
    return path


def _block_polygons(train_ids: np.ndarray) -> list[dict]:
    """One rectangle polygon per row run of equal labels (ignore runs are left as background)."""
    objects = []
    for y in range(train_ids.shape[0]):
        row = train_ids[y]
        edges = np.flatnonzero(np.diff(row.astype(np.int16))) + 1
        starts = np.concatenate([[0], edges])
        ends = np.concatenate([edges, [row.size]])
        for x0, x1 in zip(starts.tolist(), ends.tolist(), strict=True):
            if row[x0] == IGNORE_INDEX:
                continue
            # PIL fills polygons inclusively, so the last pixel is x1 - 1
            polygon = [[x0, y], [x1 - 1, y], [x1 - 1, y], [x0, y]]
            objects.append({"label": CLASSES[row[x0]], "polygon": polygon})
    return objects


def write_cityscapes_sample(
    root: str | Path,
    split: str,
    city: str,
    seq: int,
    frame: int,
    image_rgb: np.ndarray,
    train_ids: np.ndarray,
    polygons: bool = False,
) -> Path:
    """Write a Cityscapes image and its `_gtFine_labelIds.png` (or only `_gtFine_polygons.json`).

    Shapes:
        image_rgb: [H, W, 3] uint8; train_ids: [H, W] uint8 (255 = ignore).
    """
    root = Path(root)
    name = f"{city}_{seq:06d}_{frame:06d}"
    _imwrite(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", image_rgb)
    gt = root / "gtFine" / split / city
    if not polygons:
        path = gt / f"{name}_gtFine_labelIds.png"
        _imwrite(path, _TRAIN_TO_CS[train_ids])
        return path
    height, width = train_ids.shape
    annotation = {"imgHeight": height, "imgWidth": width, "objects": _block_polygons(train_ids)}
    path = gt / f"{name}_gtFine_polygons.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(annotation))
    return path


def random_sample(
    rng: np.random.Generator, size: tuple[int, int], classes: tuple[int, ...], grid: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """A blocky random trainId map (a few classes plus some ignore) and a matching image.

    Shapes:
        returns: image [H, W, 3] uint8, train_ids [H, W] uint8, for size = (H, W).
    """
    height, width = size
    choices = np.array([*classes, IGNORE_INDEX], dtype=np.uint8)
    cells = rng.choice(choices, size=(grid, grid), p=_block_probs(len(choices)))
    rows = np.minimum(np.arange(height) * grid // height, grid - 1)
    cols = np.minimum(np.arange(width) * grid // width, grid - 1)
    train_ids = cells[rows[:, None], cols[None, :]]  # [H, W]
    noise = rng.integers(-20, 21, size=(height, width, 3), dtype=np.int16)
    image = np.clip(_COLOURS[train_ids] + noise, 0, 255).astype(np.uint8)
    return image, train_ids


def _block_probs(n: int) -> np.ndarray:
    probs = np.ones(n)
    probs[-1] = 0.5  # ignore cells are rarer
    return probs / probs.sum()


def make_gta(
    root: str | Path,
    n: int,
    size: tuple[int, int] = (64, 96),
    seed: int = 0,
    classes: tuple[int, ...] = _DEFAULT_CLASSES,
) -> list[Path]:
    """Write `n` GTA samples 00001.png, ...; `size` is (height, width). Returns the label paths."""
    rng = np.random.default_rng(seed)
    return [
        write_gta_sample(root, f"{k:05d}", *random_sample(rng, size, classes))
        for k in range(1, n + 1)
    ]


def make_synthia(
    root: str | Path,
    n: int,
    size: tuple[int, int] = (64, 96),
    seed: int = 0,
    classes: tuple[int, ...] = _DEFAULT_CLASSES,
) -> list[Path]:
    """Write `n` SYNTHIA samples named 0000000.png ... ; `size` is (height, width)."""
    rng = np.random.default_rng(seed)
    return [
        write_synthia_sample(root, f"{k:07d}", *random_sample(rng, size, classes)) for k in range(n)
    ]


def make_cityscapes(
    root: str | Path,
    n: int,
    size: tuple[int, int] = (64, 128),
    seed: int = 0,
    splits: tuple[str, ...] = ("train", "val"),
    polygons: bool = False,
    classes: tuple[int, ...] = (0, 1, 2, 8, 10, 11, 13),
) -> list[Path]:
    """Write `n` samples per split (city 'aachen' for train, 'frankfurt' otherwise)."""
    rng = np.random.default_rng(seed)
    paths = []
    for split in splits:
        city = "aachen" if split == "train" else "frankfurt"
        for k in range(n):
            image, train_ids = random_sample(rng, size, classes)
            paths.append(
                write_cityscapes_sample(root, split, city, 0, k, image, train_ids, polygons)
            )
    return paths
