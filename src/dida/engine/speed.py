"""Speed settings of the training step that leave its arithmetic alone, and the loss window.

`prepare_method` runs once, after the method is on its device (the engine and
`benchmarks/train_step.py` call it):

* under bf16/fp16 autocast the frozen models keep 16-bit copies of their matmul/conv weights
  (the ImageNet encoder cast in place, the EMA teacher through a copy its update refreshes), so
  autocast stops casting every weight again on every forward; in eager mode the student's are
  cast in one multi-tensor copy per forward and their gradients back in one per backward;
* `train.compile`: `blocks` compiles each MiT block and decode head in place (regional
  compilation: one compiled graph per stage shape and mode serves all blocks, student, teacher and
  ImageNet encoder alike, so the compile time is that of a few blocks); `full` compiles the whole
  student as one graph; `false` (the default) stays eager. Both compile the arithmetic of DIDA's
  instance-loss chunks too (fused element-wise passes).

`StepBackward` is the engine's backward: a step's later backward passes (the mixed image after the
source image, MIC's masked image) add their gradients to `.grad` in one multi-tensor add instead
of autograd's one add per parameter; the same sums, so the same bits.

`LossWindow` keeps the step's metrics on the device and reads them at log intervals with one
copy, so that a step never waits for the device.

`reuse_freed_memory` makes glibc's malloc keep the memory that a CPU step frees for the next
step, instead of handing it back to the kernel and faulting it in again.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import sys

import torch
from torch import nn

log = logging.getLogger("dida.train")

COMPILE_MODES = ("false", "blocks", "full")
# compiled variants of one block's code: 4 stage shapes x (train, no-grad teacher/encoder) x a
# few input sizes (training crop, evaluation); the default of 8 would send the rest to eager
RECOMPILE_LIMIT = 64


# glibc mallopt parameters and values (malloc.h); 32 MiB is the largest mmap threshold on 64 bits
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30


def glibc() -> bool:
    """Whether this process runs on Linux with glibc's C library (and so its malloc)."""
    try:
        return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith(
            "glibc"
        )
    except (OSError, ValueError):  # no such name here
        return False


def reuse_freed_memory() -> bool:
    """Linux with glibc: blocks up to 32 MiB come from the heap and freed memory stays there (up
    to 1 GiB free on top of it); returns whether the settings were applied.

    A CPU training step allocates and frees the same few-MB tensors on every iteration. With
    glibc's defaults, whether those come back with their pages or fresh ones (which the kernel
    faults in and zeroes) depends on the sizes the process happened to free before, which glibc
    adapts its thresholds to. The quickstart's step in a fresh process (its config, a random
    batch; MiT-B0, 128², batch 4, bf16, one thread): DAFormer 0.263-0.267 s/it with the
    defaults, 0.234 with these settings; DIDA 0.301-0.325 and 0.276-0.286; peak memory the same.
    `dida quickstart`'s runs had got there by themselves: the same time, half the system time.
    The process keeps its peak memory until it exits. Allocations only: the same results.
    """
    if not glibc():  # musl, macOS, Windows: no such settings
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def prepare_method(
    method: nn.Module,
    compile_what: str,
    dtype: torch.dtype,
    distributed: bool = False,
    mode: str = "default",
) -> None:
    """Low-precision weights of the frozen models under 16-bit `dtype`, then `train.compile`
    (`compile_what`) with torch.compile's `mode` (`train.compile_mode`)."""
    if compile_what not in COMPILE_MODES:
        raise ValueError(f"train.compile '{compile_what}': expected one of {COMPILE_MODES}")
    if dtype in (torch.bfloat16, torch.float16):
        method.use_low_precision_weights(dtype, cast_student=compile_what == "false")
    options = {} if mode == "default" else {"mode": mode}
    if compile_what != "false" and hasattr(method, "compile_instance_loss"):
        method.compile_instance_loss = True  # DIDA's L_in: each chunk's arithmetic fused
    if compile_what == "full":
        if distributed:  # DDP wraps the student; compiling the wrapper is not supported here
            log.warning("train.compile=full is ignored with several processes; using blocks")
            compile_regions(method, **options)
        else:
            method.set_student_forward(torch.compile(method.student, **options))
    elif compile_what == "blocks":
        compile_regions(method, **options)


def share_compiled_graphs() -> bool:
    """Whether compiled instances of one module class share their graphs (torch >= 2.5; on 2.4
    this switches dynamo's `inline_inbuilt_nn_modules` on, its default from 2.5). Older torch
    compiles a graph per instance: MiT-B5's 52 blocks, times each model and mode."""
    if torch.__version__ >= "2.5":
        return True
    config = torch._dynamo.config
    if not hasattr(config, "inline_inbuilt_nn_modules"):
        return False
    config.inline_inbuilt_nn_modules = True
    return True


