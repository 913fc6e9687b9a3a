"""MiT encoder: shapes, NVlabs parameter names, parity with transformers, drop path, init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dida.models import MIT_VARIANTS, MiT, build_mit
from dida.models.weights import hf_reference_encoder as _hf_reference_encoder


def tiny_mit(**kwargs) -> MiT:
    args = dict(embed_dims=[8, 16, 32, 64], num_heads=[1, 1, 2, 2], depths=[1, 2, 1, 1])
    args.update(kwargs)
    return MiT(sr_ratios=[8, 4, 2, 1], **args)


def hf_reference_encoder(model: MiT, impl: str) -> nn.Module:
    """transformers' SegformerModel with `model`'s weights; skips where transformers is absent,
    needs a newer torch (transformers 5 needs torch >= 2.6) or has no such attention (SDPA came
    to its SegFormer with transformers 5)."""
    try:
        return _hf_reference_encoder(model, impl)
    except (ImportError, ValueError) as err:
        if isinstance(err, ValueError) and "attention implementation" not in str(err):
            raise
        pytest.skip(f"transformers' SegformerModel: {' '.join(str(err).split())[:120]}")


def nvlabs_keys(dims: list[int], depths: list[int]) -> set[str]:
    """Expected key names of the original mit_b*.pth backbone."""
    keys = set()
    for s in range(1, 5):
        keys |= {f"patch_embed{s}.{m}.{p}" for m in ("proj", "norm") for p in ("weight", "bias")}
        keys |= {f"norm{s}.weight", f"norm{s}.bias"}
        modules = ["norm1", "norm2", "attn.q", "attn.kv", "attn.proj", "mlp.fc1", "mlp.fc2"]
        modules += ["mlp.dwconv.dwconv"] + (["attn.sr", "attn.norm"] if s < 4 else [])
        for j in range(depths[s - 1]):
            keys |= {f"block{s}.{j}.{m}.{p}" for m in modules for p in ("weight", "bias")}
    return keys


def test_tiny_output_shapes() -> None:
    feats = tiny_mit().eval()(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [
        (2, 8, 16, 16),
        (2, 16, 8, 8),
        (2, 32, 4, 4),
        (2, 64, 2, 2),
    ]


def test_b0_shapes_names_and_attributes() -> None:
    model = build_mit("mit_b0").eval()
    assert model.variant == "mit_b0" and model.embed_dims == [32, 64, 160, 256]
    assert set(model.state_dict()) == nvlabs_keys([32, 64, 160, 256], [2, 2, 2, 2])
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [
        (1, 32, 16, 24),
        (1, 64, 8, 12),
        (1, 160, 4, 6),
        (1, 256, 2, 3),
    ]
    assert model.block1[0].attn.kv.weight.shape == (64, 32)
    assert model.block1[0].attn.sr.kernel_size == (8, 8)


def test_layernorm_eps_follow_the_original() -> None:
    model = tiny_mit()
    eps = {name: m.eps for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert eps["patch_embed1.norm"] == 1e-5 and eps["block1.0.attn.norm"] == 1e-5
    assert eps["block2.1.norm1"] == 1e-6 and eps["block4.0.norm2"] == 1e-6
    assert eps["norm3"] == 1e-6


def test_variant_table_and_unknown_variant() -> None:
    assert MIT_VARIANTS["mit_b5"]["depths"] == [3, 6, 40, 3]
    with pytest.raises(ValueError, match="mit_b9"):
        build_mit("mit_b9")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_parity_with_transformers_tiny(impl: str) -> None:
    model = tiny_mit().eval()
    for p in model.parameters():  # large random weights make eps and layout errors visible
        p.data.normal_(0.0, 0.3)
    reference = hf_reference_encoder(model, impl)
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model(img)
        theirs = reference(img, output_hidden_states=True).hidden_states
    assert len(theirs) == 4
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_parity_with_transformers_b0() -> None:
    model = build_mit("mit_b0").eval()
    reference = hf_reference_encoder(model, "sdpa")
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model(img)
        theirs = reference(img, output_hidden_states=True).hidden_states
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_drop_path_active_in_train_only() -> None:
    model = tiny_mit(drop_path_rate=0.5)
    rates = [b.drop_path.drop_prob for s in range(1, 5) for b in getattr(model, f"block{s}")]
    assert rates == pytest.approx(torch.linspace(0, 0.5, 5).tolist())
    img = torch.randn(8, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        first, second = model(img)[-1], model(img)[-1]
    assert torch.equal(first, second)
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        a = model(img)[-1]
        b = model(img)[-1]
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, first)


def test_drop_path_masks_drawn_once_per_forward() -> None:
    """Training draws every block's two stochastic-depth masks in one operator; each sample's
    mask is 0 or 1/keep, kept with probability keep = 1 - the block's rate, and a block applies
    them to its residual branches exactly as its own `DropPath` would."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = tiny_mit(drop_path_rate=0.5).train()
    keep = 1 - torch.tensor([b.drop_path.drop_prob for s in range(1, 5)
                             for b in getattr(model, f"block{s}")])  # fmt: skip
    torch.manual_seed(0)
    masks = model.drop_path_masks(20000, torch.device("cpu"), torch.float32)
    assert masks.shape == (5, 2, 20000, 1, 1)
    kept = masks != 0
    assert torch.equal(masks[0], torch.ones_like(masks[0]))  # the first block's rate is 0
    assert torch.equal(masks[kept], (1 / keep).view(5, 1, 1, 1, 1).expand_as(masks)[kept])
    # a Bernoulli(keep) per block, branch and sample: within 5 standard deviations
    rate = kept.flatten(1).double().mean(1)
    assert torch.all((rate - keep.double()).abs() <= 5 * (keep * (1 - keep) / 40000).sqrt() + 1e-9)
    cpu = torch.device("cpu")
    assert model.eval().drop_path_masks(4, cpu, torch.float32) is None
    assert tiny_mit(drop_path_rate=0.0).drop_path_masks(4, cpu, torch.float32) is None

    class Draws(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
            if "bernoulli" in func.__name__:
                self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    img = torch.randn(4, 3, 32, 32)
    model.train()
    with Draws() as draws:
        model(img)
    assert len(draws.ops) == 1  # one draw per forward, not one per branch
    # under autocast the masks come in the branches' dtype (no casts in the residual sums)
    dtypes = []
    draw = model.drop_path_masks
    model.drop_path_masks = lambda batch, device, dtype: (
        dtypes.append(dtype) or draw(batch, device, dtype)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model(img)
    assert dtypes == [torch.bfloat16]
    # the same masks by hand: x + branch(x)·mask with each block's own modules
    torch.manual_seed(3)
    fixed = model.drop_path_masks(4, img.device, img.dtype)
    model.drop_path_masks = lambda *args: fixed
    with torch.no_grad():
        got = model(img)
        x, want, i = img, [], 0
        for s in range(1, 5):
            tokens, h, w = getattr(model, f"patch_embed{s}")(x)
            for block in getattr(model, f"block{s}"):
                tokens = tokens + block.attn(block.norm1(tokens), h, w) * fixed[i, 0]
                tokens = tokens + block.mlp(block.norm2(tokens), h, w) * fixed[i, 1]
                i += 1
            tokens = getattr(model, f"norm{s}")(tokens)
            x = tokens.view(4, h, w, -1).permute(0, 3, 1, 2)
            want.append(x)
    assert not torch.equal(fixed, torch.ones_like(fixed))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_rate_zero_train_equals_eval() -> None:
    model = tiny_mit(drop_path_rate=0.0)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        train_out = model.train()(img)[0]
        eval_out = model.eval()(img)[0]
    torch.testing.assert_close(train_out, eval_out)


def test_init_follows_original() -> None:
    model = build_mit("mit_b0")
    q = model.block3[0].attn.q
    # trunc_normal_(std=0.02) as in the original (timm): cut at ±2 absolute, so ≈ normal(0.02)
    assert q.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.count_nonzero(q.bias) == 0
    conv = model.patch_embed2.proj  # fan_out = 3·3·64
    assert conv.weight.std().item() == pytest.approx((2.0 / (9 * 64)) ** 0.5, rel=0.1)


def test_backward_reaches_every_parameter() -> None:
    model = tiny_mit()
    sum(f.sum() for f in model(torch.randn(2, 3, 32, 32))).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
def test_b5_shapes_and_param_count() -> None:
    model = build_mit("mit_b5").eval()
    assert sum(p.numel() for p in model.parameters()) == 81_443_008
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 128, 128))
    assert [f.shape[1] for f in feats] == [64, 128, 320, 512]
    assert feats[0].shape[2:] == (32, 32) and feats[3].shape[2:] == (4, 4)


