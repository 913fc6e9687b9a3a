"""Low-precision weight copies of frozen or EMA models, for forwards under autocast, and the
trained model's weights cast in one multi-tensor copy per forward (`TrainedWeightCast`).

Autocast casts a layer's fp32 weights to bf16/fp16 on every call; it caches the casts of trainable
weights only, so a frozen model (the EMA teacher, the ImageNet encoder of the feature distance)
pays one cast kernel per weight on every forward. A `LowPrecisionCopy` holds those weights already
cast; autocast finds them in its dtype and casts nothing. The weights it casts itself are
rounded the same way, so the outputs are identical.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

# layers whose weights autocast casts (matmul and convolution); norms keep their fp32 weights
CAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# torch < 2.4 has no per-device `torch.is_autocast_enabled(device)` / `get_autocast_dtype`
_PER_DEVICE_AUTOCAST_API = hasattr(torch, "get_autocast_dtype")
_autocast_available = getattr(torch.amp, "is_autocast_available", lambda device_type: True)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on `device_type` (`cpu`, `cuda`, ...) where it is on there;
    None where it is off or the device has no autocast (`meta`)."""
    if _PER_DEVICE_AUTOCAST_API:
        if _autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None
    if device_type == "cpu" and torch.is_autocast_cpu_enabled():
        return torch.get_autocast_cpu_dtype()
    if device_type == "cuda" and torch.is_autocast_enabled():
        return torch.get_autocast_gpu_dtype()
    return None


class LowPrecisionCopy:
    """A copy of `model` whose `CAST_LAYERS` weights and biases are stored in `dtype`.

    Every other parameter and buffer is shared with `model` (the same tensors), so only the cast
    weights need `refresh()` (one multi-tensor copy) after `model` changes.

    Example:
        >>> lp = LowPrecisionCopy(teacher, torch.bfloat16)
        >>> with torch.autocast("cuda", dtype=torch.bfloat16):
        ...     out = lp.select(teacher, "cuda")(img)   # the copy under bf16 autocast
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        self.dtype = dtype
        cast = [m for m in model.modules() if isinstance(m, CAST_LAYERS)]
        cast_ids = {id(p) for m in cast for p in m.parameters(recurse=False)}
        shared = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in cast_ids]
        # deepcopy shares whatever its memo already maps: every tensor but the cast weights
        self.module = copy.deepcopy(model, memo={id(t): t for t in shared})
        self.module.requires_grad_(False)
        self._src: list[torch.Tensor] = []
        self._dst: list[torch.Tensor] = []
        for src, dst in zip(model.modules(), self.module.modules(), strict=True):
            if not isinstance(src, CAST_LAYERS):
                continue
            for name, param in src.named_parameters(recurse=False):
                low = nn.Parameter(param.detach().to(dtype), requires_grad=False)
                dst._parameters[name] = low
                self._src.append(param)
                self._dst.append(low)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the current values of the model's cast weights (rounded to `dtype`)."""
        if self._dst:
            torch._foreach_copy_(self._dst, [t.detach() for t in self._src])

    def select(self, model: nn.Module, device_type: str) -> nn.Module:
        """The copy when autocast to `dtype` is on for `device_type`, else `model` itself."""
        if autocast_dtype(device_type) == self.dtype:
            return self.module
        return model


@torch.no_grad()
def cast_weights_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the `CAST_LAYERS` weights and biases of a frozen `model` in `dtype`, in place.

    For a model that only runs under autocast to `dtype` and never changes (the ImageNet encoder
    of the feature distance): the same outputs, without a cast per weight per forward.
    """
    for module in model.modules():
        if isinstance(module, CAST_LAYERS):
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype)
    return model


class _CastWeights(torch.autograd.Function):
    """fp32 weights → `dtype` copies in one multi-tensor copy; their gradients back in one.

    The values autocast's own per-weight casts give (round to nearest even, and the gradient
    cast back exactly), in two launches per forward and backward instead of one per weight.
    """

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.dtypes = [w.dtype for w in weights]
        low = [torch.empty_like(w, dtype=dtype) for w in weights]
        torch._foreach_copy_(low, weights)
        return tuple(low)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):  # type: ignore[override]
        used = [i for i, g in enumerate(grads) if g is not None]
        out: list[torch.Tensor | None] = [None] * len(grads)
        if used:
            full = [torch.empty_like(grads[i], dtype=ctx.dtypes[i]) for i in used]
            torch._foreach_copy_(full, [grads[i] for i in used])
            for i, g in zip(used, full, strict=True):
                out[i] = g
        return (None, *out)


class TrainedWeightCast:
    """Runs a trained model under autocast with its `CAST_LAYERS` weights cast in one go.

    Autocast casts each matmul/conv weight of a trained model with its own kernel (cached within
    one autocast region) and casts each gradient back with another, in every backward: for a
    MiT-B5 DAFormer step ~750 casts forward and ~1,500 backward. `__call__` instead casts them
    with one multi-tensor copy per forward (`_CastWeights`, the same values) and calls `forward`
    (the model, or a DDP wrapper of it) through `torch.func.functional_call` with the cast
    weights; the gradients reach the fp32 parameters as before. Outside autocast to `dtype`, or
    for a model not in fp32, it calls `forward` as it is. Layers for which `keep(layer)` holds
    keep their fp32 weights (cast where they are used).

    Example:
        >>> cast = TrainedWeightCast(student, torch.bfloat16)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     logits, embed = cast(student, img)
    """

    def __init__(
        self, model: nn.Module, dtype: torch.dtype, keep: Callable[[nn.Module], bool] | None = None
    ) -> None:
        self.dtype = dtype
        self._params = [p for m in model.modules()
                        if isinstance(m, CAST_LAYERS) and not (keep and keep(m))
                        for p in m.parameters(recurse=False)]  # fmt: skip
        self._names: tuple[int, list[str]] | None = None  # (id of `forward`, names in it)

    def __call__(self, forward: nn.Module, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        params = self._params
        device = params[0].device.type if params else "cpu"
        if (
            not params
            or autocast_dtype(device) != self.dtype
            or any(p.dtype != torch.float32 for p in params)
        ):
            return forward(*args, **kwargs)
        if self._names is None or self._names[0] != id(forward):
            where = {id(p): name for name, p in forward.named_parameters(remove_duplicate=False)}
            self._names = (id(forward), [where[id(p)] for p in params])
        low = _CastWeights.apply(self.dtype, *params)
        weights = dict(zip(self._names[1], low, strict=True))
        return torch.func.functional_call(forward, weights, args, kwargs, strict=False)
