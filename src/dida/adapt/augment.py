"""Photometric augmentation of normalised image batches: colour jitter, Gaussian blur.

docs/method.md §2.7 describes the operations.

Reproduces DACS `strong_transform` with kornia 0.5.8 `ColorJitter` semantics: brightness (additive
`factor - 1`), contrast, saturation ~ U[1-s, 1+s] and hue ~ U[-s, s] of the hue circle, applied in a
random order drawn per image, each op clamped to [0, 1]. All randomness comes from explicit
`torch.Generator`s: the per-image factors from the (device) `generator`, the draws the host branches
on (whether an op fires, the op order) from a `host_generator` on the CPU, so that augmenting never
waits for the device.

Blur kernel: the reference uses `floor(ceil(0.1 L) - 0.5 + ceil(0.1 L) mod 2)` per axis (51 at 512).
We cap it at `max_kernel_size=11`: for sigma <= 1.15 the Gaussian mass beyond radius 5 is < 1e-6, so
the result equals the 51x51 blur to ~1e-6 of the [0, 1] range (measured for sigma up to 1.15) at a
fraction of the cost. The blur runs as two 1-D convolutions (the Gaussian is separable).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.enhance import adjust_brightness, adjust_hue, adjust_saturation

from dida.data.transforms import IMG_MEAN, IMG_STD

IMAGENET_MEAN: tuple[float, float, float] = IMG_MEAN
IMAGENET_STD: tuple[float, float, float] = IMG_STD
BLUR_SIGMA_RANGE: tuple[float, float] = (0.15, 1.15)

MeanStd = Sequence[float] | torch.Tensor


def _as_channel_tensor(values: MeanStd, ref: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=ref.dtype, device=ref.device).flatten()
    if t.numel() != ref.shape[1]:
        raise ValueError(f"expected {ref.shape[1]} per-channel values, got {t.numel()}")
    return t.view(1, -1, 1, 1)  # [1, 3, 1, 1]


def denorm(
    imgs: torch.Tensor, mean: MeanStd = IMAGENET_MEAN, std: MeanStd = IMAGENET_STD
) -> torch.Tensor:
    """Map normalised images back to [0, 1]: `(x * std + mean) / 255`; mean/std on the 0..255 scale.

    Shapes:
        imgs: [B, 3, H, W]; returned: [B, 3, H, W]
    """
    return (imgs * _as_channel_tensor(std, imgs) + _as_channel_tensor(mean, imgs)) / 255.0


def renorm(
    imgs: torch.Tensor, mean: MeanStd = IMAGENET_MEAN, std: MeanStd = IMAGENET_STD
) -> torch.Tensor:
    """Inverse of `denorm`: `(x * 255 - mean) / std`.

    Shapes:
        imgs: [B, 3, H, W]; returned: [B, 3, H, W]
    """
    return (imgs * 255.0 - _as_channel_tensor(mean, imgs)) / _as_channel_tensor(std, imgs)


def blur_kernel_size(length: int, max_kernel_size: int | None = 11) -> int:
    """Reference kernel size for one axis, optionally capped (kept odd, and below `length`)."""
    c = math.ceil(0.1 * length)
    k = int(math.floor(c - 0.5 + c % 2))
    if max_kernel_size is not None:
        k = min(k, max_kernel_size)
    # reflect padding needs k // 2 < length
    k = min(k, 2 * ((length - 1) // 2) + 1)
    return max(k, 1)


def _uniform(
    n: int, low: float, high: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    rng_device = generator.device if generator is not None else device
    return (torch.rand(n, generator=generator, device=rng_device) * (high - low) + low).to(device)


def _host_rand(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    host_generator: torch.Generator | None,
) -> torch.Tensor:
    """U[0, 1) draws on the CPU: from `host_generator`, else from `generator` (when that lives
    on a GPU, the copy to the host waits for the device)."""
    if host_generator is not None:
        return torch.rand(shape, generator=host_generator)
    device = generator.device if generator is not None else "cpu"
    return torch.rand(shape, generator=generator, device=device).cpu()


def _gaussian_kernels_1d(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels as in kornia `get_gaussian_kernel1d` (odd `size`).

    Shapes:
        sigma: [B]; returned: [B, size]
    """
    x = torch.arange(size, dtype=sigma.dtype, device=sigma.device) - size // 2  # [size]
    kernel = torch.exp(-(x[None, :] ** 2) / (2.0 * sigma[:, None] ** 2))  # [B, size]
    return kernel / kernel.sum(dim=1, keepdim=True)


