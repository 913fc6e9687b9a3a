"""DAFormer head: shapes, parameter count, mmseg key names, non-negative embedding, init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dida.models import DAFormerHead

WIDE = [64, 128, 320, 512]


def features(channels: list[int], batch: int = 2, size: int = 16) -> list[torch.Tensor]:
    return [torch.randn(batch, c, size >> i, size >> i) for i, c in enumerate(channels)]


def test_shapes_and_nonnegative_embedding() -> None:
    head = DAFormerHead([8, 16, 32, 64], num_classes=4, embed_dim=32).eval()
    logits, embedding = head(features([8, 16, 32, 64]))
    assert logits.shape == (2, 4, 16, 16)
    assert embedding.shape == (2, 32, 16, 16)
    assert embedding.min() >= 0 and embedding.max() > 0


def test_logits_are_classifier_of_embedding_in_eval() -> None:
    head = DAFormerHead([8, 16, 32, 64], num_classes=4, embed_dim=32).eval()
    logits, embedding = head(features([8, 16, 32, 64]))
    torch.testing.assert_close(logits, head.conv_seg(embedding))


def test_param_count_matches_daformer_b5_head() -> None:
    head = DAFormerHead(WIDE, num_classes=19, embed_dim=256)
    assert sum(p.numel() for p in head.parameters()) == 3_712_275


def test_state_dict_keys_mirror_mmseg() -> None:
    keys = set(DAFormerHead(WIDE, num_classes=19).state_dict())
    expected = {
        "embed_layers.0.proj.weight",
        "embed_layers.3.proj.bias",
        "fuse_layer.aspp_modules.0.conv.weight",
        "fuse_layer.aspp_modules.0.bn.running_mean",
        "fuse_layer.aspp_modules.1.depthwise_conv.conv.weight",
        "fuse_layer.aspp_modules.2.pointwise_conv.bn.running_var",
        "fuse_layer.aspp_modules.3.pointwise_conv.bn.num_batches_tracked",
        "fuse_layer.bottleneck.conv.weight",
        "fuse_layer.bottleneck.bn.weight",
        "conv_seg.weight",
        "conv_seg.bias",
    }
    assert expected <= keys
    assert not any(k.endswith("conv.bias") for k in keys if "fuse_layer" in k)  # BN follows


def test_dilations_and_init() -> None:
    head = DAFormerHead(WIDE, num_classes=19, dilations=(1, 6, 12, 18))
    branches = head.fuse_layer.aspp_modules
    assert [b.depthwise_conv.conv.dilation[0] for b in branches[1:]] == [6, 12, 18]
    assert branches[2].depthwise_conv.conv.groups == 1024
    assert abs(head.conv_seg.weight.std().item() - 0.01) < 0.002
    assert torch.count_nonzero(head.conv_seg.bias) == 0
    assert torch.all(head.fuse_layer.bottleneck.bn.weight == 1)


def test_dropout_only_in_train() -> None:
    head = DAFormerHead([8, 16, 32, 64], num_classes=4, embed_dim=32, dropout=0.5)
    feats = features([8, 16, 32, 64])
    head.eval()
    a = head(feats)[0]
    b = head(feats)[0]
    assert torch.equal(a, b)
    head.train()
    c = head(feats)[0]
    d = head(feats)[0]
    assert not torch.allclose(c, d)


@pytest.mark.parametrize(
    ("dilation", "size"),
    [(2, (13, 11)), (6, (13, 11)), (12, (13, 11)), (40, (13, 11)), (3, (67, 65))],
    ids=["d2-taps", "d6-taps", "d12-taps", "d40-taps", "d3-onednn"],
)
def test_dilated_depthwise_conv_gradients_equal_the_convolution(
    dilation: int, size: tuple[int, int]
) -> None:
    """The CPU path of the ASPP's dilated depthwise convs (input gradient through the flipped
    kernel; weight gradient by taps on small maps, oneDNN's on bf16 maps over 64×64) gives the
    convolution's own values and gradients, also under bf16 autocast (gradients within bf16
    rounding of the float64 ones)."""
    from dida.models.layers import _SMALL_MAP, ConvBNReLU, _conv

    assert (size[0] * size[1] <= _SMALL_MAP) == (size[0] < 64)
    torch.manual_seed(0)
    block = ConvBNReLU(8, 8, 3, padding=dilation, dilation=dilation, groups=8).double()
    x = torch.randn(2, 8, *size, dtype=torch.float64, requires_grad=True)
    conv = block.conv
    out, ref = _conv(conv, x), conv(x)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (x, conv.weight), grad)
    want = torch.autograd.grad(ref, (x, conv.weight), grad)
    assert torch.equal(out, ref)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    block = block.float()
    xf = x.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = _conv(block.conv, xf), block.conv(xf)
    assert out.dtype == ref.dtype == torch.bfloat16 and torch.equal(out, ref)
    got = torch.autograd.grad(out.float().sum(), (xf, block.conv.weight))
    # the float64 gradients of the bf16-rounded operands: PyTorch's own bf16 weight gradient is
    # not the reference (on a CPU without AVX512-BF16 it is 6 % off in places, measured)
    x64, w64 = (t.detach().bfloat16().double().requires_grad_() for t in (xf, block.conv.weight))
    truth = F.conv2d(x64, w64, padding=dilation, dilation=dilation, groups=8)
    want = torch.autograd.grad(truth.sum(), (x64, w64))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2)


def _taps_match_onednn(
    dilation: int, dtype: torch.dtype, exact: bool, tolerance: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_depthwise_conv_by_taps` on small random maps of `dtype` (the route taken) gives oneDNN's
    convolution, bit for bit where `exact`, within `tolerance` (`assert_close`'s) always;
    returns the last map and weight."""
    from dida.models.layers import _depthwise_by_taps, _depthwise_conv_by_taps

    torch.manual_seed(dilation)
    for b, c, h, w in [(4, 256, 32, 32), (2, 37, 29, 41), (1, 8, 13, 64)]:
        x = (torch.randn(b, c, h, w) * 4).to(dtype)
        weight = torch.randn(c, 1, 3, 3).to(dtype)
        assert _depthwise_by_taps(x, weight, dilation)
        got = _depthwise_conv_by_taps(x, weight, dilation)
        want = F.conv2d(x, weight, padding=dilation, dilation=dilation, groups=c)
        assert got.dtype == dtype
        if exact:
            assert torch.equal(got, want)
        torch.testing.assert_close(got.float(), want.float(), **tolerance)
    return x, weight


