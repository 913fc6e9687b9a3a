"""DAFormer decode head with the context-aware "sepaspp" fusion (DAFormer's `DAFormerHead`).

Module names mirror mmseg's `DAFormerHead` (`embed_layers.{i}.proj`, `fuse_layer.aspp_modules.*`,
`fuse_layer.bottleneck`, `conv_seg`), so released DAFormer/DIDA checkpoints map by prefix only.
Unlike mmseg, `forward` also returns the fused post-ReLU feature, DIDA's pixel embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dida.eval.inference import resize
from dida.models.layers import ConvBNReLU, DepthwiseSeparableConvBNReLU, init_conv_bn_, is_meta


class MLP(nn.Module):
    """Per-level token embedding, a single Linear (DAFormer `MLP`, no norm, no activation)."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shapes: x: B×C_i×h×w -> B×D×h×w."""
        b, _, h, w = x.shape
        x = self.proj(x.flatten(2).transpose(1, 2))  # B×(h·w)×D
        return x.transpose(1, 2).reshape(b, -1, h, w)  # B×D×h×w


class ASPPWrapper(nn.Module):
    """Parallel ASPP branches (1×1 conv for dilation 1, separable 3×3 otherwise) + 3×3 bottleneck.

    mmseg's `ASPPWrapper` with `sep=True`, no image pooling and no context layer.
    """

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int]) -> None:
        super().__init__()
        branches: list[nn.Module] = []
        for d in dilations:
            if d == 1:
                branches.append(ConvBNReLU(in_channels, channels, 1))
            else:
                branches.append(DepthwiseSeparableConvBNReLU(in_channels, channels, dilation=d))
        self.aspp_modules = nn.ModuleList(branches)
        self.bottleneck = ConvBNReLU(len(dilations) * channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shapes: x: B×C_in×h×w -> B×D×h×w (non-negative)."""
        return self.bottleneck(torch.cat([branch(x) for branch in self.aspp_modules], dim=1))


class DAFormerHead(nn.Module):
    """Embed each encoder level, resize to the finest level, fuse with sep-ASPP, classify.

    Args:
        in_channels: channels of the four encoder outputs.
        num_classes: segmentation classes.
        embed_dim: width of the per-level embeddings and of the fused feature (D).
        dilations: ASPP dilations, one branch each.
        dropout: Dropout2d rate before the classifier.
        fusion: `aspp` (DAFormer's sep-ASPP) or `conv` (a 1×1 ConvBNReLU, the SegFormer-style
            decoder that HRDA's scale-attention head uses; `dilations` is then unused).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        embed_dim: int = 256,
        dilations: Sequence[int] = (1, 6, 12, 18),
        dropout: float = 0.1,
        fusion: str = "aspp",
    ) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.embed_layers = nn.ModuleDict(
            {str(i): MLP(c, embed_dim) for i, c in enumerate(self.in_channels)}
        )
        fused_in = len(self.in_channels) * embed_dim
        if fusion == "aspp":
            self.fuse_layer: nn.Module = ASPPWrapper(fused_in, embed_dim, dilations)
        elif fusion == "conv":
            self.fuse_layer = ConvBNReLU(fused_in, embed_dim, 1)
        else:
            raise ValueError(f"fusion '{fusion}': expected aspp or conv")
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(embed_dim, num_classes, 1)
        init_conv_bn_(self.fuse_layer)
        if not is_meta(self.conv_seg):
            nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
            nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode encoder features.

        Shapes:
            features: [B×C_i×h_i×w_i] for i = 0..3, level 0 the finest (h×w)
            returns: logits B×C×h×w, embedding B×D×h×w (post-ReLU fused feature)
        """
        if len(features) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature maps, got {len(features)}")
        size = features[0].shape[2:]
        embeds = []
        for i, feat in enumerate(features):
            x = self.embed_layers[str(i)](feat)
            embeds.append(resize(x, size))
        fused = torch.cat(embeds, dim=1)  # channels-last, as the encoder's views and `MLP` give
        if fused.device.type == "cpu":
            # oneDNN's dilated depthwise convolution (the ASPP branches) runs 2-3x slower on a
            # channels-last input than on a contiguous one, forward and backward (measured)
            fused = fused.contiguous()
        embedding = self.fuse_layer(fused)  # B×D×h×w
        logits = self.conv_seg(self.dropout(embedding))
        return logits, embedding
