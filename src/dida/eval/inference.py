"""Whole-image and sliding-window inference (mmseg 1.x `EncoderDecoder` algorithms).

docs/method.md §1.2 (model outputs, resizing) and §4.1 (test protocol).

Both take a `Segmentor`-like model returning `(logits, embedding)` at 1/4 resolution and run under
the caller's `torch.no_grad()`; logits are resized bilinearly (align_corners False) before softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dida.models.layers import is_traced


def _power_of_two_ratio(a: int, b: int) -> bool:
    """Whether a/b or b/a is 1, 2, 4, ... 128."""
    small, large = min(a, b), max(a, b)
    ratio = large // max(small, 1)
    return small > 0 and large == ratio * small and ratio <= 128 and ratio & (ratio - 1) == 0


def _interpolate(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`F.interpolate(bilinear, align_corners=False)` of a CPU tensor.

    A bf16 NCHW map resized by powers of two (the quickstart's logits: 32×32 to 128×128) is
    resized in float32 and rounded once, 2x faster (1.6 against 3.2 ms for 4×19×32×32): PyTorch's
    bf16 NCHW kernel computes in float32 too, with its interpolation weights rounded to bf16,
    which leaves the weights of such ratios (multiples of 2^-8) exact, so the bits are the same
    (tested). At other ratios the weights round, and the bf16 kernel runs. (Its channels-last
    bf16 kernel is faster still but rounds differently.)"""
    if (
        x.dtype == torch.bfloat16 and x.is_contiguous()
        and all(_power_of_two_ratio(a, b) for a, b in zip(x.shape[2:], size, strict=True))
    ):  # fmt: skip
        return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False).to(x.dtype)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class _BilinearResize(torch.autograd.Function):
    """`_interpolate` of a CPU tensor (NCHW or channels-last) whose backward reads the gradient
    in the channels-last layout: PyTorch's channels-last kernel sums the same terms in the same
    order (bit for bit in fp32 and bf16, tested), 1.3-1.8x faster for the quickstart's
    19×128×128 logits (2.6 against 4.6 ms) and 10x for its head's 64-channel feature maps (0.07
    against 0.8-0.9 ms from 4×4, 8×8 and 16×16 to 32×32). The input's gradient comes back in the
    input's layout."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:  # type: ignore[override]
        ctx.in_shape = list(x.shape)
        ctx.channels_last = not x.is_contiguous()
        return _interpolate(x, size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = torch.ops.aten.upsample_bilinear2d_backward(
            grad, list(grad.shape[2:]), ctx.in_shape, False
        )
        return (grad_x if ctx.channels_last else grad_x.contiguous()), None


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear, align_corners False, as every resize of logits and features in the reference."""
    size = tuple(size)
    if tuple(x.shape[2:]) == size:
        return x
    if (
        x.device.type != "cpu" or x.dim() != 4 or torch.compiler.is_compiling() or is_traced()
    ):  # fmt: skip
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if (
        x.requires_grad and torch.is_grad_enabled()
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
    ):  # fmt: skip
        return _BilinearResize.apply(x, size)
    return _interpolate(x, size)


# the profiler scope of `cpu_any`: host reads that only CPU tensors take (the tests that count a
# step's host-device syncs, on a CPU, leave them out)
CPU_HOST_READ = "dida.cpu_host_read"


def cpu_any(x: torch.Tensor) -> bool:
    """`bool(x.any())` of a CPU tensor, for shortcuts that only a CPU takes: reading a CPU tensor
    back is free, reading a GPU one would wait for the device (so it is refused)."""
    if x.device.type != "cpu":
        raise ValueError(f"cpu_any of a {x.device.type} tensor: a host-device sync")
    with torch.profiler.record_function(CPU_HOST_READ):
        return bool(x.any())


def class_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x.max(dim=1)`: the maximum over classes and the first class that reaches it, the same
    bits; on a CPU as `amax` and the first class equal to it, 3-4x faster (the quickstart's
    4×19×128×128 logits: 1.3 against 4.8 ms), or torch's own where a maximum is NaN.

    Shapes: x: B×C×H×W -> B×H×W, B×H×W int64
    """
    c = x.shape[1]
    if x.device.type != "cpu" or x.dim() != 4 or c > 255 or torch.compiler.is_compiling():
        return tuple(x.max(dim=1))
    values = x.amax(dim=1)
    if cpu_any(values.isnan()):
        return tuple(x.max(dim=1))
    # C - c for the classes at the maximum, so the largest is the first class
    rank = torch.arange(c, 0, -1, dtype=torch.uint8, device=x.device).view(1, c, 1, 1)
    index = c - ((x == values.unsqueeze(1)) * rank).amax(dim=1).long()
    # the values of those elements (amax may return the other zero where +0 and -0 tie)
    return x.gather(1, index.unsqueeze(1)).squeeze(1), index


def encode_decode(model: nn.Module, img: torch.Tensor) -> torch.Tensor:
    """Model logits upsampled to the input size.

    Shapes: img: B×3×H×W -> B×C×H×W
    """
    logits = model(img)[0]
    return resize(logits, img.shape[2:])


def whole_inference(model: nn.Module, img: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
    """Run the model on whole images; logits go to the input size, then to `out_size`.

    Shapes: img: B×3×H×W -> B×C×out_h×out_w
    """
    return resize(encode_decode(model, img), out_size)


def sliding_windows(
    size: Sequence[int], crop_size: Sequence[int], stride: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """Window boxes (y1, y2, x1, x2) of mmseg's slide grid, row-major; the last window of a row or
    column is shifted back to end at the border, and a window larger than the image is clipped.
    """
    h_img, w_img = size
    h_crop, w_crop = crop_size
    h_stride, w_stride = stride
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    boxes = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, h_img)
            x2 = min(w_idx * w_stride + w_crop, w_img)
            boxes.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return boxes


def slide_inference(
    model: nn.Module,
    img: torch.Tensor,
    out_size: Sequence[int],
    crop_size: Sequence[int],
    stride: Sequence[int],
    num_classes: int,
    batched: bool = False,
) -> torch.Tensor:
    """Average logits of overlapping crops (mmseg 1.x `slide_inference`), then resize to `out_size`.

    Args:
        crop_size: window (h, w).
        stride: window step (h, w).
        num_classes: channels of the model's logits.
        batched: run all windows as one batch (HRDA's `batched_slide`); same result, one call.

    Shapes: img: B×3×H×W -> B×C×out_h×out_w
    """
    batch, _, h_img, w_img = img.shape
    boxes = sliding_windows((h_img, w_img), crop_size, stride)
    crops = (img[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes)
    if batched:  # all windows have the same size: [n·B, 3, h, w] -> n × [B, C, h, w]
        crop_logits = encode_decode(model, torch.cat(list(crops))).split(batch)
    else:  # one window at a time (lazily: one window's logits in memory)
        crop_logits = (encode_decode(model, crop) for crop in crops)
    preds = img.new_zeros((batch, num_classes, h_img, w_img))
    count = img.new_zeros((1, 1, h_img, w_img))
    for (y1, y2, x1, x2), logits in zip(boxes, crop_logits, strict=True):
        if logits.shape[1] != num_classes:
            raise ValueError(f"model returned {logits.shape[1]} classes, expected {num_classes}")
        preds[:, :, y1:y2, x1:x2] += logits
        count[:, :, y1:y2, x1:x2] += 1
    return resize(preds / count, out_size)