@pytest.mark.parametrize("dilation", [8, 12, 18, 24])
def test_bf16_depthwise_conv_by_taps_is_onednns_arithmetic(dilation: int) -> None:
    """Large dilations on small bf16 maps (the quickstart's ASPP) run tap by tap: the bits of
    oneDNN's convolution (its GEMM route) on CPUs with AVX512-BF16, within bf16 rounding on
    others; training, its input gradient, and the teacher's forward (no graph) take the route."""
    from dida.models.layers import _conv, _depthwise_by_taps

    exact = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    x, weight = _taps_match_onednn(dilation, torch.bfloat16, exact, dict(rtol=1e-2, atol=1e-2))
    c = x.shape[1]
    assert not _depthwise_by_taps(x.double(), weight.double(), dilation)  # float64: oneDNN's
    assert not _depthwise_by_taps(x, weight, 6)  # oneDNN's own kernel is the faster there
    assert not _depthwise_by_taps(torch.zeros(1, 8, 65, 64).bfloat16(), weight, dilation)

    conv = nn.Conv2d(c, c, 3, padding=dilation, dilation=dilation, groups=c, bias=False)
    xf = x.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = _conv(conv, xf), conv(xf)
        with torch.no_grad():
            teacher = _conv(conv, xf)
    assert "DilatedDepthwise" in type(out.grad_fn).__name__
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, xf, grad)[0]
    want = torch.autograd.grad(ref, xf, grad)[0]
    if exact:
        assert torch.equal(out, ref) and torch.equal(teacher, ref)
        # oneDNN's own input gradient is another kernel: the same within its bf16 rounding
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dilation", [2, 6, 12, 18])
def test_fp32_depthwise_conv_by_taps_is_onednns_arithmetic(
    dilation: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dilated depthwise convs of small fp32 maps run tap by tap: the bits of oneDNN's
    convolution on an AVX2 CPU (measured there: 3x faster), within fp32 rounding of it on
    others; training, its input gradient and the teacher's forward (no graph) take the route."""
    from dida.models import layers
    from dida.models.layers import _conv, _depthwise_by_taps

    exact = torch.backends.cpu.get_cpu_capability() == "AVX2"
    x, weight = _taps_match_onednn(dilation, torch.float32, exact, {})
    c = x.shape[1]
    assert _depthwise_by_taps(torch.zeros(1, 8, 65, 64), weight, dilation)  # fp32: any size

    calls = []
    by_taps = layers._depthwise_conv_by_taps
    monkeypatch.setattr(layers, "_depthwise_conv_by_taps",
                        lambda *args: calls.append(1) or by_taps(*args))  # fmt: skip
    conv = nn.Conv2d(c, c, 3, padding=dilation, dilation=dilation, groups=c, bias=False)
    xr = x.clone().requires_grad_()
    out, ref = _conv(conv, xr), conv(xr)
    with torch.no_grad():
        teacher = _conv(conv, x)
    assert "DilatedDepthwise" in type(out.grad_fn).__name__
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (xr, conv.weight), grad)
    want = torch.autograd.grad(ref, (xr, conv.weight), grad)
    assert len(calls) == 3  # forward, teacher, input gradient
    if exact:
        assert torch.equal(out, ref) and torch.equal(teacher, ref)
    torch.testing.assert_close(teacher, ref)
    for a, b in zip(got, want, strict=True):  # oneDNN's own gradients sum in other orders
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fp32_taps_of_large_maps_run_in_channel_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 maps over `_TAPS_BLOCKED_FROM` bytes run their taps channel block by channel block:
    the same bits as in one block, forward and weight gradient (and oneDNN's forward on an AVX2
    CPU); blocks of about 2 MB, and the quickstart's 4 MB maps in one."""
    from dida.models import layers

    assert len(layers._channel_blocks(torch.empty(2, 1024, 128, 128))) == 64  # 16 channels each
    assert layers._channel_blocks(torch.empty(4, 256, 32, 32)) == [slice(None)]
    torch.manual_seed(0)
    x, g = torch.randn(2, 70, 48, 40), torch.randn(2, 70, 48, 40)
    weight = torch.randn(70, 1, 3, 3)
    # small sizes for the test: blocks of 300,000 // (2·48·40·4 bytes) = 19 channels, the last 13
    monkeypatch.setattr(layers, "_TAPS_BLOCKED_FROM", 1 << 19)
    monkeypatch.setattr(layers, "_TAPS_BLOCK_BYTES", 300_000)
    blocks = layers._channel_blocks(x)
    assert [(b.start, b.stop) for b in blocks] == [(0, 19), (19, 38), (38, 57), (57, 76)]
    for dilation in (2, 12, 30):
        out = layers._depthwise_conv_by_taps(x, weight, dilation)
        grad_w = layers._depthwise_weight_grad_by_taps(g, x, dilation, 3)
        with monkeypatch.context() as m:
            m.setattr(layers, "_TAPS_BLOCKED_FROM", 1 << 40)
            assert layers._channel_blocks(x) == [slice(None)]
            assert torch.equal(out, layers._depthwise_conv_by_taps(x, weight, dilation))
            assert torch.equal(grad_w, layers._depthwise_weight_grad_by_taps(g, x, dilation, 3))
        want = F.conv2d(x, weight, padding=dilation, dilation=dilation, groups=70)
        if torch.backends.cpu.get_cpu_capability() == "AVX2":
            assert torch.equal(out, want)
        torch.testing.assert_close(out, want)
        want_w = torch.nn.grad.conv2d_weight(x.double(), weight.shape, g.double(), padding=dilation,
                                             dilation=dilation, groups=70)  # fmt: skip
        torch.testing.assert_close(grad_w.double(), want_w.view(-1, 3, 3), rtol=1e-5, atol=1e-4)


