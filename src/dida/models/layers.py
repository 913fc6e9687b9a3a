"""Small shared building blocks: stochastic depth and mmcv-style conv → BN → ReLU modules.

Module attribute names mirror mmcv's `ConvModule` / `DepthwiseSeparableConvModule` (`conv`, `bn`,
`depthwise_conv`, `pointwise_conv`) so that released mmseg checkpoints load by key prefix only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dida.models.precision import autocast_dtype


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Per-sample stochastic depth (timm `drop_path`): zero whole samples, rescale the rest.

    Shapes:
        x: B×... -> B×...
    """
    if not training or drop_prob == 0.0:  # `training` first: a compiled block in eval mode
        return x  # reads no rate, so blocks of different rates share its graph
    keep_prob = 1.0 - drop_prob
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # B×1×...×1
    mask = x.new_empty(mask_shape).bernoulli_(keep_prob)
    return x * mask.div_(keep_prob)


class DropPath(nn.Module):
    """Stochastic depth on the residual branch; identity in eval mode or at rate 0.

    A MiT block inside `MiT.forward` does not call it in training: the encoder draws all its
    blocks' masks at once and hands them in (`Block.forward`'s `keep`).
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def is_traced() -> bool:
    """Whether a TorchScript trace or a (traced) ONNX export is recording: the CPU routes that
    depend on a tensor's size (windows, chunks) give way to the plain operator then."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer or convolution on `x` outputs: autocast's on `x`'s device when it
    is on there, else `x`'s own."""
    return autocast_dtype(x.device.type) or x.dtype


def _save_in_compute_dtype(ctx, x: torch.Tensor, weight: torch.Tensor):  # noqa: ANN001, ANN202
    """`x` and `weight` in the compute dtype, saved for backward, with their own dtypes in
    `ctx.dtypes` (the gradients' dtypes)."""
    dtype = compute_dtype(x)
    xc, wc = x.to(dtype), weight.to(dtype)
    ctx.save_for_backward(xc, wc)
    ctx.dtypes = (x.dtype, weight.dtype)
    return xc, wc


# bf16 (and float64) maps of at most this many pixels per image take the taps' routes (`_taps_fit`)
_SMALL_MAP = 64 * 64
# The taps of fp32 accumulators larger than `_TAPS_BLOCKED_FROM` bytes run channel block by
# channel block of about `_TAPS_BLOCK_BYTES`, which stay in the cache over the 9 passes instead
# of streaming the whole map from memory 9 times. On an AVX2 CPU (one thread, dilations 6–18):
# 2×1024×128² forward 178–180 ms against 283–332 unblocked and 470–526 by oneDNN, weight
# gradient 102–157 against 1,052–1,128 unblocked and 271–312 by oneDNN; 2 MB blocks measured
# better than 0.5, 1 and 4 MB. The quickstart's 4 MB maps stay one block (blocking them was slower).
_TAPS_BLOCK_BYTES = 2 << 20
_TAPS_BLOCKED_FROM = 8 << 20


def _taps_fit(x: torch.Tensor) -> bool:
    """Whether the map `x` (B×C×H×W) is one the taps' routes take, by size: any fp32 map (large
    ones in channel blocks), other dtypes up to `_SMALL_MAP` pixels per image."""
    return x.dtype == torch.float32 or x.shape[2] * x.shape[3] <= _SMALL_MAP


