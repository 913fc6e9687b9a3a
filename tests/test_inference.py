"""Whole and sliding-window inference: sizes, agreement on one window, overlap averaging."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dida.eval.inference import slide_inference, whole_inference
from dida.models import DAFormerHead, MiT, Segmentor


class PixelModel(nn.Module):
    """Per-pixel logits at 1/1 resolution: a window's output does not depend on its context."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.conv(img)
        return logits, logits


def tiny_segmentor() -> Segmentor:
    encoder = MiT(
        embed_dims=[8, 16, 32, 64],
        num_heads=[1, 1, 1, 1],
        depths=[1, 1, 1, 1],
        sr_ratios=[8, 4, 2, 1],
    )
    return Segmentor(encoder, DAFormerHead(encoder.embed_dims, 4, embed_dim=16)).eval()


def test_whole_upsamples_to_input_then_out_size() -> None:
    model = tiny_segmentor()
    img = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = whole_inference(model, img, (128, 192))
        logits = model(img)[0]
    assert out.shape == (2, 4, 128, 192)
    expected = F.interpolate(
        F.interpolate(logits, size=(64, 96), mode="bilinear", align_corners=False),
        size=(128, 192),
        mode="bilinear",
        align_corners=False,
    )
    torch.testing.assert_close(out, expected)


def test_slide_equals_whole_on_one_window() -> None:
    model = tiny_segmentor()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = whole_inference(model, img, (100, 100))
        slide = slide_inference(model, img, (100, 100), (64, 64), (32, 32), num_classes=4)
    torch.testing.assert_close(slide, whole)


def test_slide_averages_overlaps_exactly() -> None:
    model = PixelModel()
    img = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        whole = whole_inference(model, img, (50, 70))
        slide = slide_inference(model, img, (50, 70), (32, 32), (20, 20), num_classes=3)
    torch.testing.assert_close(slide, whole)


def test_slide_window_count_and_coverage() -> None:
    calls: list[tuple[int, int]] = []

    class Recorder(PixelModel):
        def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            calls.append(tuple(img.shape[2:]))
            return super().forward(img)

    with torch.no_grad():
        slide_inference(
            Recorder(),
            torch.randn(1, 3, 512, 1024),
            (512, 1024),
            (512, 512),
            (341, 341),
            num_classes=3,
        )
    # mmseg grid: h 1 window, w (1024 - 512 + 340) // 341 + 1 = 3 windows, all full-size crops
    assert calls == [(512, 512)] * 3


def test_slide_on_image_smaller_than_crop() -> None:
    model = PixelModel()
    img = torch.randn(1, 3, 20, 30)
    with torch.no_grad():
        slide = slide_inference(model, img, (40, 60), (32, 32), (16, 16), num_classes=3)
        whole = whole_inference(model, img, (40, 60))
    torch.testing.assert_close(slide, whole)
