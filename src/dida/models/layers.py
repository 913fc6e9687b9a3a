"""Small shared building blocks: stochastic depth and mmcv-style conv → BN → ReLU modules.

Module attribute names mirror mmcv's `ConvModule` / `DepthwiseSeparableConvModule` (`conv`, `bn`,
`depthwise_conv`, `pointwise_conv`) so that released mmseg checkpoints load by key prefix only.
"""

from __future__ import annotations

import torch
from torch import nn


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Per-sample stochastic depth (timm `drop_path`): zero whole samples, rescale the rest.

    Shapes:
        x: B×... -> B×...
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # B×1×...×1
    mask = x.new_empty(mask_shape).bernoulli_(keep_prob)
    return x * mask.div_(keep_prob)


class DropPath(nn.Module):
    """Stochastic depth on the residual branch; identity in eval mode or at rate 0.

    Under `torch.compile` the keep probability is read from a (non-persistent) buffer, as data:
    blocks of different rates then share one compiled graph instead of one graph per rate.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.register_buffer("keep_prob", torch.tensor(1.0 - self.drop_prob), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            if not self.training:
                return x
            mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # B×1×...×1
            keep = self.keep_prob.to(x.dtype)
            return x * (torch.bernoulli(keep.expand(mask_shape)) / keep)
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class ConvBNReLU(nn.Module):
    """Conv2d (no bias) → BatchNorm2d → ReLU, the mmcv `ConvModule` with BN and ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class DepthwiseSeparableConvBNReLU(nn.Module):
    """Depthwise 3×3 (dilated) ConvBNReLU then pointwise 1×1 ConvBNReLU (mmcv naming)."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.depthwise_conv = ConvBNReLU(
            in_channels, in_channels, 3, padding=dilation, dilation=dilation, groups=in_channels
        )
        self.pointwise_conv = ConvBNReLU(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


def init_conv_bn_(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) for convs, weight 1 / bias 0 for BN, in place (mmcv init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
