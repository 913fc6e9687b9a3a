"""Segmentor = MiT encoder + DAFormer head; returns 1/4-resolution logits and embedding.

docs/method.md §1.2 describes the outputs.

State-dict keys are `encoder.<NVlabs MiT name>` and `head.<mmseg DAFormerHead name>`. Upsampling to
the input or label size is the caller's job (`dida.eval.inference`, the method's losses).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from dida.models.daformer_head import DAFormerHead
from dida.models.mit import MiT, build_mit

if TYPE_CHECKING:
    from dida.config import ModelConfig


class Segmentor(nn.Module):
    """Encoder-decoder segmentation model without losses or resizing."""

    def __init__(self, encoder: MiT, head: DAFormerHead) -> None:
        super().__init__()
        if list(head.in_channels) != list(encoder.embed_dims):
            raise ValueError(
                f"head in_channels {head.in_channels} != encoder embed_dims {encoder.embed_dims}"
            )
        self.encoder = encoder
        self.head = head

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def embed_dim(self) -> int:
        return self.head.embed_dim

    @property
    def variant(self) -> str:
        return self.encoder.variant

    def forward(
        self, img: torch.Tensor, return_features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Run encoder and head.

        Shapes:
            img: B×3×H×W
            returns: logits B×C×H/4×W/4, embedding B×D×H/4×W/4
                (+ the encoder's 4 maps if `return_features`)
        """
        features = self.encoder(img)
        logits, embedding = self.head(features)
        if return_features:
            return logits, embedding, features
        return logits, embedding


def build_segmentor(
    variant: str = "mit_b5",
    num_classes: int = 19,
    embed_dim: int = 256,
    dilations: Sequence[int] = (1, 6, 12, 18),
    dropout: float = 0.1,
    drop_path_rate: float = 0.1,
    checkpoint_encoder: bool = False,
) -> Segmentor:
    """Build MiT `variant` + DAFormer head, randomly initialised (see `load_pretrained`)."""
    encoder = build_mit(
        variant, drop_path_rate=drop_path_rate, grad_checkpointing=checkpoint_encoder
    )
    head = DAFormerHead(encoder.embed_dims, num_classes, embed_dim, dilations, dropout)
    return Segmentor(encoder, head)


def segmentor_from_config(model_cfg: ModelConfig) -> Segmentor:
    """Build the segmentor described by a `ModelConfig` (weights are not loaded here).

    With `model_cfg.hrda.enabled` this is an `HRDASegmentor` (a `Segmentor` subclass).
    """
    if model_cfg.hrda.enabled:
        from dida.models.hrda import hrda_segmentor_from_config

        return hrda_segmentor_from_config(model_cfg)
    return build_segmentor(
        variant=model_cfg.variant,
        num_classes=model_cfg.num_classes,
        embed_dim=model_cfg.embed_dim,
        dilations=tuple(model_cfg.dilations),
        dropout=model_cfg.dropout,
        drop_path_rate=model_cfg.drop_path_rate,
        checkpoint_encoder=model_cfg.checkpoint_encoder,
    )
