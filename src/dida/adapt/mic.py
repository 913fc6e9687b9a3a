"""Masked image consistency (MIC, Hoyer et al., CVPR 2023): a masked, colour-augmented target view
trained with the teacher's pseudo-labels (the reference's `MaskingConsistencyModule`).

Pure functions: the block mask (`BlockMaskGenerator`), MIC's own colour/blur augmentation
(per-batch decisions and one blur σ for the batch, as the reference), the masked view, and the loss
of a student forward on it (one CE for a `Segmentor`, the HRDA fused + detail split for an
`HRDASegmentor`). All randomness comes from an explicit `torch.Generator`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dida.adapt.augment import (
    BLUR_SIGMA_RANGE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JitterParams,
    MeanStd,
    apply_color_jitter,
    denorm,
    gaussian_blur,
    renorm,
    sample_jitter_params,
)
from dida.adapt.hrda import hrda_seg_loss
from dida.adapt.losses import pixel_weighted_ce
from dida.adapt.teacher import pseudo_label_from_probs
from dida.eval.inference import resize
from dida.models.hrda import HRDAOutput

StudentOutput = HRDAOutput | tuple[torch.Tensor, ...]


def _rand(
    n: int, generator: torch.Generator | None, host_generator: torch.Generator | None = None
) -> torch.Tensor:
    """n draws of U(0, 1) on the CPU: from `host_generator`, else from `generator` (on a GPU
    generator the copy to the host waits for the device)."""
    if host_generator is not None:
        return torch.rand(n, generator=host_generator)
    device = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=device).cpu()


def block_mask(
    batch: int,
    size: tuple[int, int],
    block_size: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """MIC block mask: a grid of round(H/b)×round(W/b) cells per image, each kept (1) when its
    U(0, 1) draw exceeds `ratio` (so kept with probability 1 - ratio), nearest-upsampled to H×W.

    Shapes: returns [B, 1, H, W] float32 of 0/1
    """
    h, w = size
    grid = (max(round(h / block_size), 1), max(round(w / block_size), 1))
    rng_device = generator.device if generator is not None else device
    draws = torch.rand(batch, 1, *grid, generator=generator, device=rng_device)  # [B, 1, gh, gw]
    keep = (draws > ratio).float().to(device)
    return F.interpolate(keep, size=(h, w), mode="nearest")


@dataclass(frozen=True)
class MICAugParams:
    """One batch's MIC augmentation: jitter factors and one blur σ (None: that op is off)."""

    jitter: JitterParams | None
    sigma: float | None


def sample_mic_aug(
    batch: int,
    *,
    color_jitter_strength: float = 0.2,
    color_jitter_p: float = 0.2,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    host_generator: torch.Generator | None = None,
) -> MICAugParams:
    """Draw the batch decisions (jitter iff cj > p, blur iff bl > 0.5; blur regardless of
    `method.aug.blur`), per-image jitter factors and one σ ~ U(0.15, 1.15) for the batch.

    What the host branches on (decisions, σ, the jitter order) comes from `host_generator` when
    given (no wait for the device), the jitter factors from `generator` on `device`."""
    cj, bl = _rand(2, generator, host_generator).tolist()
    jitter = None
    if cj > color_jitter_p:
        jitter = sample_jitter_params(
            batch, color_jitter_strength, generator, device, host_generator
        )
    sigma = None
    if bl > 0.5:
        low, high = BLUR_SIGMA_RANGE
        sigma = low + (high - low) * float(_rand(1, generator, host_generator))
    return MICAugParams(jitter, sigma)


def apply_mic_aug(
    imgs: torch.Tensor,
    params: MICAugParams,
    *,
    mean: MeanStd = IMAGENET_MEAN,
    std: MeanStd = IMAGENET_STD,
    max_kernel_size: int | None = 11,
) -> torch.Tensor:
    """Colour jitter then blur with one σ for every image; never in place.

    Shapes: imgs: [B, 3, H, W] normalised -> same
    """
    out = imgs
    if params.jitter is not None:
        out = renorm(apply_color_jitter(denorm(out, mean, std), params.jitter), mean, std)
    if params.sigma is not None:
        sigma = torch.full((imgs.shape[0],), params.sigma, device=imgs.device)
        out = gaussian_blur(out, sigma, max_kernel_size)
    return out


