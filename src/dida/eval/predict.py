"""Label maps for batches of preprocessed images (`dida predict`): whole or sliding-window
inference as `dida test` (docs/method.md §4.1), optional autocast, argmax at each image's
original size.

The model is a `Segmentor` or anything called the same way (`model(img)[0]` = logits), such as
`dida.export.OnnxSegmentor`. Items of different sizes are grouped so that each forward pass sees
one image size; no padding, so a batched prediction equals `dida test`'s batch-1 prediction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from dida.eval.evaluate import predict
from dida.eval.inference import class_max, resize


class _Autocast(nn.Module):
    """Runs `model` under autocast and hands back fp32 logits, so resizing and argmax stay fp32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device_type: str) -> None:
        super().__init__()
        self.model, self.dtype, self.device_type = model, dtype, device_type

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor]:
        with torch.autocast(self.device_type, dtype=self.dtype):
            logits = self.model(img)[0]
        return (logits.float(),)


def group_by_size(items: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split items into groups of equal input and output size, keeping their order within groups."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault((tuple(item["img"].shape), tuple(item["size"])), []).append(item)
    return list(groups.values())


class Predictor:
    """Turns preprocessed images into trainId label maps at their original size.

    Args:
        model: segmentor-like module in eval mode, on `device`.
        mode: "whole" or "slide" (with `crop_size`, `stride`, `num_classes`).
        dtype: autocast dtype; float32 runs without autocast.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_classes: int,
        mode: str = "whole",
        crop_size: Sequence[int] | None = None,
        stride: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        if dtype != torch.float32:
            model = _Autocast(model, dtype, self.device.type)
        self.model, self.mode, self.num_classes = model, mode, num_classes
        self.crop_size, self.stride = crop_size, stride

    @torch.no_grad()
    def __call__(self, imgs: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        """Shapes: imgs: [B, 3, h, w] normalised -> [B, H, W] int64 trainIds on the CPU."""
        imgs = imgs.to(self.device)
        logits = predict(
            self.model, imgs, imgs.shape[2:], mode=self.mode, crop_size=self.crop_size,
            stride=self.stride, num_classes=self.num_classes,
        )  # fmt: skip
        # one image at a time to the original size: a 12-megapixel photo's logits alone take
        # C·48 MB, so a batch of them would not fit; resizing per image gives the same numbers
        labels = [class_max(resize(x[None], out_size))[1][0].cpu() for x in logits]
        return torch.stack(labels)  # [B, H, W]

    def predict_items(
        self, items: Sequence[dict[str, Any]]
    ) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        """(item, label) for every item with an `img` [3, h, w] and its original `size` (H, W)."""
        for group in group_by_size(items):
            labels = self(torch.stack([item["img"] for item in group]), group[0]["size"])
            yield from zip(group, labels, strict=True)
