"""EMA teacher and its confidence-weighted pseudo-labels (DACS; docs/method.md §1.1, §2.2, §2.3).

Two BatchNorm modes (`method.teacher.bn`):

* `batch` (the reference, default): the teacher runs like the student in train mode, but with
  dropout and drop path off; its BatchNorm layers normalise with the statistics of the batch they
  see (the target batch) and never update running statistics. Only parameters are averaged.
* `running`: the teacher is in eval mode, BatchNorm uses running statistics, and those buffers are
  EMA'd with the parameters.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dida.eval.inference import class_max
from dida.models.precision import LowPrecisionCopy

BN_MODES = ("batch", "running")


def _unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside DDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def set_batch_norm_mode_(model: nn.Module, bn: str) -> nn.Module:
    """Inference mode for `model`, except BatchNorm in `batch` mode (batch statistics, no update).

    Every other module (dropout, drop path, ...) is in eval mode. In `batch` mode each BatchNorm
    layer is in train mode with `track_running_stats=False`: it normalises with the statistics of
    its current input and leaves its running buffers alone.
    """
    if bn not in BN_MODES:
        raise ValueError(f"teacher BatchNorm mode '{bn}': expected one of {BN_MODES}")
    model.eval()
    if bn == "batch":
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.train()
                m.track_running_stats = False
    return model


class EMATeacher(nn.Module):
    """Exponential-moving-average copy of a student segmentor, frozen, never in training mode.

    Args:
        student: the model to copy (DDP / compile wrappers are unwrapped).
        alpha: the EMA momentum cap.
        bn: `batch` (reference) or `running`; see the module docstring.

    Example:
        >>> teacher = EMATeacher(student, alpha=0.999)
        >>> teacher.update(student, iteration=step)  # by the engine, once per iteration
        >>> out = teacher(target_img)                 # no graph is built
    """

    def __init__(self, student: nn.Module, alpha: float = 0.999, bn: str = "batch") -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"EMA alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.bn = bn
        self.model = copy.deepcopy(_unwrap(student))
        self.model.requires_grad_(False)
        set_batch_norm_mode_(self.model, bn)
        self.low_precision: LowPrecisionCopy | None = None

    def use_low_precision_copy(self, dtype: torch.dtype) -> None:
        """Keep a `dtype` copy of the matmul/conv weights for forwards under autocast to `dtype`
        (refreshed by every `update`); call it after moving the teacher to its device."""
        self.low_precision = LowPrecisionCopy(self.model, dtype)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, bn={self.bn}"

    def train(self, mode: bool = True) -> EMATeacher:
        """Record `mode` on the wrapper; the copied model keeps its teacher mode."""
        self.training = mode
        set_batch_norm_mode_(self.model, self.bn)
        if self.low_precision is not None:
            set_batch_norm_mode_(self.low_precision.module, self.bn)
        return self

    def load_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        result = super().load_state_dict(*args, **kwargs)
        if self.low_precision is not None:
            self.low_precision.refresh()
        return result

    def forward(self, img: torch.Tensor, **kwargs) -> object:  # noqa: ANN003
        """Run the teacher without building a graph; returns whatever the wrapped model returns
        (`kwargs` go to the model, e.g. `full_output=True` of an HRDA segmentor).

        Shapes:
            img: [B, 3, H, W]
        """
        model = self.model
        if self.low_precision is not None:
            model = self.low_precision.select(model, img.device.type)
        with torch.no_grad():
            return model(img, **kwargs)

    def ema_alpha(self, iteration: int) -> float:
        """Momentum with DACS warm-up: `min(1 - 1 / (iteration + 1), alpha)`."""
        return min(1.0 - 1.0 / (iteration + 1), self.alpha)

    @torch.no_grad()
    def update(self, student: nn.Module, iteration: int) -> None:
        """Copy the student (parameters and buffers) at iteration 0, EMA it afterwards.

        `batch` mode averages parameters only (the reference); `running` mode also averages float
        buffers (BatchNorm running statistics). Integer buffers are copied, never averaged.
        """
        student = _unwrap(student)
        t_params, s_params = list(self.model.parameters()), list(student.parameters())
        t_bufs, s_bufs = list(self.model.buffers()), list(student.buffers())
        if len(t_params) != len(s_params) or len(t_bufs) != len(s_bufs):
            raise ValueError(
                f"student does not match the teacher: {len(s_params)} params/{len(s_bufs)} "
                f"buffers, expected {len(t_params)}/{len(t_bufs)}"
            )
        if iteration == 0:
            torch._foreach_copy_(t_params + t_bufs, [s.detach() for s in s_params + s_bufs])
        else:
            if self.bn == "batch":  # a batch-statistics teacher never reads its BN buffers
                t_bufs, s_bufs = [], []
            floats = [t.is_floating_point() for t in t_bufs]
            ema_t = t_params + [t for t, f in zip(t_bufs, floats, strict=True) if f]
            ema_s = [s.detach() for s in s_params]
            ema_s += [s for s, f in zip(s_bufs, floats, strict=True) if f]
            torch._foreach_lerp_(ema_t, ema_s, 1.0 - self.ema_alpha(iteration))
            ints = [(t, s) for t, s, f in zip(t_bufs, s_bufs, floats, strict=True) if not f]
            if ints:
                torch._foreach_copy_([t for t, _ in ints], [s for _, s in ints])
        if self.low_precision is not None:
            self.low_precision.refresh()


def pseudo_label(
    teacher_logits: torch.Tensor,
    threshold: float = 0.968,
    ignore_top: int = 15,
    ignore_bottom: int = 120,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels with the DACS batch-wide confidence weight.

    The weight is the fraction q of all pixels in the batch whose max probability is >= `threshold`,
    the same value everywhere, except the first `ignore_top` and last `ignore_bottom` rows (set to
    0; clamped to the crop height). The softmax is computed in float32 whatever the logits' dtype.

    Returns:
        `(pseudo_label, pseudo_weight)`.

    Shapes:
        teacher_logits: [B, C, H, W]
        pseudo_label: [B, H, W] int64; pseudo_weight: [B, H, W] float32
    """
    if teacher_logits.dim() != 4:
        raise ValueError(f"teacher_logits must be [B, C, H, W], got {tuple(teacher_logits.shape)}")
    probs = torch.softmax(teacher_logits.detach().float(), dim=1)
    return pseudo_label_from_probs(probs, threshold, ignore_top, ignore_bottom)


