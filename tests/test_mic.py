"""MIC: block-mask layout and ratio, the masked view, MIC's per-batch colour/blur augmentation,
separate-teacher pseudo-labels and the masked loss for a Segmentor and an HRDA segmentor."""

from __future__ import annotations

import pytest
import torch

from dida.adapt.augment import gaussian_blur, sample_jitter_params
from dida.adapt.hrda import hrda_seg_loss
from dida.adapt.losses import pixel_weighted_ce
from dida.adapt.mic import (
    MICAugParams,
    apply_mic_aug,
    block_mask,
    masked_view,
    mic_loss,
    mic_pseudo_labels,
    sample_mic_aug,
)
from dida.config import load_config, mic_block_size
from dida.eval.inference import resize
from dida.models import build_segmentor, segmentor_from_config


def _blocks(mask: torch.Tensor, b: int) -> torch.Tensor:
    """The per-block values of a mask that must be constant on b×b blocks."""
    grid = mask[:, :, ::b, ::b]  # [B, 1, H/b, W/b]
    expanded = grid.repeat_interleave(b, dim=2).repeat_interleave(b, dim=3)
    assert torch.equal(expanded, mask), "mask is not constant on its blocks"
    return grid


def test_block_layout_and_grid_size_in_both_settings() -> None:
    gen = torch.Generator().manual_seed(0)
    for size, b in (((1024, 1024), 64), ((512, 512), 32)):  # MIC(HRDA) and MIC(DAFormer)
        mask = block_mask(2, size, b, 0.7, gen)
        assert mask.shape == (2, 1, *size) and mask.dtype == torch.float32
        grid = _blocks(mask, b)
        assert grid.shape == (2, 1, 16, 16)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # per image: the two images get different masks
    assert not torch.equal(grid[0], grid[1])


def test_kept_fraction_is_one_minus_ratio() -> None:
    gen = torch.Generator().manual_seed(1)
    grid = _blocks(block_mask(64, (256, 256), 16, 0.7, gen), 16)  # 16 384 Bernoulli blocks
    assert grid.mean().item() == pytest.approx(0.3, abs=0.02)
    assert block_mask(4, (64, 64), 16, 0.0, gen).min() == 1  # ratio 0: nothing masked
    assert _blocks(block_mask(64, (256, 256), 16, 0.5, gen), 16).mean() == pytest.approx(
        0.5, abs=0.02
    )


