"""ClassMix: class-mask sampling and mixing of images, labels and pixel weights.

docs/method.md §2.5.

Faithful to DACS `get_class_masks`: the candidate classes are the unique labels of the WHOLE source
batch (255 included when present) and every image draws its own half of them.
"""

from __future__ import annotations

import torch


def sample_class_masks(
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Per image, choose ceil(n/2) of the batch's n classes and mask that image's pixels of them.

    Classes are drawn uniformly without replacement, one independent draw per image. Classes that
    do not occur in image b still count as choices for it (as in the reference).

    With `num_classes`, every label outside [0, num_classes) (the ignore label) is one more
    candidate, and nothing waits for the device: the candidates are a [B, num_classes + 1] table
    whose absent entries rank last. Without it the table spans 0..max(labels) (one host read).

    Shapes:
        labels: [B, H, W] int64
        masks (returned): [B, H, W] float32 with values in {0, 1}
    """
    if labels.dim() != 3 or labels.is_floating_point():
        raise ValueError(
            f"labels must be an integer [B, H, W] tensor, got {labels.dtype} {tuple(labels.shape)}"
        )
    if num_classes is None:
        if labels.numel() and labels.min() < 0:
            raise ValueError(
                f"labels must be non-negative (trainIds or ignore), got {labels.min()}"
            )
        bins, values = labels, int(labels.max()) + 1 if labels.numel() else 1
    else:
        valid = (labels >= 0) & (labels < num_classes)
        bins, values = torch.where(valid, labels, num_classes), num_classes + 1
    b = labels.shape[0]
    flat = bins.flatten(1)  # [B, H*W]
    seen = torch.zeros(values, device=labels.device).index_fill_(0, flat.flatten(), 1.0)
    present = seen > 0  # [V] label values of the whole batch
    n_chosen = (present.sum() + 1) // 2  # ceil(n / 2), on the device
    # argsort of iid uniforms = uniform random permutation; absent values rank after the present
    # ones, so the first n_chosen ranks are a uniform choice among the present classes
    rng_device = generator.device if generator is not None else labels.device
    scores = torch.rand(b, values, generator=generator, device=rng_device).to(labels.device)
    scores = scores.masked_fill(~present, 2.0)  # [B, V]
    ranks = scores.argsort(dim=1).argsort(dim=1)  # [B, V] rank of each value per image
    table = (ranks < n_chosen).float()  # [B, V] label value -> chosen
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