def pseudo_label_from_probs(
    probs: torch.Tensor,
    threshold: float = 0.968,
    ignore_top: int = 15,
    ignore_bottom: int = 120,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`pseudo_label` on class probabilities that are already computed (e.g. refined by DIDA).

    Under torch.distributed the confident fraction q is averaged over the ranks, so that it is the
    fraction of the whole (global) batch, as on one GPU.

    Shapes:
        probs: [B, C, H, W]
        pseudo_label: [B, H, W] int64; pseudo_weight: [B, H, W] float32
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be [B, C, H, W], got {tuple(probs.shape)}")
    if ignore_top < 0 or ignore_bottom < 0:
        raise ValueError(f"ignore_top/ignore_bottom must be >= 0, got {ignore_top}/{ignore_bottom}")
    b, _, h, w = probs.shape
    max_prob, label = class_max(probs.detach())  # [B, H, W] each
    q = (max_prob >= threshold).float().mean()
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(q)  # equal batch sizes on every rank: the mean is the global fraction
        q = q / dist.get_world_size()
    rows = torch.arange(h, device=probs.device)
    keep_row = (rows >= min(ignore_top, h)) & (rows < max(h - ignore_bottom, 0))  # [H]
    weight = (q * keep_row.float())[None, :, None].expand(b, h, w).contiguous()  # [B, H, W]
    return label, weight
