"""HRDA's segmentation loss of one training forward (the reference's `HRDAHead.losses`).

`(1 - λ_d - λ_lr)·CE(fused, label) + λ_d·CE(detail, label in the box) [+ λ_lr·CE(lr, label)]`,
each a pixel-weighted CE averaged over all pixels of its label (mmseg's reduction), logits resized
bilinearly to their label. The same call serves the source, mixed and masked (MIC) forwards.
"""

from __future__ import annotations

import torch

from dida.adapt.losses import pixel_weighted_ce
from dida.eval.inference import resize
from dida.models.hrda import HRDAOutput, crop_to_box


def hrda_seg_loss(
    out: HRDAOutput,
    label: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    detail_weight: float = 0.1,
    context_weight: float = 0.0,
    ignore_index: int = 255,
) -> dict[str, torch.Tensor]:
    """The weighted loss terms of one HRDA forward, keyed as the reference logs them.

    Returns:
        `{"loss_seg": fused term, "hr.loss_seg": detail term (if λ_d > 0), "lr.loss_seg": context
        term (if λ_lr > 0)}`, each already multiplied by its weight; their sum is the loss.

    Shapes:
        label: [B, H, W] int64 over the forward's input (any size; the box is scaled to it)
        weight: [B, H, W] pixel weights or None
    """
    if label.dim() != 3 or label.shape[0] != out.fused.shape[0]:
        raise ValueError(f"label must be [B, H, W] with B = {out.fused.shape[0]}, "
                         f"got {tuple(label.shape)}")  # fmt: skip
    size = label.shape[-2:]
    fused = resize(out.fused, size)
    terms = {
        "loss_seg": (1.0 - detail_weight - context_weight)
        * pixel_weighted_ce(fused, label, weight, ignore_index)
    }
    if detail_weight > 0:
        hr_label, hr_weight = label, weight
        if out.box is not None:
            hr_label = crop_to_box(label, out.box, out.input_size)
            hr_weight = None if weight is None else crop_to_box(weight, out.box, out.input_size)
        hr = resize(out.hr, hr_label.shape[-2:])
        terms["hr.loss_seg"] = detail_weight * pixel_weighted_ce(
            hr, hr_label, hr_weight, ignore_index
        )
    if context_weight > 0:  # supervises the attenuated (1 - a)·lr, as the reference does
        lr = resize(out.lr, size)
        terms["lr.loss_seg"] = context_weight * pixel_weighted_ce(lr, label, weight, ignore_index)
    return terms