def test_rounded_grid_is_stretched_by_nearest_resize() -> None:
    mask = block_mask(3, (100, 64), 32, 0.5, torch.Generator().manual_seed(2))
    # round(100/32) = 3 rows of cells over 100 pixels: nearest source row floor(y·3/100)
    rows = mask[:, 0, :, 0]
    for y in range(100):
        assert torch.equal(rows[:, y], rows[:, (y * 3 // 100) * 34])


def test_masked_view_zeroes_masked_pixels_and_keeps_the_rest() -> None:
    img = torch.randn(2, 3, 64, 64) + 5.0  # no pixel is 0 by chance
    before = img.clone()
    masked, mask = masked_view(img, augment=False, block_size=16, ratio=0.7,
                               generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert torch.equal(img, before)  # input untouched
    keep = mask.expand_as(img).bool()
    assert (masked[~keep] == 0).all() and torch.equal(masked[keep], img[keep])
    again, _ = masked_view(img, augment=False, block_size=16, ratio=0.7,
                           generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert torch.equal(again, masked)


def test_mic_aug_blurs_the_whole_batch_with_one_sigma() -> None:
    img = torch.randn(3, 3, 32, 32)
    out = apply_mic_aug(img, MICAugParams(jitter=None, sigma=0.9))
    torch.testing.assert_close(out, gaussian_blur(img, torch.full((3,), 0.9)))
    assert torch.equal(apply_mic_aug(img, MICAugParams(None, None)), img)
    jitter = sample_jitter_params(3, 0.2, torch.Generator().manual_seed(0))
    jittered = apply_mic_aug(img, MICAugParams(jitter, None))
    assert not torch.allclose(jittered, img)
    both = apply_mic_aug(img, MICAugParams(jitter, 0.5))
    torch.testing.assert_close(both, gaussian_blur(jittered, torch.full((3,), 0.5)))


def test_mic_aug_decisions_are_per_batch_with_the_dacs_probabilities() -> None:
    gen = torch.Generator().manual_seed(5)
    draws = [sample_mic_aug(2, generator=gen) for _ in range(600)]
    jitter = sum(d.jitter is not None for d in draws) / len(draws)
    blur = [d.sigma for d in draws if d.sigma is not None]
    assert jitter == pytest.approx(0.8, abs=0.06)  # jitter iff U(0,1) > p = 0.2
    assert len(blur) / len(draws) == pytest.approx(0.5, abs=0.06)  # blur iff U(0,1) > 0.5
    assert all(0.15 <= s <= 1.15 for s in blur) and isinstance(blur[0], float)
    assert all(d.jitter.brightness.shape == (2,) for d in draws if d.jitter is not None)


def test_masked_view_with_augmentation_equals_aug_then_mask() -> None:
    img = torch.randn(2, 3, 32, 32)
    masked, mask = masked_view(img, augment=True, block_size=8, ratio=0.7,
                               generator=torch.Generator().manual_seed(11))  # fmt: skip
    gen = torch.Generator().manual_seed(11)
    params = sample_mic_aug(2, generator=gen)
    expected_mask = block_mask(2, (32, 32), 8, 0.7, gen)
    torch.testing.assert_close(mask, expected_mask)
    torch.testing.assert_close(masked, apply_mic_aug(img, params) * expected_mask)


def test_separate_teacher_pseudo_labels() -> None:
    probs = torch.softmax(torch.randn(2, 4, 8, 8) * 3, dim=1)
    valid = torch.ones(2, 8, 8)
    valid[:, :2] = 0
    label, weight = mic_pseudo_labels(probs, None, valid)
    assert torch.equal(label, probs.argmax(1)) and torch.equal(weight, valid)
    label, weight = mic_pseudo_labels(probs, 0.9)
    q = (probs.max(1).values >= 0.9).float().mean()
    torch.testing.assert_close(weight, torch.full((2, 8, 8), q.item()))


def test_mic_loss_for_a_segmentor_is_one_weighted_ce() -> None:
    model = build_segmentor("mit_tiny", num_classes=4, embed_dim=16, dilations=(1, 2))
    img = torch.randn(2, 3, 64, 64)
    label = torch.randint(0, 4, (2, 64, 64))
    weight = torch.full((2, 64, 64), 0.6)
    torch.manual_seed(0)
    out = mic_loss(model, img, label, weight, weight=0.5)
    torch.manual_seed(0)
    logits = model(img)[0]
    expected = 0.5 * pixel_weighted_ce(resize(logits, (64, 64)), label, weight)
    torch.testing.assert_close(out.loss, expected)
    assert set(out.terms) == {"masked.loss_seg"} and not out.terms["masked.loss_seg"].requires_grad
    assert out.output[0].shape == (2, 4, 16, 16)
    out.loss.backward()
    assert model.head.conv_seg.weight.grad is not None


@pytest.mark.parametrize("fused_only", [False, True])
def test_mic_loss_for_hrda_splits_fused_and_detail(fused_only: bool) -> None:
    cfg = load_config(None, ["model.variant=mit_tiny", "model.embed_dim=16", "model.num_classes=4",
                             "model.dilations=[1,2]", "model.hrda.enabled=true",
                             "model.hrda.detail_crop=[32,32]",
                             "model.hrda.attention_embed_dim=8"])  # fmt: skip
    model = segmentor_from_config(cfg.model).eval()
    img = torch.randn(2, 3, 64, 64)
    label = torch.randint(0, 4, (2, 64, 64))
    weight = torch.rand(2, 64, 64)
    box = (16, 48, 0, 32)
    out = mic_loss(lambda x: model(x, detail_box=box), img, label, weight, weight=2.0,
                   fused_only=fused_only, detail_weight=0.1)  # fmt: skip
    terms = hrda_seg_loss(model(img, detail_box=box), label, weight, detail_weight=0.1)
    detail_scale = 1.0 if fused_only else 2.0
    torch.testing.assert_close(out.terms["masked.loss_seg"], 2.0 * terms["loss_seg"].detach())
    torch.testing.assert_close(out.terms["masked.hr.loss_seg"],
                               detail_scale * terms["hr.loss_seg"].detach())  # fmt: skip
    torch.testing.assert_close(
        out.loss, 2.0 * terms["loss_seg"] + detail_scale * terms["hr.loss_seg"]
    )
    assert out.output.box == box


def test_block_size_default_follows_resolution() -> None:
    assert mic_block_size(load_config(None, [])) == 32
    assert mic_block_size(load_config(None, ["model.hrda.enabled=true"])) == 64
    assert mic_block_size(load_config(None, ["method.mic.block_size=16"])) == 16


def test_mic_aug_decisions_come_from_the_host_generator() -> None:
    """Decisions, σ and the jitter order are host draws (no wait for a GPU generator); the jitter
    factors come from the device generator."""
    for seed in range(20):
        draws = [sample_mic_aug(2, generator=torch.Generator().manual_seed(100 + k),
                                host_generator=torch.Generator().manual_seed(seed))
                 for k in range(2)]  # fmt: skip
        a, b = draws
        assert (a.jitter is None) == (b.jitter is None) and a.sigma == b.sigma
        if a.jitter is not None:
            assert torch.equal(a.jitter.order, b.jitter.order)
            assert not torch.equal(a.jitter.brightness, b.jitter.brightness)
            return
    pytest.fail("no seed drew jitter")
