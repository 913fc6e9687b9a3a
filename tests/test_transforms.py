"""Tests for the paired transforms: keep-ratio resize, cat-max-ratio crop, flip, normalise, pad."""

from __future__ import annotations

import numpy as np
import torch

from dida.data import transforms as T


def test_rescale_size_matches_reference_sizes() -> None:
    assert T.rescale_size(1914, 1052, (1280, 720)) == (1280, 704)  # GTA
    assert T.rescale_size(1280, 760, (1280, 760)) == (1280, 760)  # SYNTHIA
    assert T.rescale_size(2048, 1024, (1024, 512)) == (1024, 512)  # Cityscapes
    assert T.rescale_size(1024, 2048, (1024, 512)) == (512, 1024)  # portrait keeps ratio


def test_resize_pair_nearest_label() -> None:
    image = np.zeros((1052, 1914, 3), np.uint8)
    label = np.zeros((1052, 1914), np.uint8)
    label[:, 957:] = 7
    label[0, 0] = 255
    img, lbl = T.resize_pair(image, label, (1280, 720))
    assert img.shape == (704, 1280, 3) and lbl.shape == (704, 1280)
    assert set(np.unique(lbl).tolist()) <= {0, 7, 255}  # nearest: no new values


def _boxes(seed: int, shape: tuple[int, int], crop: tuple[int, int], n: int) -> list:
    rng = np.random.default_rng(seed)
    return [T._crop_box(shape, crop, rng) for _ in range(n)]


def test_cat_max_ratio_accepts_first_good_window() -> None:
    label = np.zeros((40, 40), np.uint8)
    label[30:, 30:] = 3  # only windows reaching the corner hold two classes
    label[:5] = 255
    image = np.arange(40 * 40 * 3, dtype=np.int64).reshape(40, 40, 3) % 251
    image = image.astype(np.uint8)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        img, lbl = T.random_crop(image, label, (20, 20), 0.75, rng)
        boxes = _boxes(seed, (40, 40), (20, 20), 11)
        good = [b for b in boxes[:10] if T._crop_ok(label[b[0] : b[1], b[2] : b[3]], 0.75)]
        top, bottom, left, right = good[0] if good else boxes[10]
        np.testing.assert_array_equal(lbl, label[top:bottom, left:right])
        np.testing.assert_array_equal(img, image[top:bottom, left:right])


def test_crop_rule_counts_ignore_out_and_checks_ratio() -> None:
    label = np.zeros((10, 10), np.uint8)
    assert not T._crop_ok(label, 0.75)  # one class
    label[:, :3] = 1  # 30 % vs 70 %
    assert T._crop_ok(label, 0.75)
    label[:, :2] = 255  # 10 of 80 non-ignore pixels for class 1: 87.5 % for class 0
    assert not T._crop_ok(label, 0.75)


def test_single_class_uses_eleventh_window() -> None:
    label = np.zeros((30, 30), np.uint8)
    image = np.zeros((30, 30, 3), np.uint8)
    rng = np.random.default_rng(4)
    T.random_crop(image, label, (10, 10), 0.75, rng)
    ref = np.random.default_rng(4)
    _ = [T._crop_box((30, 30), (10, 10), ref) for _ in range(11)]
    assert rng.random() == ref.random()  # exactly 11 windows drawn
    rng = np.random.default_rng(4)
    T.random_crop(image, label, (10, 10), 1.0, rng)  # no check: one window
    ref = np.random.default_rng(4)
    T._crop_box((30, 30), (10, 10), ref)
    assert rng.random() == ref.random()


def test_flip_normalise_pad_tensors() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (6, 5), dtype=np.uint8)
    flipped, flipped_label = T.random_flip(image, label, 1.0, rng)
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    np.testing.assert_array_equal(flipped_label, label[:, ::-1])
    same, _ = T.random_flip(image, label, 0.0, rng)
    assert same is image
    norm = T.normalize(image)
    np.testing.assert_allclose(norm[0, 0, 0], (image[0, 0, 0] - 123.675) / 58.395, rtol=1e-6)
    np.testing.assert_array_equal(T.denormalize(norm), image)
    tensor = torch.from_numpy(image.transpose(2, 0, 1).copy())
    np.testing.assert_allclose(
        T.normalize_tensor(tensor).numpy(), norm.transpose(2, 0, 1), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(T.denormalize_tensor(T.normalize_tensor(tensor)), tensor, atol=1e-4)
    padded, padded_label = T.pad_to(norm, label, (8, 7))
    assert padded.shape == (8, 7, 3) and padded_label.shape == (8, 7)
    assert (padded[6:] == 0).all() and (padded_label[6:] == 255).all()
    assert (padded_label[:, 5:] == 255).all()


def test_train_crop_and_eval_pipeline_shapes() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (20, 50, 3), dtype=np.uint8)
    label = rng.integers(0, 3, (20, 50), dtype=np.uint8)
    img, lbl = T.train_crop(image, label, (32, 32), 0.75, 0.5, rng)
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert lbl.shape == (32, 32) and lbl.dtype == torch.int64
    assert (lbl[20:] == 255).all() and (img[:, 20:] == 0).all()
    img, lbl = T.eval_pipeline(image, label, (25, 10))
    assert img.shape == (3, 10, 25) and lbl.shape == (20, 50)