def gaussian_blur(
    imgs: torch.Tensor, sigma: torch.Tensor, max_kernel_size: int | None = 11
) -> torch.Tensor:
    """Separable isotropic Gaussian blur with one sigma per image and reflect border.

    Shapes:
        imgs: [B, 3, H, W]; sigma: [B]; returned: [B, 3, H, W]
    """
    b, c, h, w = imgs.shape
    ky, kx = blur_kernel_size(h, max_kernel_size), blur_kernel_size(w, max_kernel_size)
    sigma = sigma.to(imgs.dtype)
    ker_y = _gaussian_kernels_1d(sigma, ky).repeat_interleave(c, dim=0)  # [B*3, ky]
    ker_x = _gaussian_kernels_1d(sigma, kx).repeat_interleave(c, dim=0)  # [B*3, kx]
    x = imgs.reshape(1, b * c, h, w)  # [1, B*3, H, W]: one group per channel of every image
    x = F.pad(x, (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect")
    x = F.conv2d(x, ker_y.view(b * c, 1, ky, 1), groups=b * c)  # [1, B*3, H, W + kx - 1]
    x = F.conv2d(x, ker_x.view(b * c, 1, 1, kx), groups=b * c)  # [1, B*3, H, W]
    return x.view(b, c, h, w)


@dataclass(frozen=True)
class JitterParams:
    """Per-image colour-jitter factors; `hue` is a fraction of the hue circle, `order` op indices.

    Shapes:
        brightness, contrast, saturation, hue: [B]; order: [B, 4] int64 on the CPU
    """

    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor


def sample_jitter_params(
    batch: int,
    strength: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    host_generator: torch.Generator | None = None,
) -> JitterParams:
    """Draw brightness/contrast/saturation ~ U[1-s, 1+s], hue ~ U[-s, s], an op order per image.

    The factors come from `generator` on `device`, the order (which the host needs) from
    `host_generator` (see `_host_rand`).
    """
    dev = torch.device(device)
    s = strength
    brightness = _uniform(batch, max(1 - s, 0.0), 1 + s, generator, dev)
    contrast = _uniform(batch, max(1 - s, 0.0), 1 + s, generator, dev)
    saturation = _uniform(batch, max(1 - s, 0.0), 1 + s, generator, dev)
    hue = _uniform(batch, -s, s, generator, dev)
    scores = _host_rand((batch, 4), generator, host_generator)  # [B, 4]
    order = scores.argsort(dim=1)  # [B, 4] a uniform random permutation per image
    return JitterParams(brightness, contrast, saturation, hue, order)


_JITTER_FACTORS = ("brightness", "contrast", "saturation", "hue")  # op k's field of JitterParams


def adjust_contrast(imgs: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """kornia's `adjust_contrast`: each image times its factor, clamped to [0, 1] (the same
    values), without kornia's check that the factors are non-negative (ours are), which reads
    them back to the host before kornia 0.9, the last release for torch < 2.5.1: a GPU sync.

    Shapes:
        imgs: B×C×H×W, factor: B -> B×C×H×W
    """
    return (imgs * factor.view(-1, 1, 1, 1).to(imgs.dtype)).clamp_(0.0, 1.0)


def _jitter_op(op: int, imgs: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Jitter op `op` (0 brightness, 1 contrast, 2 saturation, 3 hue) on every image of `imgs`,
    each with its own entry of `factor` (`JitterParams`' field `_JITTER_FACTORS[op]`)."""
    if op == 0:
        return adjust_brightness(imgs, factor - 1)
    if op == 1:
        return adjust_contrast(imgs, factor)
    if op == 2:
        return adjust_saturation(imgs, factor)
    return adjust_hue(imgs, factor * 2 * math.pi)


def _jitter_by_subsets(
    imgs: torch.Tensor, ops: list[int], factors: list[torch.Tensor]
) -> torch.Tensor:
    """Each op on the images whose op it is (`ops`: image i's op; `factors`: op k's per-image
    factors), gathered and scattered back: per-pixel ops, so the same values as on the whole
    batch."""
    out = torch.empty_like(imgs)
    for op in sorted(set(ops)):
        index = torch.tensor([i for i, o in enumerate(ops) if o == op], device=imgs.device)
        factor = factors[op].index_select(0, index)
        out.index_copy_(0, index, _jitter_op(op, imgs.index_select(0, index), factor))
    return out


def apply_color_jitter(
    imgs: torch.Tensor, params: JitterParams, *, by_subsets: bool | None = None
) -> torch.Tensor:
    """Apply the four kornia ops per image in that image's order, each clamped to [0, 1].

    Brightness is additive (`+ factor - 1`), contrast multiplicative, saturation scales the HSV
    saturation, hue rotates by `hue * 2π` radians (kornia 0.5.8 `ColorJitter.apply_transform`).
    Batched, no loop over images: at each of the four positions an op that every image has there
    runs on the whole batch. Otherwise, with `by_subsets` (the default on a CPU), each op runs on
    the images that have it there only (the same bits, less work: the quickstart's 4×3×128×128
    jitter takes 4.3 against 9.9 ms, measured); without (the default on a GPU: fewer launches,
    no host-to-device index copies) every op some image has runs on the whole batch and each
    image keeps the result of its own op.

    Shapes:
        imgs: [B, 3, H, W] in [0, 1]; returned: [B, 3, H, W]
    """
    if by_subsets is None:
        by_subsets = imgs.device.type == "cpu"
    factors = [getattr(params, name) for name in _JITTER_FACTORS]
    order_dev = None
    out = imgs
    for position in range(params.order.shape[1]):
        ops = params.order[:, position].tolist()  # from the host
        present = sorted(set(ops))
        if len(present) == 1:
            out = _jitter_op(present[0], out, factors[present[0]])
            continue
        if by_subsets:
            out = _jitter_by_subsets(out, ops, factors)
            continue
        if order_dev is None:
            order_dev = params.order.to(imgs.device, non_blocking=True)
        mixed = out
        for op in present:
            hit = (order_dev[:, position] == op).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
            mixed = torch.where(hit, _jitter_op(op, out, factors[op]), mixed)
        out = mixed
    return out


def color_jitter(
    imgs: torch.Tensor,
    strength: float,
    generator: torch.Generator | None = None,
    host_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """kornia-0.5.8-style ColorJitter on [0, 1] images, factors and op order drawn per image.

    Shapes:
        imgs: [B, 3, H, W] in [0, 1]; returned: [B, 3, H, W]
    """
    params = sample_jitter_params(
        imgs.shape[0], strength, generator, imgs.device, host_generator
    )
    return apply_color_jitter(imgs, params)


def strong_augment(
    imgs: torch.Tensor,
    *,
    mean: MeanStd = IMAGENET_MEAN,
    std: MeanStd = IMAGENET_STD,
    color_jitter_strength: float = 0.2,
    color_jitter_p: float = 0.2,
    blur: bool = True,
    generator: torch.Generator | None = None,
    max_kernel_size: int | None = 11,
    host_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DACS strong view: colour jitter iff a batch draw cj > p, then blur iff a draw bl > 0.5.

    The input is never modified in place; when neither op fires it is returned as is. The two
    decisions and the jitter order are host draws (`host_generator`, see `_host_rand`).

    Shapes:
        imgs: [B, 3, H, W] normalised; returned: [B, 3, H, W] normalised
    """
    if imgs.dim() != 4 or imgs.shape[1] != 3 or not imgs.is_floating_point():
        raise ValueError(
            f"imgs must be a float [B, 3, H, W] tensor, got {imgs.dtype} {tuple(imgs.shape)}"
        )
    # one draw per batch for each decision, as the reference draws once per iteration
    cj, bl = _host_rand((2,), generator, host_generator).tolist()
    out = imgs
    if cj > color_jitter_p:
        jittered = color_jitter(
            denorm(out, mean, std), color_jitter_strength, generator, host_generator
        )
        out = renorm(jittered, mean, std)
    if blur and bl > 0.5:
        sigma = _uniform(imgs.shape[0], *BLUR_SIGMA_RANGE, generator, imgs.device)
        out = gaussian_blur(out, sigma, max_kernel_size)
    return out


def weak_augment(imgs: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: ANN003
    """Optional weak (teacher) view: `strong_augment`'s ops and arguments with their own draws
    (the reference's weak augmentation is a no-op).

    Shapes:
        imgs: [B, 3, H, W] normalised; returned: [B, 3, H, W] normalised
    """
    return strong_augment(imgs, **kwargs)
