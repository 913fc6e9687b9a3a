"""Cityscapes' 19 training classes, their palette, and the id → trainId maps.

The only place these tables live.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255

CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip

PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

THING_CLASSES: tuple[int, ...] = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)

# Cityscapes (and GTA palette-index) labelId -> trainId
CITYSCAPES_ID_TO_TRAINID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

# SYNTHIA (RAND-CITYSCAPES) class id -> trainId
SYNTHIA_ID_TO_TRAINID: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13,
    18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}  # fmt: skip

# Evaluation subsets for SYNTHIA→Cityscapes (the paper's 16 and 13 classes)
SYNTHIA_16: tuple[int, ...] = tuple(c for c in range(19) if c not in (9, 14, 16))
SYNTHIA_13: tuple[int, ...] = tuple(c for c in SYNTHIA_16 if c not in (3, 4, 5))

# trainId -> Cityscapes labelId, for `--format-only` predictions
TRAINID_TO_CITYSCAPES_ID: dict[int, int] = {v: k for k, v in CITYSCAPES_ID_TO_TRAINID.items()}


def lookup_table(mapping: dict[int, int], size: int = 65536) -> np.ndarray:
    """A uint8 table `t` with `t[id] = trainId` and 255 for every id not in `mapping`."""
    table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for src, dst in mapping.items():
        table[src] = dst
    return table


def palette_array(num_classes: int = len(CLASSES)) -> np.ndarray:
    """The palette as a [256, 3] uint8 array (rows past the classes are black)."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: min(num_classes, len(PALETTE))] = np.array(PALETTE[:num_classes], dtype=np.uint8)
    return pal
