"""Tests for the procedural scene generator and the synthetic benchmark writer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dida.data.benchmark import MARKER, _render, make_synthetic_benchmark
from dida.data.io import read_label
from dida.data.labels import IGNORE_INDEX
from dida.data.scenes import DOMAINS, SCENE_CLASSES, render_scene
from dida.errors import DataError

H, W = 64, 128
N = 40


def _scenes(domain: str, n: int = N, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [render_scene(rng, H, W, domain) for _ in range(n)]


@pytest.fixture(scope="module")
def scenes() -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    # same seed for both domains: identical geometry draws are not required, only same statistics
    return {d: _scenes(d, seed=i) for i, d in enumerate(DOMAINS)}


@pytest.mark.parametrize("domain", DOMAINS)
def test_render_is_deterministic_and_typed(domain: str) -> None:
    a_img, a_lbl = render_scene(np.random.default_rng(7), H, W, domain)
    b_img, b_lbl = render_scene(np.random.default_rng(7), H, W, domain)
    c_img, _ = render_scene(np.random.default_rng(8), H, W, domain)
    assert a_img.shape == (H, W, 3) and a_img.dtype == np.uint8
    assert a_lbl.shape == (H, W) and a_lbl.dtype == np.uint8
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lbl, b_lbl)
    assert not np.array_equal(a_img, c_img)


def test_unknown_domain_is_rejected() -> None:
    with pytest.raises(ValueError, match="domain"):
        render_scene(np.random.default_rng(0), H, W, "night")


def test_labels_within_scene_classes(scenes) -> None:
    allowed = set(SCENE_CLASSES) | {IGNORE_INDEX}
    seen: set[int] = set()
    for domain in DOMAINS:
        for _, lbl in scenes[domain]:
            seen |= set(np.unique(lbl).tolist())
    assert seen <= allowed
    # every class shows up somewhere in 2 x 40 small scenes (bicycles are the rarest)
    assert seen >= set(SCENE_CLASSES)


def _class_freq(samples) -> np.ndarray:
    counts = np.zeros(256)
    for _, lbl in samples:
        counts += np.bincount(lbl.ravel(), minlength=256)
    return counts[list(SCENE_CLASSES)] / counts.sum()


def test_domains_share_layout_statistics(scenes) -> None:
    src, tgt = _class_freq(scenes["source"]), _class_freq(scenes["target"])
    # big classes within a few points, and the ranking of the big ones is the same
    np.testing.assert_allclose(src, tgt, atol=0.04)
    big = src > 0.05
    assert np.array_equal(np.argsort(src[big]), np.argsort(tgt[big]))
    # some classes are rare (< 1 % of pixels): rare-class sampling has something to do
    assert (src < 0.01).sum() >= 3


def _class_mean_colour(samples, cls: int) -> np.ndarray:
    pix = np.concatenate([img[lbl == cls] for img, lbl in samples])
    return pix.astype(np.float64).mean(0)


def test_domains_differ_in_appearance(scenes) -> None:
    shifted = 0
    for cls in SCENE_CLASSES:
        diff = _class_mean_colour(scenes["source"], cls) - _class_mean_colour(scenes["target"], cls)
        shifted += np.abs(diff).max() > 15
    assert shifted >= len(SCENE_CLASSES) - 2
    # the target is noisier/blurrier: sharper pixel-to-pixel changes inside big flat regions differ
    src_img = np.stack([img for img, _ in scenes["source"]]).astype(np.float64)
    tgt_img = np.stack([img for img, _ in scenes["target"]]).astype(np.float64)
    assert src_img.std(axis=(0, 1, 2)).mean() > tgt_img.std(axis=(0, 1, 2)).mean()


def test_make_synthetic_benchmark_writes_converts_and_caches(tmp_path) -> None:
    kwargs = dict(seed=3, n_source=3, n_target_train=2, n_val=2,
                  source_size=(48, 80), target_size=(40, 80))  # fmt: skip
    info = make_synthetic_benchmark(tmp_path, **kwargs)
    assert info["cached"] is False
    gta, cs = tmp_path / "gta", tmp_path / "cityscapes"
    assert len(list((gta / "images").glob("*.png"))) == 3
    assert len(list((gta / "labels").glob("*_labelTrainIds.png"))) == 3
    assert len(json.loads((gta / "sample_class_stats.json").read_text())) == 3
    assert len(list((cs / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))) == 2
    assert len(list((cs / "gtFine" / "train").rglob("*_gtFine_labelTrainIds.png"))) == 2
    # the converted trainIds equal what the generator drew (labelId round trip)
    _, expected = _render(3, "source", 0, (48, 80), "source")
    np.testing.assert_array_equal(read_label(gta / "labels" / "00001_labelTrainIds.png"), expected)
    again = make_synthetic_benchmark(tmp_path, **kwargs)
    assert again["cached"] is True and again["params"] == info["params"]
    with pytest.raises(DataError, match=MARKER):
        make_synthetic_benchmark(tmp_path, **{**kwargs, "n_val": 5})