def masked_view(
    tgt_img: torch.Tensor,
    *,
    augment: bool,
    block_size: int,
    ratio: float,
    mean: MeanStd = IMAGENET_MEAN,
    std: MeanStd = IMAGENET_STD,
    color_jitter_strength: float = 0.2,
    color_jitter_p: float = 0.2,
    max_kernel_size: int | None = 11,
    generator: torch.Generator | None = None,
    host_generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MIC input: (optionally) MIC-augmented target images times a block mask; masked pixels
    become 0, the mean colour of the normalised input. `tgt_img` is not modified. Augmentation
    decisions come from `host_generator` if given (`sample_mic_aug`), the mask from `generator`.

    Returns:
        (masked image, mask).

    Shapes: tgt_img: [B, 3, H, W] -> [B, 3, H, W], [B, 1, H, W]
    """
    if tgt_img.dim() != 4 or tgt_img.shape[1] != 3:
        raise ValueError(f"tgt_img must be [B, 3, H, W], got {tuple(tgt_img.shape)}")
    img = tgt_img
    if augment:
        params = sample_mic_aug(
            img.shape[0], color_jitter_strength=color_jitter_strength,
            color_jitter_p=color_jitter_p, generator=generator, device=img.device,
            host_generator=host_generator,
        )  # fmt: skip
        img = apply_mic_aug(img, params, mean=mean, std=std, max_kernel_size=max_kernel_size)
    mask = block_mask(img.shape[0], tuple(img.shape[-2:]), block_size, ratio, generator, img.device)
    return img * mask.to(img.dtype), mask


def mic_pseudo_labels(
    probs: torch.Tensor, threshold: float | None, valid_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels and weights of a separate MIC teacher: the DACS confidence weight q, or 1
    everywhere with `threshold` None; times the valid-pixel mask (HRDA margins) if given.

    Shapes: probs: [B, C, H, W]; valid_mask: [B, H, W] -> label [B, H, W] int64, weight [B, H, W]
    """
    label, weight = pseudo_label_from_probs(
        probs, threshold if threshold is not None else 0.0, 0, 0
    )
    if threshold is None:
        weight = torch.ones_like(weight)
    if valid_mask is not None:
        weight = weight * valid_mask.to(weight.dtype)
    return label, weight


@dataclass
class MICLoss:
    """The masked loss: `loss` to backpropagate, logged `terms`, and the student's `output` on the
    masked image (for extra losses on that view, e.g. DIDA's `compose.mic_view`)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    output: StudentOutput


def mic_loss(
    forward: Callable[[torch.Tensor], StudentOutput],
    masked_img: torch.Tensor,
    pseudo_label: torch.Tensor,
    pseudo_weight: torch.Tensor | None,
    *,
    weight: float = 1.0,
    fused_only: bool = False,
    detail_weight: float = 0.1,
    context_weight: float = 0.0,
    ignore_index: int = 255,
) -> MICLoss:
    """Run the student on the masked image and score it against the (unmixed) pseudo-labels.

    `forward` is the student call: a `Segmentor`-like `(logits, ...)` tuple gives one weighted CE;
    an `HRDAOutput` (a forward with a fresh detail box) gives HRDA's fused + detail terms. λ =
    `weight` scales every term, or only the fused one with `fused_only` (as the
    reference does). All pixels count, masked ones included.

    Shapes:
        masked_img: [B, 3, H, W]; pseudo_label: [B, H, W] int64; pseudo_weight: [B, H, W] or None
    """
    output = forward(masked_img)
    if isinstance(output, HRDAOutput):
        terms = hrda_seg_loss(
            output, pseudo_label, pseudo_weight, detail_weight=detail_weight,
            context_weight=context_weight, ignore_index=ignore_index,
        )  # fmt: skip
    else:
        logits = resize(output[0], pseudo_label.shape[-2:])
        terms = {"loss_seg": pixel_weighted_ce(logits, pseudo_label, pseudo_weight, ignore_index)}
    terms = {k: v * weight if (k == "loss_seg" or not fused_only) else v for k, v in terms.items()}
    loss = torch.stack(list(terms.values())).sum()
    return MICLoss(loss, {f"masked.{k}": v.detach() for k, v in terms.items()}, output)
