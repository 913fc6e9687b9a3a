"""Segmentation and ImageNet feature-distance losses of the DAFormer step.

docs/method.md §2.4 (feature distance) and §2.6 (segmentation loss reduction).

Pure functions; callers apply the loss weights (e.g. the FD lambda).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dida.eval.inference import class_max


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 4 or labels.dim() != 3:
        raise ValueError(
            f"expected logits [B, C, H, W] and labels [B, H, W], got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if logits.shape[0] != labels.shape[0] or logits.shape[-2:] != labels.shape[-2:]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in batch or "
            "spatial size; resize the logits to the label size first"
        )


def pixel_weighted_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Cross-entropy times a per-pixel weight, averaged over ALL B·H·W pixels (mmseg reduction).

    Ignored pixels contribute 0 but still count in the denominator (not PyTorch's default mean).

    Shapes:
        logits: [B, C, H, W]; labels: [B, H, W] int64; weight: [B, H, W] or None
        returned: [] scalar
    """
    _check_logits_labels(logits, labels)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")  # [B, H, W]
    if weight is not None:
        if weight.shape != labels.shape:
            raise ValueError(
                f"weight {tuple(weight.shape)} must match labels {tuple(labels.shape)}"
            )
        loss = loss * weight
    return loss.mean()


@torch.no_grad()
def accuracy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Top-1 pixel accuracy in percent over non-ignored pixels (0 when there are none); for logging.

    (mmseg 0.16's `acc_seg` also counted ignored pixels as wrong; we exclude them.)

    Shapes:
        logits: [B, C, H, W]; labels: [B, H, W]; returned: [] scalar
    """
    _check_logits_labels(logits, labels)
    valid = labels != ignore_index
    correct = (class_max(logits)[1] == labels) & valid  # = argmax(1)
    return 100.0 * correct.sum().float() / valid.sum().clamp_min(1).float()


def downscale_label_ratio(
    labels: torch.Tensor,
    scale_factor: int,
    min_ratio: float,
    num_classes: int,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Majority-vote label downscaling (DAFormer): ignored cells when unsure.

    Each s×s cell takes its most frequent label (ignore counted as an extra class); it becomes
    `ignore_index` when that majority is ignore or covers less than `min_ratio` of the cell.
    Labels outside [0, num_classes) count as ignore (checked on the device, no host read).

    Shapes:
        labels: [B, H, W] int64 with H, W divisible by scale_factor
        returned: [B, H / s, W / s] int64
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be [B, H, W], got {tuple(labels.shape)}")
    b, h, w = labels.shape
    if scale_factor < 1 or h % scale_factor or w % scale_factor:
        raise ValueError(
            f"scale_factor {scale_factor} must be >= 1 and divide the label size {h}x{w}"
        )
    ignore_substitute = num_classes
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    idx = torch.where(valid, labels, ignore_substitute)
    one_hot = torch.zeros(b, num_classes + 1, h, w, device=labels.device)  # [B, C+1, H, W]
    one_hot.scatter_(1, idx.unsqueeze(1), 1.0)
    ratios = F.avg_pool2d(one_hot, kernel_size=scale_factor)  # [B, C+1, H/s, W/s]
    majority_ratio, out = ratios.max(dim=1)  # [B, H/s, W/s] each
    unsure = (out == ignore_substitute) | (majority_ratio < min_ratio)
    return out.masked_fill(unsure, ignore_index)


def feature_distance_mask(
    labels: torch.Tensor,
    feat_size: tuple[int, int],
    classes: Sequence[int],
    *,
    min_ratio: float = 0.75,
    num_classes: int,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Feature-grid cells whose (confidently) downscaled label is one of `classes`.

    Shapes:
        labels: [B, H, W] with H = s·h, W = s·w; returned: [B, h, w] bool
    """
    h, w = feat_size
    big_h, big_w = labels.shape[-2:]
    scale = big_h // h
    if scale * h != big_h or scale * w != big_w:
        raise ValueError(
            f"label size {big_h}x{big_w} must be an integer multiple of the feature size {h}x{w}"
        )
    small = downscale_label_ratio(labels, scale, min_ratio, num_classes, ignore_index)  # [B, h, w]
    wanted = torch.as_tensor(list(classes), dtype=small.dtype, device=small.device)
    return torch.isin(small, wanted)


def feature_distance_loss(
    student_feat: torch.Tensor,
    imnet_feat: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    classes: Sequence[int] | None,
    min_ratio: float = 0.75,
    num_classes: int,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Mean over masked cells of the channel-wise L2 distance to the frozen ImageNet features.

    With `classes` or `labels` None every cell counts. An empty mask gives 0 (with a graph to the
    student features), not the NaN of an empty mean. The caller multiplies by lambda.

    Shapes:
        student_feat, imnet_feat: [B, D, h, w]; labels: [B, H, W] or None; returned: [] scalar
    """
    if student_feat.shape != imnet_feat.shape or student_feat.dim() != 4:
        raise ValueError(
            f"features must both be [B, D, h, w], got {tuple(student_feat.shape)} and "
            f"{tuple(imnet_feat.shape)}"
        )
    dist = torch.linalg.vector_norm(student_feat - imnet_feat.detach(), dim=1)  # [B, h, w]
    if classes is None or labels is None:
        return dist.mean()
    mask = feature_distance_mask(
        labels,
        (dist.shape[-2], dist.shape[-1]),
        classes,
        min_ratio=min_ratio,
        num_classes=num_classes,
        ignore_index=ignore_index,
    ).to(dist.dtype)
    return (dist * mask).sum() / mask.sum().clamp_min(1.0)
