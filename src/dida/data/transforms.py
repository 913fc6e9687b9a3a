"""Paired image/label transforms (numpy + OpenCV): keep-ratio resize, cat-max-ratio crop, flip,
ImageNet normalisation, padding; plus the train pipeline (keep-ratio resize, random crop, flip)
and the test pipeline.

All randomness comes from an explicit `numpy.random.Generator`.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from dida.data.labels import IGNORE_INDEX

# ImageNet statistics on the 0..255 scale, RGB order
IMG_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMG_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
_MEAN = np.asarray(IMG_MEAN, dtype=np.float32)
_STD = np.asarray(IMG_STD, dtype=np.float32)
_CROP_CHECKS = 10


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Keep-ratio target size (width, height) for `scale` = (long side, short side), rounded."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(width, height), short_edge / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def resize_image(image: np.ndarray, scale: tuple[int, int]) -> np.ndarray:
    """Bilinear keep-ratio resize. Shapes: image [H, W, 3] -> [H', W', 3]."""
    height, width = image.shape[:2]
    size = rescale_size(width, height, scale)
    if size == (width, height):
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest resize of a label map to `size` = (width, height). Shapes: [H, W] -> [H', W']."""
    if (label.shape[1], label.shape[0]) == tuple(size):
        return label
    return cv2.resize(label, tuple(size), interpolation=cv2.INTER_NEAREST)


def _crop_box(
    shape: tuple[int, ...], crop: tuple[int, int], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    margin_h = max(shape[0] - crop[0], 0)
    margin_w = max(shape[1] - crop[1], 0)
    top = int(rng.integers(0, margin_h + 1))
    left = int(rng.integers(0, margin_w + 1))
    return top, min(top + crop[0], shape[0]), left, min(left + crop[1], shape[1])


def _crop_ok(label: np.ndarray, cat_max_ratio: float) -> bool:
    counts = np.bincount(label.ravel(), minlength=256)
    counts = counts[np.arange(256) != IGNORE_INDEX]
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop(
    image: np.ndarray,
    label: np.ndarray | None,
    crop_size: tuple[int, int],
    cat_max_ratio: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Random crop of `crop_size` = (h, w), mmseg `RandomCrop` semantics.

    With `cat_max_ratio < 1` a window is accepted when its label holds more than one non-ignore
    class and the largest covers less than `cat_max_ratio` of them; up to 10 windows are checked,
    then an 11th is used unchecked.

    Shapes:
        image [H, W, 3], label [H, W] -> [min(H, h), min(W, w), 3], [min(H, h), min(W, w)].
    """
    box = _crop_box(image.shape, crop_size, rng)
    if label is not None and cat_max_ratio < 1.0:
        for _ in range(_CROP_CHECKS):
            if _crop_ok(label[box[0] : box[1], box[2] : box[3]], cat_max_ratio):
                break
            box = _crop_box(image.shape, crop_size, rng)
    image = image[box[0] : box[1], box[2] : box[3]]
    if label is not None:
        label = label[box[0] : box[1], box[2] : box[3]]
    return image, label


def random_flip(
    image: np.ndarray, label: np.ndarray | None, prob: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Horizontal flip with probability `prob` (one draw, always consumed)."""
    if rng.random() < prob:
        image = image[:, ::-1]
        label = None if label is None else label[:, ::-1]
    return image, label


def normalize(image: np.ndarray) -> np.ndarray:
    """ImageNet-normalise an RGB uint8 image. Shapes: [H, W, 3] uint8 -> [H, W, 3] float32."""
    return (image.astype(np.float32) - _MEAN) / _STD


def denormalize(image: np.ndarray) -> np.ndarray:
    """Inverse of `normalize`. Shapes: [H, W, 3] float32 -> [H, W, 3] uint8 (rounded, clipped)."""
    return np.clip(np.rint(image * _STD + _MEAN), 0, 255).astype(np.uint8)


def normalize_tensor(image: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise RGB images on the 0..255 scale.

    Shapes:
        image: [..., 3, H, W] -> same, float32.
    """
    mean = torch.tensor(IMG_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMG_STD, device=image.device).view(3, 1, 1)
    return (image.float() - mean) / std


def denormalize_tensor(image: torch.Tensor) -> torch.Tensor:
    """Back to the 0..255 scale (float, unclipped). Shapes: [..., 3, H, W] -> same."""
    mean = torch.tensor(IMG_MEAN, device=image.device, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(IMG_STD, device=image.device, dtype=image.dtype).view(3, 1, 1)
    return image * std + mean


def pad_to(
    image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Pad bottom/right to at least `size` = (h, w): image with 0, label with 255."""
    pad_h = max(size[0] - image.shape[0], 0)
    pad_w = max(size[1] - image.shape[1], 0)
    if pad_h == 0 and pad_w == 0:
        return image, label
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
    if label is not None:
        label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
    return image, label


def to_tensors(
    image: np.ndarray, label: np.ndarray | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shapes: image [H, W, 3] float32 -> [3, H, W]; label [H, W] uint8 -> [H, W] int64."""
    img = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # [3, H, W]
    lbl = None if label is None else torch.from_numpy(label.astype(np.int64))
    return img, lbl


def resize_pair(
    image: np.ndarray, label: np.ndarray | None, scale: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Keep-ratio resize of an image (bilinear) and its label (nearest) to the same size."""
    image = resize_image(image, scale)
    if label is not None:
        label = resize_label(label, (image.shape[1], image.shape[0]))
    return image, label


def crop_flip(
    image: np.ndarray,
    label: np.ndarray | None,
    crop_size: tuple[int, int],
    cat_max_ratio: float,
    flip_prob: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Random crop (cat-max-ratio rule) then random horizontal flip; numpy in, numpy out."""
    image, label = random_crop(image, label, crop_size, cat_max_ratio, rng)
    return random_flip(image, label, flip_prob, rng)


def finish(
    image: np.ndarray, label: np.ndarray | None, crop_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalise, pad to `crop_size` and convert a cropped pair to tensors.

    Shapes:
        image [h', w', 3] uint8, label [h', w'] uint8 -> [3, h, w] float32, [h, w] int64.
    """
    image, label = pad_to(normalize(image), label, crop_size)
    return to_tensors(image, label)


def train_crop(
    image: np.ndarray,
    label: np.ndarray | None,
    crop_size: tuple[int, int],
    cat_max_ratio: float,
    flip_prob: float,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Crop, flip, normalise, pad and convert an already resized pair (train pipeline tail).

    Shapes:
        image [H, W, 3] uint8, label [H, W] uint8 -> [3, h, w] float32, [h, w] int64.
    """
    image, label = crop_flip(image, label, crop_size, cat_max_ratio, flip_prob, rng)
    return finish(image, label, crop_size)


def eval_pipeline(
    image: np.ndarray, label: np.ndarray | None, scale: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize the image to the eval scale and normalise; the label keeps its full resolution.

    Shapes:
        image [H0, W0, 3] uint8, label [H0, W0] -> [3, h, w] float32, [H0, W0] int64.
    """
    return to_tensors(normalize(resize_image(image, scale)), label)
