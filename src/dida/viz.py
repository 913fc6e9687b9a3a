"""Palette colouring, overlays, legends and panels for predictions.

Images here are numpy uint8 RGB `[H, W, 3]`; label maps are integer `[H, W]` trainIds with
255 = ignore (drawn black). Shared by `dida test --show-dir`, `dida demo` and the training debug
panels. The `write_rgb` file helper is meant for the CLI and engine only (reading: `dida.data.io`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from dida.data.labels import CLASSES, PALETTE, palette_array
from dida.errors import DataError

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_MIN_CAPTION_SCALE = 0.05  # smaller is unreadable: a caption too long at this scale is cut


def _palette(palette: Sequence[Sequence[int]] | np.ndarray | None) -> np.ndarray:
    """A [256, 3] uint8 lookup table (unlisted ids, including 255, black)."""
    if palette is None:
        return palette_array(len(PALETTE))
    pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)  # [C, 3]
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: min(len(pal), 255)] = pal[:255]
    return table


def colorize(
    label: np.ndarray, palette: Sequence[Sequence[int]] | np.ndarray | None = None
) -> np.ndarray:
    """Colour a label map with the (Cityscapes) palette; 255 and unknown ids are black.

    Shapes:
        label: [H, W] integer ids.
        returns: [H, W, 3] uint8 RGB.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be [H, W], got shape {label.shape}")
    ids = np.where((label >= 0) & (label < 256), label, 255).astype(np.uint8)
    return _palette(palette)[ids]


def overlay(image: np.ndarray, color: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """Blend `image·(1 − opacity) + color·opacity` (opacity 1 gives the pure colour map).

    Shapes:
        image, color: [H, W, 3] uint8 RGB.
        returns: [H, W, 3] uint8 RGB.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    if image.shape != color.shape:
        raise ValueError(f"image shape {image.shape} != colour shape {color.shape}")
    blended = image.astype(np.float32) * (1.0 - opacity) + color.astype(np.float32) * opacity
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def draw_legend(
    image: np.ndarray,
    class_ids: Sequence[int],
    class_names: Sequence[str] = CLASSES,
    palette: Sequence[Sequence[int]] | np.ndarray | None = None,
) -> np.ndarray:
    """Append a strip below `image` with a colour box and the name of every class in `class_ids`.

    Entries wrap onto several rows when they do not fit the width.

    Shapes:
        image: [H, W, 3] uint8 RGB.
        returns: [H + h_legend, W, 3] uint8 RGB (h_legend = 0 when `class_ids` is empty).
    """
    ids = [int(c) for c in class_ids if 0 <= int(c) < len(class_names)]
    if not ids:
        return image.copy()
    width = image.shape[1]
    scale = float(np.clip(width / 1200.0, 0.3, 1.0))
    thickness = 1 if scale < 0.8 else 2
    box = max(6, int(round(20 * scale)))
    pad = max(2, box // 3)
    entries = []
    for c in ids:
        (tw, _), _ = cv2.getTextSize(class_names[c], _FONT, scale, thickness)
        entries.append((c, box + pad + tw + 2 * pad))
    rows: list[list[int]] = [[]]
    used = pad
    for c, w in entries:
        if rows[-1] and used + w > width:
            rows.append([])
            used = pad
        rows[-1].append(c)
        used += w
    row_h = box + 2 * pad
    strip = np.full((row_h * len(rows), width, 3), 255, dtype=np.uint8)
    pal = _palette(palette)
    widths = dict(entries)
    for r, row in enumerate(rows):
        x, y = pad, r * row_h + pad
        for c in row:
            color = tuple(int(v) for v in pal[c])
            cv2.rectangle(strip, (x, y), (x + box, y + box), color, thickness=-1)
            cv2.rectangle(strip, (x, y), (x + box, y + box), (0, 0, 0), thickness=1)
            baseline = y + box - max(1, box // 6)
            cv2.putText(
                strip, class_names[c], (x + box + pad, baseline), _FONT, scale, (0, 0, 0), thickness
            )
            x += widths[c]
    return np.concatenate([image, strip], axis=0)  # [H + h_legend, W, 3]


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)  # [H, W] -> [H, W, 3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"panel images must be [H, W] or [H, W, 3], got shape {image.shape}")
    return image


def make_panel(
    images: Sequence[np.ndarray], titles: Sequence[str] | None = None, ncols: int | None = None
) -> np.ndarray:
    """Tile images into one grid with a title bar above each tile.

    Every tile is resized (nearest neighbour, so label colours stay exact) to the first image's
    size.
    Grey `[H, W]` images are repeated to RGB; non-uint8 images are clipped to 0..255.

    Shapes:
        images: list of [H_i, W_i, 3] or [H_i, W_i] arrays.
        returns: [rows·(H + title_h), ncols·W, 3] uint8 RGB.
    """
    if not images:
        raise ValueError("make_panel needs at least one image")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    tiles = [_to_rgb_uint8(im) for im in images]
    height, width = tiles[0].shape[:2]
    ncols = ncols or min(len(tiles), 4)
    nrows = -(-len(tiles) // ncols)
    scale = float(np.clip(width / 800.0, 0.35, 1.0))
    title_h = int(round(28 * scale)) if titles is not None else 0
    panel = np.zeros((nrows * (height + title_h), ncols * width, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        if tile.shape[:2] != (height, width):
            tile = cv2.resize(tile, (width, height), interpolation=cv2.INTER_NEAREST)
        y, x = (i // ncols) * (height + title_h), (i % ncols) * width
        panel[y + title_h : y + title_h + height, x : x + width] = tile
        if titles is not None:
            text = str(titles[i])
            # shrink a caption that would not fit its tile (it was clipped by the next tile);
            # measured again after each shrink: OpenCV 5 draws text in steps of size, so a scale
            # shrunk in proportion may still be drawn too wide
            fit = scale
            text_w = cv2.getTextSize(text, _FONT, fit, 1)[0][0]
            while text_w > width - 8 and fit > _MIN_CAPTION_SCALE:
                fit = max(_MIN_CAPTION_SCALE, fit * min(0.9, (width - 8) / text_w))
                text_w = cv2.getTextSize(text, _FONT, fit, 1)[0][0]
            caption = panel[y : y + title_h, x : x + width]  # a view: cut at the tile's edge
            cv2.putText(caption, text, (4, title_h - 6), _FONT, fit, (255, 255, 255), 1)
    return panel


def write_rgb(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 RGB (or single-channel) image, creating parent folders.

    Shapes:
        image: [H, W, 3] uint8 RGB or [H, W] uint8.
    """
    from dida.io_safety import atomic_write

    path = Path(path)
    out = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    try:
        ok, data = cv2.imencode(path.suffix or ".png", out)
    except cv2.error:
        ok = False
    if not ok:
        raise DataError(f"{path}: cannot encode image as {path.suffix or '.png'}")
    # through a temp file: a full disk or read-only folder is a one-line WriteError
    atomic_write(path, data.tobytes(), what="image")
