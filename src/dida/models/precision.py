"""Low-precision weight copies of frozen or EMA models, for forwards under autocast.

Autocast casts a layer's fp32 weights to bf16/fp16 on every call; it caches the casts of trainable
weights only, so a frozen model (the EMA teacher, the ImageNet encoder of the feature distance)
pays one cast kernel per weight on every forward. A `LowPrecisionCopy` holds those weights already
cast; autocast finds them in its dtype and casts nothing. The weights it casts itself are
rounded the same way, so the outputs are identical.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# layers whose weights autocast casts (matmul and convolution); norms keep their fp32 weights
CAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


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
        if torch.is_autocast_enabled(device_type) and (
            torch.get_autocast_dtype(device_type) == self.dtype
        ):
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