def _attention_inputs(dtype: torch.dtype, shape: tuple[int, int, int, int], seed: int):  # noqa: ANN202
    """q, k, v (leaves requiring grad) and an output gradient, from float64 draws; B×h×N×M."""
    b, h, n, m = shape
    gen = torch.Generator().manual_seed(seed)
    draws = [torch.randn(b, h, s, 32, generator=gen, dtype=torch.float64) * 2 for s in (n, m, m)]
    grad = torch.randn(b, h, n, 32, generator=gen, dtype=torch.float64)
    return [d.to(dtype).requires_grad_() for d in draws], grad.to(dtype)


def _explicit_float64(q, k, v, grad):  # noqa: ANN001, ANN202
    """Output and q/k/v gradients of softmax(q·kᵀ/√d)·v in float64 (the original's formula)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = torch.matmul((torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1), v)
    out.backward(grad.double())
    return [out.detach()] + [t.grad for t in (q, k, v)]


def _run(fn, q, k, v, grad):  # noqa: ANN001, ANN202
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(grad)
    return out, [out.detach().double()] + [t.grad.double() for t in (q, k, v)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "shape", [(4, 1, 1024, 16), (4, 2, 256, 16), (4, 5, 64, 16), (2, 8, 64, 64)]
)
def test_cpu_attention_backward_is_sdpa_forward_with_gradients_closer_to_float64(
    dtype: torch.dtype, shape: tuple[int, int, int, int]
) -> None:
    """The CPU training path: SDPA's forward bit for bit, gradients at least as close to float64
    as SDPA's own backward (the quickstart's shapes and one with more keys)."""
    from dida.models.mit import attention

    (q, k, v), grad = _attention_inputs(dtype, shape, seed=sum(shape))
    ref = _explicit_float64(q, k, v, grad)
    out, ours = _run(attention, q, k, v, grad)
    assert "_CPUAttention" in type(out.grad_fn).__name__
    _, sdpa = _run(torch.nn.functional.scaled_dot_product_attention, q, k, v, grad)
    assert torch.equal(ours[0], sdpa[0])
    for name, a, b, r in zip(("q", "k", "v"), ours[1:], sdpa[1:], ref[1:], strict=True):
        err_ours = ((a - r).abs().max() / r.abs().max()).item()
        err_sdpa = ((b - r).abs().max() / r.abs().max()).item()
        assert err_ours <= 1.05 * err_sdpa + 1e-7, (name, err_ours, err_sdpa)
        assert err_ours < (2e-2 if dtype == torch.bfloat16 else 1e-5), (name, err_ours)


def test_cpu_attention_backward_only_where_it_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    """Autograd-recorded CPU passes with small score matrices take the explicit backward; a pass
    without a graph (teacher, evaluation), a large score matrix or the switch at 0 take SDPA,
    and a MiT under bf16 autocast trains through it with SDPA's forward."""
    import dida.models.mit as mit

    def kind(out: torch.Tensor) -> str:
        return type(out.grad_fn).__name__ if out.grad_fn is not None else "none"

    (q, k, v), _ = _attention_inputs(torch.float32, (2, 2, 64, 16), seed=0)
    assert "_CPUAttention" in kind(mit.attention(q, k, v))
    with torch.no_grad():
        assert kind(mit.attention(q, k, v)) == "none"
    assert "_CPUAttention" not in kind(mit.attention(q.detach(), k.detach(), v.detach()))
    limit = 2 * 2 * 64 * 16
    monkeypatch.setattr(mit, "CPU_ATTENTION_BACKWARD_MAX", limit - 1)
    assert "_CPUAttention" not in kind(mit.attention(q, k, v))
    monkeypatch.setattr(mit, "CPU_ATTENTION_BACKWARD_MAX", limit)
    assert "_CPUAttention" in kind(mit.attention(q, k, v))

    model = tiny_mit(drop_path_rate=0.0)
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # a loss with a gradient (the mean square of a LayerNorm's output
        # is constant: its gradient would be rounding noise alone)
        weights = [torch.randn(f.shape) for f in model(img)]
    outputs = {}
    for limit in (mit.CPU_ATTENTION_BACKWARD_MAX, 0):
        monkeypatch.setattr(mit, "CPU_ATTENTION_BACKWARD_MAX", limit)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = model(img)
        sum((f.float() * w).mean() for f, w in zip(feats, weights, strict=True)).backward()
        outputs[limit] = ([f.detach() for f in feats], [p.grad.clone() for p in model.parameters()])
    (feats_new, grads_new), (feats_sdpa, grads_sdpa) = outputs.values()
    assert all(torch.equal(a, b) for a, b in zip(feats_new, feats_sdpa, strict=True))
    q_grad = [n for n, _ in model.named_parameters()].index("block1.0.attn.q.weight")
    assert not torch.equal(grads_new[q_grad], grads_sdpa[q_grad])  # another backward ...
    for a, b in zip(grads_new, grads_sdpa, strict=True):  # ... of the same gradient
        torch.testing.assert_close(a, b, rtol=0.1, atol=0.05 * b.abs().max().item() + 1e-8)


def test_cpu_attention_backward_passes_gradcheck_in_float64() -> None:
    """In float64 the explicit backward is the exact gradient (finite differences agree)."""
    from dida.models.mit import attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 2, s, 8, generator=gen, dtype=torch.float64, requires_grad=True)
        for s in (24, 6, 6)
    )
    assert "_CPUAttention" in type(attention(q, k, v).grad_fn).__name__
    assert torch.autograd.gradcheck(attention, (q, k, v))