def _channel_blocks(x: torch.Tensor) -> list[slice]:
    """Channel slices of B×C×H×W `x` for the taps: one of all channels, or blocks of about
    `_TAPS_BLOCK_BYTES` of fp32 when `x` is larger than `_TAPS_BLOCKED_FROM` (see there)."""
    channel_bytes = x[:, :1].numel() * 4
    if x.shape[1] * channel_bytes <= _TAPS_BLOCKED_FROM:
        return [slice(None)]
    cb = max(1, _TAPS_BLOCK_BYTES // channel_bytes)
    return [slice(c0, c0 + cb) for c0 in range(0, x.shape[1], cb)]


def _taps(size, k: int, dilation: int, order):  # noqa: ANN001, ANN202
    """(tap t = i·k + j, output window, input window shifted by the tap) of the taps of a
    "same"-padded dilated k×k kernel, in `order`, skipping those that fall outside an H×W map.
    The windows index B×C×H×W tensors."""
    h, w = size
    for t in order:
        dy, dx = (t // k - k // 2) * dilation, (t % k - k // 2) * dilation
        y0, y1, x0, x1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
        if y1 > y0 and x1 > x0:
            yield (t, (slice(None), slice(None), slice(y0, y1), slice(x0, x1)),
                   (slice(None), slice(None), slice(y0 + dy, y1 + dy), slice(x0 + dx, x1 + dx)))


def _depthwise_weight_grad_by_taps(grad: torch.Tensor, x: torch.Tensor, dilation: int,
                                   k: int) -> torch.Tensor:  # fmt: skip
    """Weight gradient of a "same"-padded dilated depthwise k×k convolution, tap by tap in fp32.

    grad_w[c, i, j] = Σ_{b,y,x} grad[b,c,y,x] · x[b,c,y+(i-k//2)·d, x+(j-k//2)·d] over the pixels
    where the tap falls inside the map, channel block by channel block (`_channel_blocks`). On
    small maps (the quickstart's 32×32) this is 3× faster than oneDNN's weight gradient; it is
    also exact to fp32 where oneDNN's rounds to bf16.

    Shapes:
        grad, x: B×C×H×W -> C×k×k (fp32, or the inputs' dtype if wider)
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    gf, xf = grad.to(dtype), x.to(dtype)
    out = gf.new_zeros(x.shape[1], k * k)
    taps = list(_taps(x.shape[2:], k, dilation, range(k * k)))
    for block in _channel_blocks(xf):
        gb, xb = gf[:, block], xf[:, block]
        for t, at, shifted in taps:
            out[block, t] = (gb[at] * xb[shifted]).sum((0, 2, 3))
    return out.view(-1, k, k)


# From these dilations on, oneDNN runs a depthwise convolution of NCHW maps as a GEMM, slower
# than taps: bf16 from 8 (2–5×; its own kernel is the faster up to dilation 6, AVX512-BF16 CPU),
# fp32 from 2 (3× at the quickstart's dilations 6–18 on an AVX2 CPU). Other dtypes keep oneDNN's.
_TAPS_DILATION = {torch.bfloat16: 8, torch.float32: 2}


def _depthwise_by_taps(x: torch.Tensor, weight: torch.Tensor, dilation: int) -> bool:
    """Whether `_depthwise_conv_by_taps` is the faster route: bf16 on a small map, fp32 on any,
    a large enough dilation (`_TAPS_DILATION`).

    On the quickstart's 32×32 ASPP maps (batch 4, 256 channels, one thread): bf16 1.8–2.0
    against oneDNN's 3.4–4.1 ms at dilations 12 and 18 (AVX512-BF16 CPU); fp32 4.1–4.5 against
    12–17 ms at dilations 6–18 (AVX2 CPU, no AVX-512); larger fp32 maps: `_TAPS_BLOCK_BYTES`."""
    return (
        x.dtype == weight.dtype and x.dtype in _TAPS_DILATION and x.dim() == 4
        and dilation >= _TAPS_DILATION[x.dtype] and _taps_fit(x)
    )  # fmt: skip


def _depthwise_conv_by_taps(x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """"Same"-padded dilated depthwise k×k convolution of bf16 or fp32 maps, tap by tap.

    A float32 accumulator, zero at first, receives the products w·x of the taps inside the map
    with a fused multiply-add each, in oneDNN's order for the dtype, then is rounded to the
    dtype once: the arithmetic of oneDNN's GEMM route. bf16 pairs the taps, (1, 0), (3, 2), ...
    (its bf16 dot products, odd tap first), which gives oneDNN's bits on CPUs with AVX512-BF16;
    fp32 takes the taps in order, oneDNN's bits on an AVX2 CPU (both tested on random maps).
    Large maps run channel block by channel block (`_channel_blocks`): the same arithmetic.

    Shapes:
        x: B×C×H×W, weight: C×1×k×k (both bf16 or both fp32) -> B×C×H×W (x's dtype)
    """
    k = weight.shape[-1]
    xf, wf = x.float(), weight.float().view(-1, k * k)  # fp32: the tensors themselves
    out = torch.empty_like(xf)
    order = range(k * k)
    if x.dtype == torch.bfloat16:
        order = [t ^ 1 if (t ^ 1) < k * k else t for t in order]  # 1, 0, 3, 2, ..., (k²-1)
    taps = list(_taps(x.shape[2:], k, dilation, order))
    for block in _channel_blocks(xf):
        xb, ob, wb = xf[:, block], out[:, block].zero_(), wf[block]
        for t, at, shifted in taps:
            ob[at].addcmul_(xb[shifted], wb[:, t].view(1, -1, 1, 1))
    return out.to(x.dtype)


def _dilated_depthwise(x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """The "same"-padded dilated depthwise convolution of `x` and `weight` as they are."""
    if _depthwise_by_taps(x, weight, dilation):
        return _depthwise_conv_by_taps(x, weight, dilation)
    pad = dilation * (weight.shape[-1] // 2)
    return F.conv2d(x, weight, padding=pad, dilation=dilation, groups=x.shape[1])


class _DilatedDepthwiseConv(torch.autograd.Function):
    """Depthwise convolution ("same" padding) whose input gradient is computed as the forward
    convolution with the flipped kernel, its exact transpose.

    On CPUs oneDNN runs the input gradient of a dilated depthwise convolution through a slow GEMM
    path (the ASPP branches: 1.6x slower at 128x128, 3x in the quickstart's 32x32, measured); its
    forward convolution is fast. The weight gradient is `_depthwise_weight_grad_by_taps` in fp32
    and on small bf16 maps, else oneDNN's own, asked for alone. Under autocast the convolutions
    run in the autocast dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:  # type: ignore[override]
        xc, wc = _save_in_compute_dtype(ctx, x, weight)
        ctx.dilation = dilation
        with torch.autocast("cpu", enabled=False):
            return _dilated_depthwise(xc, wc, dilation)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        d, groups, pad = ctx.dilation, x.shape[1], ctx.dilation * (weight.shape[-1] // 2)
        grad = grad.to(x.dtype).contiguous()
        grad_x = grad_w = None
        with torch.autocast("cpu", enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x = _dilated_depthwise(grad, weight.flip(-1, -2), d).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                if _taps_fit(x):
                    grad_w = _depthwise_weight_grad_by_taps(grad, x, d, weight.shape[-1])
                else:  # oneDNN's, the weight gradient alone
                    grad_w = torch.ops.aten.convolution_backward(
                        grad, x, weight, None, [1, 1], [pad, pad], [d, d], False, [0, 0], groups,
                        [False, True, False],
                    )[1]  # fmt: skip
                grad_w = grad_w.view_as(weight).to(ctx.dtypes[1])
        return grad_x, grad_w, None


def _pointwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W·x per image: one batched product on the NCHW layout as it is (`torch.matmul` would
    transpose and copy the input first when it requires grad).

    Shapes:
        x: B×C×H×W, weight: O×C×1×1 -> B×O×H×W
    """
    b, c, h, w = x.shape
    out = torch.bmm(weight.view(1, -1, c).expand(b, -1, -1), x.view(b, c, h * w))
    return out.view(b, -1, h, w)


class _PointwiseConv(torch.autograd.Function):
    """1×1 convolution of a contiguous (NCHW) input as matrix products: W·x per image forward,
    Wᵀ·g per image and one g·xᵀ over all pixels of the batch backward.

    oneDNN's NCHW 1×1 convolution runs at half its GEMM speed on CPUs (the DAFormer head's
    1024→256 convs at 128×128 in bf16: 94 against 44 ms forward, 222 against 134 ms backward,
    measured; `_conv` uses it in bf16 only). The weight gradient is one product over all B·H·W
    pixels, accumulated in fp32 and rounded once, as the convolution's. Under autocast it runs in
    the autocast dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        xc, wc = _save_in_compute_dtype(ctx, x, weight)
        with torch.autocast("cpu", enabled=False):
            return _pointwise(xc, wc)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        b, c, h, w = x.shape
        grad = grad.to(x.dtype).reshape(b, -1, h * w)  # B×O×(H·W)
        weight2d = weight.view(-1, c)  # O×C
        grad_x = grad_w = None
        with torch.autocast("cpu", enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x = torch.bmm(weight2d.t().expand(b, c, -1), grad)  # B×C×(H·W)
                grad_x = grad_x.view(b, c, h, w).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                g = grad.transpose(0, 1).reshape(grad.shape[1], b * h * w)  # O×(B·H·W)
                xt = x.view(b, c, h * w).transpose(0, 1).reshape(c, b * h * w)  # C×(B·H·W)
                grad_w = torch.mm(g, xt.t()).view_as(weight).to(ctx.dtypes[1])
        return grad_x, grad_w


def is_dilated_depthwise(conv: nn.Module) -> bool:
    """Whether `conv` is a "same"-padded dilated depthwise conv, trained on a CPU through
    `_DilatedDepthwiseConv` (which takes its weight in fp32: its gradient may be fp32-exact)."""
    return (
        isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels
        and conv.dilation[0] > 1 and conv.bias is None and conv.stride == (1, 1)
        and conv.kernel_size[0] % 2 == 1 and conv.dilation[0] == conv.dilation[1]
        and conv.kernel_size[0] == conv.kernel_size[1]
        and conv.padding == (conv.dilation[0] * (conv.kernel_size[0] // 2),) * 2
    )  # fmt: skip


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)`, on a CPU through `_PointwiseConv` for a 1×1 conv of a contiguous input in bf16
    (in fp32 oneDNN's convolution is the faster: 157 against 295 ms, measured) and through
    `_DilatedDepthwiseConv` for a dilated depthwise conv being trained; without a graph (the
    teacher) a bf16 or fp32 dilated depthwise conv takes `_dilated_depthwise`'s route. A traced
    export records `conv(x)` (the taps' windows would be fixed to the traced size)."""
    if x.device.type != "cpu" or is_traced():
        return conv(x)
    training = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
    if (
        compute_dtype(x) == torch.bfloat16 and conv.kernel_size == (1, 1)
        and conv.groups == 1 and conv.bias is None and conv.stride == (1, 1)
        and conv.padding == (0, 0) and x.dim() == 4 and x.is_contiguous()
    ):  # fmt: skip
        if training:
            return _PointwiseConv.apply(x, conv.weight)
        return _pointwise(x, conv.weight)  # inference: the same products, no graph
    if is_dilated_depthwise(conv):
        if training:
            return _DilatedDepthwiseConv.apply(x, conv.weight, conv.dilation[0])
        dtype = compute_dtype(x)
        if dtype in _TAPS_DILATION:  # the teacher: oneDNN's or the taps' route
            with torch.autocast("cpu", enabled=False):
                return _dilated_depthwise(x.to(dtype), conv.weight.to(dtype), conv.dilation[0])
    return conv(x)


class ConvBNReLU(nn.Module):
    """Conv2d (no bias) → BatchNorm2d → ReLU, the mmcv `ConvModule` with BN and ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(_conv(self.conv, x)))


class DepthwiseSeparableConvBNReLU(nn.Module):
    """Depthwise 3×3 (dilated) ConvBNReLU then pointwise 1×1 ConvBNReLU (mmcv naming)."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.depthwise_conv = ConvBNReLU(
            in_channels, in_channels, 3, padding=dilation, dilation=dilation, groups=in_channels
        )
        self.pointwise_conv = ConvBNReLU(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


def is_meta(module: nn.Module) -> bool:
    """Whether `module`'s own weights are on the meta device: a build without values (the
    checkpoint's come next), whose random init is skipped (torch's meta `normal_` is a Python
    decomposition: its first call imports `torch._dynamo`, ~1 s of every `dida test`)."""
    return any(p.is_meta for p in module.parameters(recurse=False))


def init_conv_bn_(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) for convs, weight 1 / bias 0 for BN, in place (mmcv init);
    meta weights are left as they are."""
    for m in module.modules():
        if is_meta(m):
            continue
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
