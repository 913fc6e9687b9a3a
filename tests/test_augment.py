"""Tests for photometric augmentation: draws, identity, op semantics, blur parity with kornia."""

from __future__ import annotations

import math

import kornia
import pytest
import torch

from dida.adapt.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    JitterParams,
    apply_color_jitter,
    blur_kernel_size,
    denorm,
    gaussian_blur,
    renorm,
    strong_augment,
    weak_augment,
)


def _imgs(seed: int = 0, size: int = 64) -> torch.Tensor:
    """Normalised images of a plausible [0, 1] batch."""
    unit = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return renorm(unit)


def _params(**kw: float) -> JitterParams:
    base = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
    base.update(kw)
    return JitterParams(
        **{k: torch.tensor([v]) for k, v in base.items()}, order=torch.tensor([[0, 1, 2, 3]])
    )


def test_denorm_renorm_roundtrip() -> None:
    x = _imgs()
    assert torch.allclose(renorm(denorm(x)), x, atol=1e-5)
    mean_img = torch.zeros(1, 3, 2, 2)
    expected = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) / 255
    assert torch.allclose(denorm(mean_img), expected.expand(1, 3, 2, 2))
    custom = denorm(torch.ones(1, 3, 1, 1), mean=(0.0, 0.0, 0.0), std=torch.tensor([255.0] * 3))
    assert torch.allclose(custom, torch.ones(1, 3, 1, 1))


def test_identity_when_no_op_fires_and_shape_dtype_kept() -> None:
    x = _imgs()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(strong_augment(x, color_jitter_p=1.0, blur=False, generator=g), x)
    y = strong_augment(x, color_jitter_p=0.0, blur=True, generator=g)
    assert y.shape == x.shape and y.dtype == x.dtype and not torch.equal(y, x)
    assert torch.equal(x, _imgs())  # input untouched


