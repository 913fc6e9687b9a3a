"""AdamW with DAFormer's parameter groups and the poly LR schedule with linear warmup.

docs/method.md §2.8 gives the groups and the schedule.

The schedule is a pure function of the iteration, so resuming needs nothing but the iteration.
"""

from __future__ import annotations

import torch
from torch import nn

from dida.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split parameters as mmcv's constructor did for DAFormer: first matching key wins.

    `pos_block` → no weight decay; `head` → lr × head_lr_mult; `norm` → no weight decay; the rest →
    base lr and weight decay. Each group remembers its `base_lr` for the schedule.
    """
    rules = [  # longer keys first, ties alphabetical (mmcv DefaultOptimizerConstructor)
        ("pos_block", 1.0, 0.0),
        ("head", cfg.head_lr_mult, 1.0),
        ("norm", 1.0, 0.0),
    ]
    buckets: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult, wd_mult = next(((lm, wm) for key, lm, wm in rules if key in name), (1.0, 1.0))
        buckets.setdefault((lr_mult, wd_mult), []).append(param)
    return [
        {
            "params": params,
            "lr": cfg.lr * lr_mult,
            "base_lr": cfg.lr * lr_mult,
            "weight_decay": cfg.weight_decay * wd_mult,
        }
        for (lr_mult, wd_mult), params in sorted(buckets.items())
    ]


def _fused_devices() -> tuple[str, ...]:
    """The device types whose AdamW this torch can fuse (the CPU from torch 2.4 on)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch that moved it: CUDA has had the kernel since 2.0
        return ("cuda",)
    return tuple(_get_fused_kernels_supported_devices())


# devices with a fused AdamW kernel (one kernel per parameter group and step; on this CPU 6x
# faster than the for-loop implementation, equal to ~1e-7)
FUSED_DEVICES = _fused_devices()


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """mmcv's AdamW (docs/method.md §2.8), fused when every parameter lives on a device in
    `FUSED_DEVICES`."""
    groups = param_groups(model, cfg)
    fused = all(p.device.type in FUSED_DEVICES for g in groups for p in g["params"])
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
        fused=fused or None,
    )  # fmt: skip


def lr_at(iteration: int, base_lr: float, cfg: OptimConfig, max_iters: int) -> float:
    """Poly decay with power `cfg.power`, preceded by mmcv's linear warmup."""
    coeff = (1.0 - iteration / max_iters) ** cfg.power
    lr = (base_lr - cfg.min_lr) * coeff + cfg.min_lr
    if iteration < cfg.warmup_iters:
        k = (1.0 - iteration / cfg.warmup_iters) * (1.0 - cfg.warmup_ratio)
        lr = lr * (1.0 - k)
    return lr


def set_lr(
    optimizer: torch.optim.Optimizer, iteration: int, cfg: OptimConfig, max_iters: int
) -> float:
    """Set every group's lr for `iteration`; returns the lr of the base (×1) group."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(iteration, group["base_lr"], cfg, max_iters)
    return lr_at(iteration, cfg.lr, cfg, max_iters)