def compile_regions(method: nn.Module, mode: str | None = None) -> int:
    """`torch.compile` every MiT block and DAFormer head of `method` in place; returns how many.

    Compiled modules keep their parameters and state-dict keys. Blocks of different drop-path
    rates share graphs: in training their masks come in as data (drawn by `MiT.forward`), in
    eval mode no rate is read, so MiT-B5's 52 blocks compile 4 graphs per mode, not 52.
    """
    from dida.models.daformer_head import DAFormerHead
    from dida.models.mit import Block

    if not share_compiled_graphs():
        log.warning(
            "train.compile=blocks: torch %s compiles every block on its own (regional "
            "compilation shares one graph per stage from torch 2.4): minutes of compiling, and "
            "past the recompile limit the remaining blocks run eager; train.compile=false is "
            "likely faster", torch.__version__,
        )  # fmt: skip
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across versions
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
            break
    roots = [method, *(copy.module for copy in method.low_precision_copies())]
    count = 0
    for root in roots:
        for module in root.modules():
            if isinstance(module, (Block, DAFormerHead)):
                module.compile(dynamic=False, mode=mode)  # a graph per stage shape: static
                count += 1
    log.info("train.compile=blocks: %d MiT blocks and heads compiled in place", count)
    return count


class StepBackward:
    """`backward(loss)` for a method's step: `scale(loss).backward()`, with the gradients of every
    pass after the first added to `.grad` in one multi-tensor add.

    The first pass of a step (every `.grad` None after `zero_grad(set_to_none=True)`) is a plain
    backward, which stores the gradients. A later one takes its gradients with
    `torch.autograd.grad` and adds them with one `torch._foreach_add_`: for a MiT-B5 DIDA step
    ~1,100 fewer kernel launches than autograd's per-parameter accumulation, with the same fp32
    additions. It holds one pass's gradients at once (the size of `.grad`) until they are added.
    `foreach=False` (several processes: DDP reduces gradients in autograd's accumulation hooks)
    keeps plain backwards.

    Example:
        >>> backward = StepBackward(student.parameters(), scaler.scale, foreach=True)
        >>> backward(source_loss); backward(mixed_loss)   # .grad holds the sum of both
    """

    def __init__(self, params, scale=None, foreach: bool = True) -> None:  # noqa: ANN001
        self.params = [p for p in params if p.requires_grad]
        self.scale = scale
        self.foreach = foreach

    def __call__(self, loss: torch.Tensor) -> None:
        if self.scale is not None:
            loss = self.scale(loss)
        params = self.params
        if not self.foreach or all(p.grad is None for p in params):
            loss.backward()
            return
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        total, new = [], []
        for param, grad in zip(params, grads, strict=True):
            if grad is None:
                continue
            if param.grad is None:  # first used in this pass: stored in the parameter's layout
                param.grad = grad if grad.stride() == param.stride() else (
                    torch.empty_like(param).copy_(grad))  # fmt: skip
            else:
                total.append(param.grad)
                new.append(grad)
        if total:
            torch._foreach_add_(total, new)


def compiled_graphs() -> int:
    """Graphs `torch.compile` has produced in this process so far (0 without compilation)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class LossWindow:
    """The metrics of the steps since the last read, kept as they come (device tensors).

    `read()` copies them all to the host at once (one synchronisation) and returns each step's
    values; the engine calls it at log intervals and before checkpoints and evaluations.
    """

    def __init__(self) -> None:
        self._steps: list[tuple[int, dict]] = []

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, iteration: int, metrics: dict) -> None:
        self._steps.append((iteration, dict(metrics)))

    def read(self) -> list[tuple[int, dict[str, float]]]:
        """[(iteration, {name: value})] of every step since the last read, oldest first."""
        steps, self._steps = self._steps, []
        tensors = [v for _, m in steps for v in m.values() if torch.is_tensor(v)]
        values = iter(
            torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist()
            if tensors else []
        )  # fmt: skip
        return [
            (it, {k: next(values) if torch.is_tensor(v) else float(v) for k, v in m.items()})
            for it, m in steps
        ]


def window_mean(steps: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Mean of each metric over the steps that report it (mmseg logs interval means)."""
    sums: dict[str, list[float]] = {}
    for _, metrics in steps:
        for key, value in metrics.items():
            sums.setdefault(key, []).append(value)
    return {key: math.fsum(v) / len(v) for key, v in sums.items()}