def test_deterministic_with_seeded_generator() -> None:
    x = _imgs()
    kw = {"color_jitter_p": 0.0, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    a = strong_augment(x, generator=torch.Generator().manual_seed(3), **kw)
    b = strong_augment(x, generator=torch.Generator().manual_seed(3), **kw)
    c = strong_augment(x, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    w = weak_augment(x, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(w, a)  # same ops, the caller gives the weak view its own draws


def test_blur_fires_about_half_the_time_and_keeps_the_mean() -> None:
    x = _imgs()
    changed = 0
    for seed in range(20):
        y = strong_augment(x, color_jitter_p=1.0, generator=torch.Generator().manual_seed(seed))
        if not torch.equal(y, x):
            changed += 1
            assert abs(y.mean().item() - x.mean().item()) < 1e-2
            assert y.std().item() < x.std().item()
    assert 4 <= changed <= 16


def test_jitter_ops_semantics() -> None:
    gray = torch.full((1, 3, 4, 4), 0.5)
    out = apply_color_jitter(gray, _params(brightness=1.1))
    assert torch.allclose(out, torch.full_like(gray, 0.6))  # additive brightness
    out = apply_color_jitter(gray, _params(contrast=0.5))
    assert torch.allclose(out, torch.full_like(gray, 0.25))  # multiplicative contrast
    assert torch.allclose(apply_color_jitter(gray, _params(brightness=1.8)), torch.ones_like(gray))
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    out = apply_color_jitter(red, _params(hue=1 / 3))  # a third of the hue circle: red → green
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)
    desat = apply_color_jitter(
        torch.tensor([0.8, 0.4, 0.2]).view(1, 3, 1, 1), _params(saturation=0)
    )
    assert torch.allclose(desat.flatten(), torch.full((3,), 0.8), atol=1e-6)  # HSV: v kept


def test_jitter_order_matters_and_brightness_shifts_mean() -> None:
    x = denorm(_imgs())[:1]
    params = _params(brightness=1.15, contrast=0.8)
    b_then_c = apply_color_jitter(x, params)
    reordered = JitterParams(**{**params.__dict__, "order": torch.tensor([[1, 0, 2, 3]])})
    c_then_b = apply_color_jitter(x, reordered)
    assert not torch.allclose(b_then_c, c_then_b)
    brighter = apply_color_jitter(x, _params(brightness=1.1))
    assert brighter.mean().item() > x.mean().item() + 0.05


def test_blur_kernel_size_matches_reference_formula() -> None:
    assert blur_kernel_size(512, None) == 51
    assert blur_kernel_size(64, None) == 7
    assert blur_kernel_size(512) == 11
    assert blur_kernel_size(4, None) == 1
    assert blur_kernel_size(30, None) == 3


@pytest.mark.parametrize(("size", "sigma"), [(64, 0.15), (64, 1.15), (128, 1.15), (128, 0.6)])
def test_blur_equals_kornia_reference_kernel(size: int, sigma: float) -> None:
    x = _imgs(size=size)
    k = blur_kernel_size(size, None)
    ref = kornia.filters.gaussian_blur2d(x, (k, k), (sigma, sigma), border_type="reflect")
    sig = torch.full((2,), sigma)
    assert torch.allclose(gaussian_blur(x, sig, None), ref, atol=1e-5)
    assert torch.allclose(gaussian_blur(x, sig), ref, atol=1e-5)  # capped at 11 (13 at 128)


def test_blur_per_image_sigma_and_constant_image() -> None:
    const = torch.full((2, 3, 16, 16), 0.7)
    assert torch.allclose(gaussian_blur(const, torch.tensor([0.3, 1.1])), const)
    x = _imgs()
    y = gaussian_blur(x, torch.tensor([0.15, 1.15]))
    assert (y[1] - x[1]).abs().mean() > (y[0] - x[0]).abs().mean()
    assert math.isfinite(y.sum().item())


@pytest.mark.parametrize("by_subsets", [True, False])
def test_batched_jitter_equals_each_image_in_its_own_order(by_subsets: bool) -> None:
    """The batched jitter (each op on the images that have it, or on the whole batch and kept
    per image) equals applying each image's four ops in its own order, one image at a time (the
    kornia 0.5.8 loop); the two routes give the same bits."""
    from kornia.enhance import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation

    x = denorm(_imgs(size=16)).repeat(3, 1, 1, 1)[:5]  # 5 images
    g = torch.Generator().manual_seed(0)
    u = lambda lo, hi: torch.rand(5, generator=g) * (hi - lo) + lo  # noqa: E731
    orders = torch.stack([torch.randperm(4, generator=g) for _ in range(5)])
    params = JitterParams(u(0.8, 1.2), u(0.8, 1.2), u(0.8, 1.2), u(-0.2, 0.2), orders)
    out = apply_color_jitter(x, params, by_subsets=by_subsets)
    assert torch.equal(out, apply_color_jitter(x, params, by_subsets=not by_subsets))
    assert any(len(set(orders[:, k].tolist())) > 1 for k in range(4))  # mixed ops at a position
    for i in range(5):
        img, s = x[i : i + 1], slice(i, i + 1)
        ops = [lambda t: adjust_brightness(t, params.brightness[s] - 1),  # noqa: B023
               lambda t: adjust_contrast(t, params.contrast[s]),  # noqa: B023
               lambda t: adjust_saturation(t, params.saturation[s]),  # noqa: B023
               lambda t: adjust_hue(t, params.hue[s] * 2 * math.pi)]  # noqa: B023  # fmt: skip
        for op in orders[i].tolist():
            img = ops[op](img)
        torch.testing.assert_close(out[i : i + 1], img, rtol=0, atol=0)


def test_decisions_and_order_come_from_the_host_generator() -> None:
    """The host generator draws the two decisions and the op order (so the host never reads a
    device draw); the device generator draws only the per-image factors and sigmas."""
    x = _imgs()
    host = torch.Generator().manual_seed(1)
    y = strong_augment(x, color_jitter_p=0.0, generator=torch.Generator().manual_seed(2),
                       host_generator=host)  # fmt: skip
    replay = torch.Generator().manual_seed(1)
    torch.rand(2, generator=replay)  # jitter and blur decisions
    torch.rand(2, 4, generator=replay)  # the op order of the two images
    assert torch.equal(host.get_state(), replay.get_state())
    same = strong_augment(x, color_jitter_p=0.0, generator=torch.Generator().manual_seed(2),
                          host_generator=torch.Generator().manual_seed(1))  # fmt: skip
    other = strong_augment(x, color_jitter_p=0.0, generator=torch.Generator().manual_seed(3),
                           host_generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.equal(y, same) and not torch.equal(y, other)
