"""ClassMix: class-mask sampling and mixing of images, labels and pixel weights (METHOD §2.5.12).

Faithful to DACS `get_class_masks`: the candidate classes are the unique labels of the WHOLE source
batch (255 included when present) and every image draws its own half of them.
"""

from __future__ import annotations

import torch


def sample_class_masks(
    labels: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per image, choose ceil(n/2) of the batch's n classes and mask that image's pixels of them.

    Classes are drawn uniformly without replacement, one independent draw per image. Classes that
    do not occur in image b still count as choices for it (as in the reference).

    Shapes:
        labels: [B, H, W] int64
        masks (returned): [B, H, W] float32 with values in {0, 1}
    """
    if labels.dim() != 3 or labels.is_floating_point():
        raise ValueError(
            f"labels must be an integer [B, H, W] tensor, got {labels.dtype} {tuple(labels.shape)}"
        )
    if labels.numel() and labels.min() < 0:
        raise ValueError(f"labels must be non-negative (trainIds or ignore), got {labels.min()}")
    b = labels.shape[0]
    flat = labels.flatten(1)  # [B, H*W]
    present = torch.bincount(flat.flatten()) > 0  # [V]; a bincount instead of a sort (unique)
    classes = present.nonzero().flatten()  # [n], sorted as torch.unique would give
    n = classes.numel()
    n_chosen = (n + 1) // 2
    # argsort of iid uniforms = uniform random permutation; its first n_chosen ranks are chosen
    rng_device = generator.device if generator is not None else labels.device
    scores = torch.rand(b, n, generator=generator, device=rng_device).to(labels.device)  # [B, n]
    ranks = scores.argsort(dim=1).argsort(dim=1)  # [B, n] rank of each class per image
    table = torch.zeros(b, present.numel(), device=labels.device)  # [B, V] label value -> chosen
    table[:, classes] = (ranks < n_chosen).float()
    masks = table.gather(1, flat)  # [B, H*W]
    return masks.view_as(labels)  # [B, H, W]


def mix(masks: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Return `mask * src + (1 - mask) * tgt`, broadcasting the mask over channel dims.

    Integer inputs (labels) are selected with the mask and keep their dtype.

    Shapes:
        masks: [B, H, W]
        src, tgt: [B, ..., H, W] (e.g. images [B, 3, H, W], labels [B, H, W], weights [B, H, W])
        returned: same as src
    """
    if src.shape != tgt.shape or src.dtype != tgt.dtype:
        raise ValueError(
            f"src and tgt must match: {src.dtype} {tuple(src.shape)} vs "
            f"{tgt.dtype} {tuple(tgt.shape)}"
        )
    if masks.dim() != 3 or src.dim() < 3 or src.shape[0] != masks.shape[0]:
        raise ValueError(
            f"masks must be [B, H, W] and src [B, ..., H, W], got {tuple(masks.shape)} "
            f"and {tuple(src.shape)}"
        )
    if src.shape[-2:] != masks.shape[-2:]:
        raise ValueError(
            f"spatial sizes differ: masks {tuple(masks.shape)}, src {tuple(src.shape)}"
        )
    b, h, w = masks.shape
    m = masks.view(b, *([1] * (src.dim() - 3)), h, w)  # [B, 1.., H, W]
    if src.is_floating_point():
        m = m.to(src.dtype)
        return m * src + (1 - m) * tgt
    return torch.where(m > 0.5, src, tgt)
