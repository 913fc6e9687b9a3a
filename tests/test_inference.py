"""Whole and sliding-window inference: sizes, agreement on one window, overlap averaging."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dida.eval.inference import class_max, cpu_any, resize, slide_inference, whole_inference
from dida.models import Segmentor, build_segmentor


class PixelModel(nn.Module):
    """Per-pixel logits at 1/1 resolution: a window's output does not depend on its context."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.conv(img)
        return logits, logits


def tiny_segmentor() -> Segmentor:
    return build_segmentor("mit_tiny", num_classes=4, embed_dim=16).eval()


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


@pytest.mark.parametrize(
    ("make_model", "img_shape", "out_size", "crop", "stride", "num_classes"),
    [
        (tiny_segmentor, (2, 3, 64, 64), (100, 100), (64, 64), (32, 32), 4),  # one window
        (PixelModel, (1, 3, 50, 70), (50, 70), (32, 32), (20, 20), 3),  # overlaps average exactly
        (PixelModel, (1, 3, 20, 30), (40, 60), (32, 32), (16, 16), 3),  # image smaller than crop
    ],
    ids=["one_window", "overlaps_average_exactly", "image_smaller_than_crop"],
)
def test_slide_equals_whole(
    make_model: Callable[[], nn.Module],
    img_shape: tuple[int, ...],
    out_size: tuple[int, int],
    crop: tuple[int, int],
    stride: tuple[int, int],
    num_classes: int,
) -> None:
    model = make_model()
    img = torch.randn(*img_shape)
    with torch.no_grad():
        whole = whole_inference(model, img, out_size)
        slide = slide_inference(model, img, out_size, crop, stride, num_classes=num_classes)
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


def test_batched_slide_equals_window_by_window() -> None:
    calls: list[int] = []

    class Recorder(PixelModel):
        def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            calls.append(img.shape[0])
            return super().forward(img)

    model, img = Recorder(), torch.randn(2, 3, 40, 70)
    with torch.no_grad():
        one_by_one = slide_inference(model, img, (40, 70), (32, 32), (16, 16), 3)
        batched = slide_inference(model, img, (40, 70), (32, 32), (16, 16), 3, batched=True)
    assert calls == [2] * 8 + [16]  # 2 x 4 windows of 2 images, then all in one call
    torch.testing.assert_close(batched, one_by_one)


def test_hrda_slide_with_one_window_equals_whole() -> None:
    """Test-time windows (HRDA's slide test) around an HRDA model, which slides its own detail
    windows inside each call: a window covering the image equals whole-image inference."""
    from dida.config import load_config
    from dida.models import segmentor_from_config

    cfg = load_config(None, ["model.variant=mit_tiny", "model.embed_dim=16", "model.num_classes=4",
                             "model.hrda.enabled=true", "model.hrda.detail_crop=[32,32]",
                             "model.hrda.attention_embed_dim=8"])  # fmt: skip
    model = segmentor_from_config(cfg.model).eval()
    img = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        whole = whole_inference(model, img, (128, 256))
        slide = slide_inference(model, img, (128, 256), (64, 128), (32, 64), 4, batched=True)
        windows = slide_inference(model, img, (64, 128), (64, 64), (64, 64), 4, batched=True)
        left = whole_inference(model, img[..., :64], (64, 64))
        right = whole_inference(model, img[..., 64:], (64, 64))
    torch.testing.assert_close(slide, whole)
    # two side-by-side windows: each half is the whole-image inference of that half
    torch.testing.assert_close(windows, torch.cat([left, right], dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_resize_gradient_is_interpolates_bit_for_bit(
    dtype: torch.dtype, threads: int, layout: torch.memory_format
) -> None:
    """`resize` with a graph on the CPU (its backward in the channels-last layout, bf16 NCHW
    forward in fp32): the values and input gradients of `F.interpolate`, bit for bit, up and
    down, odd sizes included; the input gradient in the input's layout."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        for shape, size in [((4, 19, 32, 32), (128, 128)), ((2, 7, 23, 5), (114, 71)),
                            ((3, 24, 41, 69), (142, 21)), ((1, 64, 16, 16), (32, 32))]:
            x = (torch.randn(shape, generator=gen) * 5).to(dtype)
            x = x.contiguous(memory_format=layout).requires_grad_()
            out = resize(x, size)
            ref = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            assert "BilinearResize" in type(out.grad_fn).__name__
            grad = torch.randn(ref.shape, generator=gen).to(dtype)
            got = torch.autograd.grad(out, x, grad)[0]
            want = torch.autograd.grad(ref, x, grad)[0]
            assert torch.equal(out, ref) and torch.equal(got, want)
            assert got.is_contiguous(memory_format=layout)
    finally:
        torch.set_num_threads(previous)
    with torch.no_grad():  # no graph: no autograd Function
        assert resize(x, (8, 8)).grad_fn is None
    assert resize(x, x.shape[2:]) is x


def test_bf16_resize_without_graph_is_interpolates_bit_for_bit() -> None:
    """bf16 NCHW maps resized by powers of two in float32 and rounded once, at other ratios by
    the bf16 kernel: `F.interpolate`'s bf16 bits, on random, large, finely quantised (sums near
    rounding ties) and near-constant values."""
    gen = torch.Generator().manual_seed(0)
    for shape, size in [((4, 19, 32, 32), (128, 128)), ((2, 19, 128, 128), (32, 32)),
                        ((2, 5, 8, 8), (1024, 64)), ((3, 19, 100, 50), (25, 400)),
                        ((2, 19, 60, 30), (128, 128)), ((1, 3, 37, 53), (100, 71))]:
        x = torch.randn(shape, generator=gen)
        for values in (x, x * 1000, (x * 8).round() / 8 + 1 / 512, 1 + x.abs() * 1e-3):
            xb = values.bfloat16()
            with torch.no_grad():
                got = resize(xb, size)
            want = F.interpolate(xb, size=size, mode="bilinear", align_corners=False)
            assert got.dtype == torch.bfloat16 and got.is_contiguous()
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class_max_is_torch_max_bit_for_bit(dtype: torch.dtype) -> None:
    """Values and indices of `x.max(dim=1)`: random scores, ties (the first class wins), +0/-0
    ties, a NaN (torch's own route), and a class count beyond the uint8 ranks."""
    g = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(3, 19, 17, 23, generator=g),
        torch.randint(0, 3, (2, 19, 16, 16), generator=g).float(),  # many ties
        torch.softmax(torch.randn(2, 7, 9, 5, generator=g), dim=1),
        torch.randn(1, 300, 4, 4, generator=g),
    ]
    zeros = torch.zeros(1, 4, 2, 2)
    zeros[0, 1, 0, 0] = -0.0
    zeros[0, 0, 1, 1] = -0.0
    nan = torch.randn(2, 5, 3, 3, generator=g)
    nan[1, 2, 1, 1] = float("nan")
    for x in [*cases, zeros - 1.0 + 1.0, zeros.neg(), nan]:
        x = x.to(dtype)
        values, index = class_max(x)
        want = x.max(dim=1)
        assert torch.equal(index, want.indices)
        assert torch.equal(values.isnan(), want.values.isnan())
        assert torch.equal(values.nan_to_num(), want.values.nan_to_num())
        assert torch.equal(values.signbit(), want.values.signbit())


def test_cpu_any_reads_cpu_tensors_only() -> None:
    assert cpu_any(torch.tensor([False, True])) and not cpu_any(torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="sync"):
        cpu_any(torch.zeros(3, dtype=torch.bool, device="meta"))
