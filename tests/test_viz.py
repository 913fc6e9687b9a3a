"""Tests for dida.viz: palette colouring, overlay blending, legend strip, panels, PNG writing."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dida.data.labels import PALETTE
from dida.viz import colorize, draw_legend, make_panel, overlay, write_rgb


def test_colorize_uses_palette_and_black_for_ignore() -> None:
    label = np.array([[0, 13], [255, 18]], dtype=np.uint8)
    rgb = colorize(label)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == PALETTE[0]
    assert tuple(rgb[0, 1]) == PALETTE[13]
    assert tuple(rgb[1, 0]) == (0, 0, 0)
    assert tuple(rgb[1, 1]) == PALETTE[18]
    custom = colorize(np.array([[1, 2]]), palette=[(1, 2, 3), (4, 5, 6)])
    assert custom[0].tolist() == [[4, 5, 6], [0, 0, 0]]  # id 2 is outside the custom palette
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2, 1)))


def test_overlay_blends_with_opacity() -> None:
    image = np.full((3, 4, 3), 100, dtype=np.uint8)
    color = np.full((3, 4, 3), 200, dtype=np.uint8)
    assert (overlay(image, color, 1.0) == 200).all()
    assert (overlay(image, color, 0.0) == 100).all()
    assert (overlay(image, color, 0.25) == 125).all()
    with pytest.raises(ValueError):
        overlay(image, color, 1.5)


def test_legend_strip_shows_present_classes() -> None:
    image = np.zeros((61, 97, 3), dtype=np.uint8)
    out = draw_legend(image, [0, 13])
    assert out.shape[1] == 97 and out.shape[0] > 61
    assert (out[:61] == image).all()
    strip = out[61:].reshape(-1, 3)
    colours = {tuple(c) for c in strip}
    assert PALETTE[0] in colours and PALETTE[13] in colours
    assert PALETTE[2] not in colours
    assert draw_legend(image, []).shape == image.shape
    many = draw_legend(np.zeros((50, 400, 3), np.uint8), range(19))
    few = draw_legend(np.zeros((50, 400, 3), np.uint8), [0])
    assert many.shape[0] > few.shape[0]  # wraps onto more rows


def test_make_panel_grid_shape_and_content() -> None:
    a = np.full((20, 30, 3), 10, dtype=np.uint8)
    b = np.full((10, 15), 250, dtype=np.uint8)  # grey, other size: resized to 20x30
    c = np.full((20, 30, 3), 300.0)  # float: clipped
    panel = make_panel([a, b, c], ["a", "b", "c"], ncols=2)
    tile_h = panel.shape[0] // 2
    assert panel.shape[1] == 60 and panel.dtype == np.uint8
    assert tile_h > 20
    title_h = tile_h - 20
    assert (panel[title_h + 5, 5] == 10).all()
    assert (panel[title_h + 5, 35] == 250).all()
    assert (panel[tile_h + title_h + 5, 5] == 255).all()
    assert make_panel([a]).shape == (20, 30, 3)
    with pytest.raises(ValueError):
        make_panel([a, b], ["only one"])


def test_write_rgb_roundtrip(tmp_path) -> None:
    image = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "sub" / "x.png"
    write_rgb(path, image)
    assert (cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB) == image).all()
