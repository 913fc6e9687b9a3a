"""Tests for the EMA teacher (copy-init, warm-up EMA, BatchNorm modes) and pseudo-labels."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dida.adapt.teacher import EMATeacher, pseudo_label, pseudo_label_from_probs


def _tiny_student() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Conv2d(4, 2, 1)
    )


def _perturb_(model: nn.Module, seed: int) -> None:
    """Change params randomly and BN running stats through a train-mode forward."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
        model.train()
        model(torch.randn(2, 3, 8, 8, generator=g) * 3 + 1)


class _Wrapper(nn.Module):
    """Stands in for DDP: the real model sits in `.module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_ema_alpha_warmup() -> None:
    teacher = EMATeacher(_tiny_student(), alpha=0.999)
    assert teacher.ema_alpha(0) == 0.0
    assert teacher.ema_alpha(1) == pytest.approx(0.5)
    assert teacher.ema_alpha(9) == pytest.approx(0.9)
    assert teacher.ema_alpha(998) == pytest.approx(1 - 1 / 999, abs=1e-12)
    assert teacher.ema_alpha(999) == pytest.approx(0.999, abs=1e-12)
    assert teacher.ema_alpha(40000) == pytest.approx(0.999)
    assert EMATeacher(_tiny_student(), alpha=0.99).ema_alpha(5000) == pytest.approx(0.99)


def test_iteration_zero_copies_params_and_all_buffers() -> None:
    student = _tiny_student()
    teacher = EMATeacher(student)
    _perturb_(student, seed=1)
    bn_s = student[1]
    assert int(bn_s.num_batches_tracked) == 1
    teacher.update(student, iteration=0)
    for t, s in zip(
        teacher.model.state_dict().values(), student.state_dict().values(), strict=True
    ):
        assert torch.equal(t, s)


def test_ema_math_on_params_and_bn_buffers() -> None:
    student = _tiny_student()
    teacher = EMATeacher(student, alpha=0.999, bn="running")
    teacher.update(student, iteration=0)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    _perturb_(student, seed=2)
    _perturb_(student, seed=3)
    for it in (1, 5000):
        a = teacher.ema_alpha(it)
        teacher.update(student, iteration=it)
        after = teacher.model.state_dict()
        for key, s in student.state_dict().items():
            if key.endswith("num_batches_tracked"):
                assert torch.equal(after[key], s)  # integer buffer: copied, not averaged
            else:
                assert torch.allclose(after[key], a * before[key] + (1 - a) * s, atol=1e-6), key
        before = {k: v.clone() for k, v in after.items()}
    # the BN running stats did move toward the student
    assert not torch.equal(teacher.model[1].running_mean, torch.zeros(4))


def test_update_accepts_ddp_style_wrapper() -> None:
    student = _tiny_student()
    teacher = EMATeacher(_Wrapper(student))
    assert isinstance(teacher.model, nn.Sequential)
    _perturb_(student, seed=4)
    teacher.update(_Wrapper(student), iteration=0)
    assert torch.equal(teacher.model[0].weight, student[0].weight)


def test_update_rejects_a_different_model() -> None:
    teacher = EMATeacher(_tiny_student())
    with pytest.raises(ValueError, match="student does not match"):
        teacher.update(nn.Linear(2, 2), iteration=3)


def test_batch_mode_averages_parameters_only() -> None:
    student = _tiny_student()
    teacher = EMATeacher(student, alpha=0.999, bn="batch")
    _perturb_(student, seed=5)
    teacher.update(student, iteration=0)  # iteration 0 copies everything
    stats = teacher.model[1].running_mean.clone()
    _perturb_(student, seed=6)
    a = teacher.ema_alpha(7)
    before = teacher.model[0].weight.clone()
    teacher.update(student, iteration=7)
    torch.testing.assert_close(teacher.model[0].weight, a * before + (1 - a) * student[0].weight)
    assert torch.equal(teacher.model[1].running_mean, stats)  # buffers are not averaged
    assert not torch.equal(student[1].running_mean, stats)


@pytest.mark.parametrize("with_segmentor", [False, True])
def test_batch_mode_teacher_equals_student_train_forward(with_segmentor: bool) -> None:
    """The teacher's output is the student's train-mode forward with dropout/drop path off."""
    if with_segmentor:
        from dida.models import build_segmentor

        student = build_segmentor("mit_tiny", num_classes=3, embed_dim=8, dilations=(1, 2))
        x = torch.randn(3, 3, 32, 32)
    else:
        student = _tiny_student()
        x = torch.randn(3, 3, 8, 8) * 2 + 1
    _perturb_bn_(student)
    teacher = EMATeacher(student, bn="batch")
    teacher.update(student, iteration=0)
    buffers = [b.clone() for b in teacher.model.buffers()]
    out = teacher(x)
    student.train()
    # dropout and drop path (it follows the MiT encoder's mode) off, BatchNorm in train mode
    for m in student.modules():
        if isinstance(m, nn.Dropout | nn.Dropout2d) or type(m).__name__ in ("DropPath", "MiT"):
            m.eval()
    with torch.no_grad():
        expected = student(x)
    for got, want in zip(_as_tuple(out), _as_tuple(expected), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a second call is identical (no randomness) and running statistics never move
    for got, want in zip(_as_tuple(teacher(x)), _as_tuple(out), strict=True):
        assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(teacher.model.buffers(), buffers, strict=True))
    # ... and differs from the eval-mode (running statistics) teacher
    running = EMATeacher(student, bn="running")
    assert not torch.allclose(_as_tuple(running(x))[0], _as_tuple(out)[0])


def _perturb_bn_(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(9)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _as_tuple(x: object) -> tuple:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def test_teacher_bn_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="BatchNorm mode"):
        EMATeacher(_tiny_student(), bn="sync")


def test_teacher_stays_in_eval_and_gets_no_grad() -> None:
    student = _tiny_student()
    teacher = EMATeacher(student, bn="running")
    teacher.train()
    assert teacher.training
    assert all(not m.training for m in teacher.model.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 8, 8)
    out1, out2 = teacher(x), teacher(x)
    assert torch.equal(out1, out2)  # dropout off, BN uses running stats
    assert not out1.requires_grad
    loss = student(x).sum() + out1.sum()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    # a parent module's .train() must not switch the teacher either
    parent = nn.ModuleDict({"teacher": teacher}).train()
    assert parent.training and not teacher.model[2].training


def _crafted_logits() -> torch.Tensor:
    logits = torch.zeros(2, 3, 8, 4)  # uniform probs 1/3: not confident, argmax 0
    logits[0, 1, :4] = 10.0  # image 0, rows 0..3: class 1 with prob ~0.9999
    return logits


def test_pseudo_label_weight_and_row_crop() -> None:
    label, weight = pseudo_label(_crafted_logits(), threshold=0.968, ignore_top=2, ignore_bottom=3)
    assert label.dtype == torch.int64 and label.shape == (2, 8, 4)
    assert weight.dtype == torch.float32 and weight.shape == (2, 8, 4)
    assert torch.all(label[0, :4] == 1) and torch.all(label[0, 4:] == 0)
    q = 16 / 64  # confident pixels over ALL pixels of the batch
    expected = torch.zeros(2, 8, 4)
    expected[:, 2:5] = q  # rows 0, 1 (top) and 5, 6, 7 (bottom) are zeroed
    assert torch.allclose(weight, expected)


def test_pseudo_label_threshold_is_inclusive_and_float32_softmax() -> None:
    probs = torch.tensor([0.5, 0.25, 0.25]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    _, weight = pseudo_label_from_probs(probs, threshold=0.5, ignore_top=0, ignore_bottom=0)
    assert torch.allclose(weight, torch.ones(1, 2, 2))
    logits = torch.randn(2, 4, 6, 5).to(torch.bfloat16)
    label, weight = pseudo_label(logits)
    assert weight.dtype == torch.float32 and weight.shape == (2, 6, 5)
    assert torch.equal(label, torch.softmax(logits.float(), dim=1).argmax(1))


@pytest.mark.parametrize(("top", "bottom"), [(15, 120), (0, 0), (8, 0), (0, 8), (3, 100)])
def test_pseudo_label_small_crops(top: int, bottom: int) -> None:
    h = 8
    _, weight = pseudo_label(_crafted_logits(), ignore_top=top, ignore_bottom=bottom)
    kept_rows = (weight[0, :, 0] > 0).nonzero().flatten().tolist()
    assert kept_rows == list(range(min(top, h), max(h - bottom, 0)))
    assert math.isfinite(weight.sum().item())


def _q_worker(rank: int, world: int, port: int, out: dict) -> None:
    from conftest import gloo_group

    with gloo_group(rank, world, port):
        probs = torch.full((1, 2, 4, 4), 0.5)
        probs[0, 0, : 1 + 2 * rank] = 1.0  # rank 0: 4 confident pixels, rank 1: 12
        _, weight = pseudo_label_from_probs(probs, 0.968, 0, 0)
        out[rank] = float(weight[0, 0, 0])


def test_pseudo_weight_is_the_global_fraction_under_ddp() -> None:
    """2 GPUs × batch 1 get the confident fraction of the whole batch of 2, as one GPU would."""
    import torch.multiprocessing as mp
    from conftest import run_two_ranks

    out = mp.Manager().dict()
    run_two_ranks(_q_worker, out)
    assert out[0] == out[1] == pytest.approx((4 + 12) / 32)


def test_self_training_off_forces_zero_pseudo_weight() -> None:
    """`method.teacher.self_training=false`: the mixed loss gets no target pixels (ablation)."""
    import dataclasses

    from dida.adapt.daformer import DAFormer
    from dida.config import MethodConfig
    from dida.models import build_segmentor

    student = build_segmentor("mit_tiny", num_classes=3, embed_dim=8, dilations=(1, 2))
    with torch.no_grad():
        student.head.conv_seg.bias.copy_(torch.tensor([30.0, 0.0, 0.0]))  # confident everywhere
    cfg = MethodConfig(name="daformer")
    cfg.teacher.ignore_top = cfg.teacher.ignore_bottom = 0
    img = torch.randn(2, 3, 32, 32)
    on = DAFormer(student, cfg, num_classes=3).pseudo_labels(img)
    assert on.weight.amax() > 0.9
    no_st = dataclasses.replace(cfg.teacher, self_training=False)
    off_cfg = dataclasses.replace(cfg, teacher=no_st)
    off = DAFormer(student, off_cfg, num_classes=3).pseudo_labels(img)
    assert (off.weight == 0).all() and torch.equal(off.label, on.label)
