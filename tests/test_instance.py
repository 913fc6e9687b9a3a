"""Tests for instance similarities, gather/scatter interactions and the instance loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dida.adapt.instance import (
    calibrate_similarity,
    chunk_rows,
    instance_loss,
    instance_similarity,
    normalise_similarity,
    smooth_probs,
)

B, D, H, W, K, C = 2, 8, 6, 5, 12, 4


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.rand(B, D, H, W, generator=g).requires_grad_()
    teacher = torch.rand(B, D, H, W, generator=g)
    bank = torch.rand(K, D, generator=g)
    labels = torch.arange(K) % C
    probs = torch.softmax(torch.randn(B, C, H, W, generator=g), dim=1)
    return student, teacher, bank, labels, probs


def _reference_loss(student, teacher, bank, labels, calib, size, source, mask=None):
    """Upsample-then-dot, everything materialised, as the reference code does."""
    if size != (H, W):
        student = F.interpolate(student, size=size, mode="bilinear", align_corners=False)
        teacher = F.interpolate(teacher, size=size, mode="bilinear", align_corners=False)
        calib = F.interpolate(calib, size=size, mode="bilinear", align_corners=False)
    weak = torch.einsum("bdhw,kd->bkhw", teacher, bank)
    weak = weak / (weak.sum(1, keepdim=True) + 1e-6)
    gathered = calib[:, labels]
    target = weak * (gathered.clamp_min(0) if source == "teacher_probs" else gathered)
    target = target / (target.sum(1, keepdim=True) + 1e-6)
    strong = torch.einsum("bdhw,kd->bkhw", student, bank)
    strong = strong / (strong.sum(1, keepdim=True) + 1e-6)
    per_pixel = -(target * torch.log(strong + 1e-10)).sum(1)
    if mask is None:
        return 0.5 * per_pixel.mean()
    return 0.5 * (per_pixel * mask).sum() / mask.sum()


def test_similarity_is_dot_product() -> None:
    student, _, bank, _, _ = _inputs()
    sim = instance_similarity(student, bank)
    assert sim.shape == (B, K, H, W)
    torch.testing.assert_close(sim[1, 3, 2, 4], student[1, :, 2, 4] @ bank[3])


@pytest.mark.parametrize("normalisation", ["sum", "softmax"])
def test_normalised_similarity_sums_to_one(normalisation: str) -> None:
    student, _, bank, _, _ = _inputs()
    norm = normalise_similarity(instance_similarity(student, bank), normalisation, tau=0.5)
    torch.testing.assert_close(norm.sum(1), torch.ones(B, H, W), rtol=1e-5, atol=1e-5)
    assert (norm >= 0).all()


def test_softmax_temperature() -> None:
    sim = torch.tensor([[1.0, 2.0]]).view(1, 2, 1, 1)
    norm = normalise_similarity(sim, "softmax", tau=0.5)
    torch.testing.assert_close(norm.flatten(), torch.softmax(torch.tensor([2.0, 4.0]), 0))
    with pytest.raises(ValueError, match="normalisation"):
        normalise_similarity(sim, "l2")


def test_zero_embedding_gives_no_nan() -> None:
    _, teacher, bank, labels, probs = _inputs()
    zero = torch.zeros(B, D, H, W, requires_grad=True)
    norm = normalise_similarity(instance_similarity(zero, bank))
    assert torch.isfinite(norm).all() and (norm == 0).all()
    kw = dict(calibrate_source="teacher_probs", safe=True)
    loss = instance_loss(zero, torch.zeros_like(teacher), bank, labels, probs, **kw)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert torch.isfinite(zero.grad).all()
    loss = instance_loss(zero, teacher, bank, labels, probs, **kw)
    assert torch.isfinite(loss) and loss.item() > 0


def test_loss_hand_computed() -> None:
    # one pixel, two bank entries of classes 0 and 1, D = 2
    student = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    teacher = torch.tensor([2.0, 2.0]).view(1, 2, 1, 1)
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    probs = torch.tensor([0.25, 0.75]).view(1, 2, 1, 1)
    # S_s = (1, 3) / 4; S_w = (2, 2) / 4; T ∝ (0.5·0.25, 0.5·0.75) = (0.25, 0.75)
    expected = 0.5 * -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    for safe in (False, True):  # the reference and the safe arithmetic agree here
        loss = instance_loss(student, teacher, bank, labels, probs, eps=0.0, log_eps=0.0, safe=safe)
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        # without calibration T = S_w = (0.5, 0.5)
        loss = instance_loss(
            student, teacher, bank, labels, None, eps=0.0, log_eps=0.0, weight=1.0, safe=safe
        )
        expected_uncal = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
        assert loss.item() == pytest.approx(expected_uncal, rel=1e-6)


@pytest.mark.parametrize("source", ["teacher_probs", "student_mixed_logits"])
@pytest.mark.parametrize("size", [(H, W), (17, 13)])
def test_loss_matches_materialised_reference(source: str, size: tuple[int, int]) -> None:
    student, teacher, bank, labels, probs = _inputs()
    calib = probs if source == "teacher_probs" else torch.randn(B, C, H, W)
    mask = (torch.rand(B, *size) > 0.3).float()
    out_size = None if size == (H, W) else size
    for pixel_mask in (None, mask):
        loss = instance_loss(
            student, teacher, bank, labels, calib, out_size=out_size, pixel_mask=pixel_mask,
            calibrate_source=source, chunk_size=4, safe=True,
        )  # fmt: skip
        ref = _reference_loss(student, teacher, bank, labels, calib, size, source, pixel_mask)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        (grad,) = torch.autograd.grad(loss, student)
        (ref_grad,) = torch.autograd.grad(ref, student)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("safe", [False, True])
def test_compiled_chunks_match_eager(safe: bool) -> None:
    """`compiled=True` (train.compile; a minute of compiling on a CPU) gives the eager loss and
    student gradient: the reference arithmetic (zero normalisers included) and the safe one, at
    input resolution in uneven chunks, calibrated by raw logits, with a pixel mask."""
    student, teacher, bank, labels, _ = _inputs()
    with torch.no_grad():
        student[0, :, 1, 2] = 0.0  # a pixel whose strong normaliser is exactly 0
    logits = torch.randn(B, C, H, W)
    mask = (torch.rand(B, 17, 13) > 0.3).float()
    results = []
    for compiled in (False, True):
        loss = instance_loss(
            student, teacher, bank, labels, logits, out_size=(17, 13), pixel_mask=mask,
            calibrate_source="student_mixed_logits", chunk_size=5, safe=safe, compiled=compiled,
        )  # fmt: skip
        results.append((loss, *torch.autograd.grad(loss, student)))
    (loss, grad), (ref, ref_grad) = results[1], results[0]
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("out_size", [None, (11, 9), (29, 23)])
@pytest.mark.parametrize("safe", [False, True])
@pytest.mark.parametrize("normalisation", ["sum", "softmax"])
def test_chunks_do_not_change_the_bits(
    out_size: tuple[int, int] | None, safe: bool, normalisation: str
) -> None:
    """Loss and student gradient are the same bits for any chunking (and the default CPU one):
    per chunk only the gradient at its output rows is taken, the height resize's backward runs
    once over all rows, and the per-pixel losses are summed as one tensor."""
    student, teacher, bank, labels, _ = _inputs()
    with torch.no_grad():
        student[0, :, 1, 2] = 0.0  # a pixel whose strong normaliser is exactly 0
    logits = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(1))
    size = (H, W) if out_size is None else out_size
    mask = (torch.rand(B, *size, generator=torch.Generator().manual_seed(2)) > 0.3).float()
    results = []
    for n in (0, 1, 3, 100):
        loss = instance_loss(
            student, teacher, bank, labels, logits, normalisation=normalisation,
            out_size=out_size, pixel_mask=mask, safe=safe, chunk_size=n,
        )  # fmt: skip
        results.append((loss, *torch.autograd.grad(loss, student)))
        with torch.no_grad():  # the same loss without a gradient
            assert torch.equal(loss, instance_loss(
                student, teacher, bank, labels, logits, normalisation=normalisation,
                out_size=out_size, pixel_mask=mask, safe=safe, chunk_size=n,
            ))  # fmt: skip
    assert torch.isfinite(results[0][0]) and results[0][1].abs().sum() > 0
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert torch.equal(grad, results[0][1])


def test_cpu_chunks_are_cache_sized() -> None:
    """On a CPU, one [R, B, K, W] tensor of a chunk is at most 1 MiB (the quickstart: 8 rows);
    elsewhere the memory budget alone decides (one chunk where the loss fits)."""
    row = 4 * 60 * 128 * 4  # batch 4, K = 60, 128 px wide, float32
    assert chunk_rows(128, row, cpu=True) == 8
    assert chunk_rows(128, row) == 128
    assert chunk_rows(128, row, chunk_size=5, cpu=True) == 5
    assert chunk_rows(512, 2 * 300 * 512 * 4) == 109  # 512x512, batch 2, K = 300: 5 chunks
    assert chunk_rows(128, 4 << 20, cpu=True) == 1  # a row larger than the cache: one at a time


def test_gradients_reach_only_student() -> None:
    student, teacher, bank, labels, probs = _inputs()
    teacher.requires_grad_()
    bank.requires_grad_()
    probs.requires_grad_()
    loss = instance_loss(student, teacher, bank, labels, probs, out_size=(12, 10))
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and bank.grad is None and probs.grad is None


def test_calibration_reference_logits_can_be_negative() -> None:
    weak = torch.full((1, 2, 1, 1), 0.5)
    logits = torch.tensor([-1.0, 3.0]).view(1, 2, 1, 1)
    labels = torch.tensor([0, 1])
    ref = calibrate_similarity(weak, logits, labels, source="student_mixed_logits", eps=0.0)
    torch.testing.assert_close(ref.flatten(), torch.tensor([-0.5, 1.5]))
    ours = calibrate_similarity(weak, logits, labels, source="teacher_probs", eps=0.0)
    torch.testing.assert_close(ours.flatten(), torch.tensor([0.0, 1.0]))


def test_smooth_probs_convex_combination() -> None:
    _, teacher, bank, labels, probs = _inputs()
    weak = normalise_similarity(instance_similarity(teacher, bank))
    assert smooth_probs(probs, weak, labels, 1.0) is probs
    smoothed = smooth_probs(probs, weak, labels, 0.75)
    torch.testing.assert_close(smoothed.sum(1), torch.ones(B, H, W), rtol=1e-5, atol=1e-5)
    agg = torch.stack([weak[:, labels == c].sum(1) for c in range(C)], dim=1)
    torch.testing.assert_close(smoothed, 0.75 * probs + 0.25 * agg)


def test_loss_rejects_bad_shapes() -> None:
    student, teacher, bank, labels, probs = _inputs()
    with pytest.raises(ValueError, match="bank"):
        instance_loss(student, teacher, bank[:, :-1], labels, probs)
    with pytest.raises(ValueError, match="pixel_mask"):
        instance_loss(student, teacher, bank, labels, probs, pixel_mask=torch.ones(B, H + 1, W))


def test_chunk_arithmetic_keeps_the_bits_of_the_direct_form() -> None:
    """The chunk's width resize runs as one batch of R·B·K channels and its negation after the
    sum over K: the bits of R·B·K one-channel resizes and of −(T·log S) summed, gradients too."""
    from dida.adapt.instance import _widen

    g = torch.Generator().manual_seed(3)
    slab = torch.rand(7, 2, 60, 32, generator=g).requires_grad_()
    got = _widen(slab, 128)
    want = F.interpolate(slab.reshape(-1, 1, 32), 128, mode="linear", align_corners=False)
    want = want.view(7, 2, 60, 128)
    grad = torch.randn(want.shape, generator=g)
    assert torch.equal(got, want)
    assert torch.equal(*(torch.autograd.grad(y, slab, grad)[0] for y in (got, want)))
    x = torch.randn(7, 2, 60, 128, generator=g)
    assert torch.equal(x.sum(dim=2).neg(), (-x).sum(dim=2))