def test_pointwise_conv_equals_the_convolution() -> None:
    """The CPU path of 1×1 convs in bf16 (matrix products) gives the convolution's values and
    gradients: exactly in float64 through the autograd function, within bf16 rounding under
    autocast, where `_conv` takes it; channels-last inputs and fp32 keep the convolution."""
    from dida.models.layers import _conv, _PointwiseConv

    torch.manual_seed(0)
    conv = nn.Conv2d(24, 8, 1, bias=False).double()
    x = torch.randn(3, 24, 7, 5, dtype=torch.float64, requires_grad=True)
    out, ref = _PointwiseConv.apply(x, conv.weight), conv(x)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (x, conv.weight), grad)
    want = torch.autograd.grad(ref, (x, conv.weight), grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    conv = conv.float()
    xf = x.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = _conv(conv, xf), conv(xf)
        assert out.grad_fn is not None and "Pointwise" in type(out.grad_fn).__name__
        with torch.no_grad():
            inference = _conv(conv, xf)
    assert out.dtype == ref.dtype == inference.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(inference, out, rtol=0, atol=0)
    got = torch.autograd.grad(out.float().square().sum(), (xf, conv.weight))
    want = torch.autograd.grad(ref.float().square().sum(), (xf, conv.weight))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=5e-2)

    cl = xf.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "Pointwise" not in type(_conv(conv, cl).grad_fn).__name__
    assert "Pointwise" not in type(_conv(conv, xf).grad_fn).__name__  # fp32
