"""AdamW parameter groups and the poly + warmup schedule (DAFormer's schedule)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dida.config import OptimConfig
from dida.engine.optim import FUSED_DEVICES, build_optimizer, lr_at, param_groups, set_lr


@pytest.mark.parametrize(
    ("iteration", "expected"),
    [(0, 6e-11), (1500, 5.775e-5), (20000, 3e-5), (39999, 1.5e-9)],
)
def test_lr_schedule_matches_reference_values(iteration: int, expected: float) -> None:
    cfg = OptimConfig()
    assert lr_at(iteration, cfg.lr, cfg, 40000) == pytest.approx(expected, rel=1e-3)
    assert lr_at(iteration, cfg.lr * 10, cfg, 40000) == pytest.approx(10 * expected, rel=1e-3)


def test_warmup_is_linear_and_continuous() -> None:
    cfg = OptimConfig()
    lrs = [lr_at(i, cfg.lr, cfg, 40000) for i in range(0, 1501, 250)]
    assert all(a < b for a, b in zip(lrs, lrs[1:], strict=False))
    # just before the end of warmup the value meets the poly curve
    end_of_warmup = lr_at(1499, cfg.lr, cfg, 40000)
    assert end_of_warmup == pytest.approx(lr_at(1500, cfg.lr, cfg, 40000), rel=1e-3)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.block1 = nn.Linear(4, 4)
        self.encoder.norm1 = nn.LayerNorm(4)
        self.head = nn.Module()
        self.head.conv_seg = nn.Conv2d(4, 3, 1)
        self.head.bn = nn.BatchNorm2d(4)


def test_param_groups_follow_mmcv_rules() -> None:
    cfg = OptimConfig()
    model = _Toy()
    groups = param_groups(model, cfg)
    by_id = {id(p): g for g in groups for p in g["params"]}
    enc_w = by_id[id(model.encoder.block1.weight)]
    assert enc_w["lr"] == pytest.approx(6e-5) and enc_w["weight_decay"] == pytest.approx(0.01)
    norm = by_id[id(model.encoder.norm1.weight)]
    assert norm["lr"] == pytest.approx(6e-5) and norm["weight_decay"] == 0.0
    head = by_id[id(model.head.conv_seg.weight)]
    assert head["lr"] == pytest.approx(6e-4) and head["weight_decay"] == pytest.approx(0.01)
    # head BN matches "head" first: lr x10 and weight decay kept, as in the reference
    head_bn = by_id[id(model.head.bn.weight)]
    assert head_bn["lr"] == pytest.approx(6e-4) and head_bn["weight_decay"] == pytest.approx(0.01)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_set_lr_scales_every_group() -> None:
    cfg = OptimConfig()
    model = _Toy()
    opt = build_optimizer(model, cfg)
    base = set_lr(opt, 20000, cfg, 40000)
    assert base == pytest.approx(3e-5)
    lrs = sorted({round(g["lr"], 12) for g in opt.param_groups})
    assert lrs == [pytest.approx(3e-5), pytest.approx(3e-4)]
    assert isinstance(opt, torch.optim.AdamW)


def test_optimizer_is_fused_and_equals_the_for_loop_adamw() -> None:
    cfg = OptimConfig(lr=1e-3, warmup_iters=0)
    models = [nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer(models[0], cfg)
    # fused where this torch has the CPU kernel (2.4 on), the for-loop AdamW before
    assert bool(fused.defaults["fused"]) == ("cpu" in FUSED_DEVICES)
    assert "cpu" in FUSED_DEVICES or torch.__version__ < "2.4"
    loop = torch.optim.AdamW(param_groups(models[1], cfg), lr=cfg.lr, betas=tuple(cfg.betas),
                             weight_decay=cfg.weight_decay, foreach=False)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
