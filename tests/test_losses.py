"""Tests for the CE reduction, accuracy, label downscaling and the feature-distance loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dida.adapt.losses import (
    accuracy,
    downscale_label_ratio,
    feature_distance_loss,
    feature_distance_mask,
    pixel_weighted_ce,
)


def _ce_example() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor([[[[2.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 3.0]]]])  # [1, 2, 2, 2]
    labels = torch.tensor([[[0, 1], [255, 0]]])  # [1, 2, 2]
    return logits, labels


def _nll(logits_pixel: list[float], target: int) -> float:
    return -logits_pixel[target] + math.log(sum(math.exp(v) for v in logits_pixel))


def test_ce_is_averaged_over_all_pixels_with_weights() -> None:
    logits, labels = _ce_example()
    terms = [_nll([2.0, 0.0], 0), _nll([0.0, 1.0], 1), 0.0, _nll([0.0, 3.0], 0)]
    assert pixel_weighted_ce(logits, labels).item() == pytest.approx(sum(terms) / 4, rel=1e-6)
    weight = torch.tensor([[[0.5, 2.0], [7.0, 0.25]]])
    expected = (0.5 * terms[0] + 2.0 * terms[1] + 0.25 * terms[3]) / 4
    assert pixel_weighted_ce(logits, labels, weight).item() == pytest.approx(expected, rel=1e-6)
    # differs from PyTorch's default mean over the valid pixels only
    assert F.cross_entropy(logits, labels, ignore_index=255).item() == pytest.approx(
        sum(terms) / 3, rel=1e-6
    )


def test_ce_gradient_and_shape_errors() -> None:
    logits, labels = _ce_example()
    logits.requires_grad_(True)
    pixel_weighted_ce(logits, labels).backward()
    assert torch.all(logits.grad[0, :, 1, 0] == 0)  # ignored pixel gets no gradient
    with pytest.raises(ValueError, match="resize the logits"):
        pixel_weighted_ce(torch.zeros(1, 2, 4, 4), labels)
    with pytest.raises(ValueError, match="weight"):
        pixel_weighted_ce(logits, labels, torch.ones(1, 4, 4))


def test_accuracy_excludes_ignored_pixels() -> None:
    logits, labels = _ce_example()  # predictions: 0, 1, (ignored), 1
    assert accuracy(logits, labels).item() == pytest.approx(200 / 3)
    assert accuracy(logits, torch.full_like(labels, 255)).item() == 0.0


def _crafted_label_map() -> torch.Tensor:
    return torch.tensor(
        [
            [
                [1, 1, 2, 2],
                [1, 1, 2, 255],
                [0, 1, 255, 255],
                [0, 1, 255, 0],
            ]
        ]
    )  # [1, 4, 4]: cells (0,0)=all 1, (0,1)=3/4 class 2, (1,0)=tie 0/1, (1,1)=3/4 ignore


def test_downscale_label_ratio_on_crafted_map() -> None:
    labels = _crafted_label_map()
    out = downscale_label_ratio(labels, 2, min_ratio=0.75, num_classes=3, ignore_index=255)
    assert out.dtype == torch.int64
    assert out.tolist() == [[[1, 2], [255, 255]]]
    strict = downscale_label_ratio(labels, 2, min_ratio=0.8, num_classes=3, ignore_index=255)
    assert strict.tolist() == [[[1, 255], [255, 255]]]
    lenient = downscale_label_ratio(labels, 2, min_ratio=0.5, num_classes=3, ignore_index=255)
    assert lenient[0, 1, 0].item() in (0, 1) and lenient[0, 1, 1].item() == 255
    assert torch.equal(labels, _crafted_label_map())  # input untouched
    with pytest.raises(ValueError, match="divide"):
        downscale_label_ratio(labels, 3, min_ratio=0.75, num_classes=3)


def test_feature_distance_loss_on_crafted_example() -> None:
    labels = _crafted_label_map()
    student = torch.zeros(1, 2, 2, 2, requires_grad=True)
    with torch.no_grad():
        student[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # distance 5 in the class-1 cell
        student[0, :, 0, 1] = torch.tensor([0.0, 1.0])  # distance 1 in the class-2 cell
        student[0, :, 1, 1] = torch.tensor([6.0, 8.0])  # distance 10 in an ignored cell
    imnet = torch.zeros(1, 2, 2, 2)
    kwargs = {"min_ratio": 0.75, "num_classes": 3}
    assert feature_distance_loss(student, imnet, labels, classes=[1], **kwargs).item() == 5.0
    assert feature_distance_loss(student, imnet, labels, classes=[1, 2], **kwargs).item() == 3.0
    assert feature_distance_loss(student, imnet, labels, classes=None, **kwargs).item() == 4.0
    assert feature_distance_loss(student, imnet, None, classes=[1], **kwargs).item() == 4.0
    mask = feature_distance_mask(labels, (2, 2), [2], **kwargs)
    assert mask.tolist() == [[[False, True], [False, False]]]


def test_feature_distance_empty_mask_and_zero_distance_are_finite() -> None:
    labels = _crafted_label_map()
    student = torch.randn(1, 2, 2, 2, requires_grad=True)
    loss = feature_distance_loss(
        student, torch.randn(1, 2, 2, 2), labels, classes=[0], num_classes=3
    )
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    same = student.detach().clone().requires_grad_(True)
    feature_distance_loss(same, student.detach(), labels, classes=[1], num_classes=3).backward()
    assert torch.isfinite(same.grad).all()
    with pytest.raises(ValueError, match="integer multiple"):
        feature_distance_loss(student, student.detach(), torch.zeros(1, 5, 5, dtype=torch.int64),
                              classes=[1], num_classes=3)  # fmt: skip
