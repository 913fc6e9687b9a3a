"""Mix Transformer (MiT-B0..B5) encoder of SegFormer.

Parameter names are exactly those of the original NVlabs `mix_transformer.py` (`patch_embed1.proj`,
`block1.0.attn.kv`, `norm1`, ...), so the official ImageNet files `mit_b*.pth` load one-to-one.
Attention uses `scaled_dot_product_attention` and avoids the original's redundant `.contiguous()`
copies (measured: MiT-B5 forward at 512×512, batch 2, on a 2-core CPU 1.66 s instead of 3.17 s
with 1.1–1.4 GB less peak memory; outputs equal to float64 precision, differences ≤ 6e-15).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dida.models.layers import DropPath, compute_dtype, is_meta
from dida.models.variants import MIT_VARIANTS


class OverlapPatchEmbed(nn.Module):
    """Strided conv patch embedding + LayerNorm (original `OverlapPatchEmbed`, norm eps 1e-5)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Shapes: x: B×C_in×H×W -> tokens B×(h·w)×C, h, w."""
        x = self.proj(x)
        _, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # B×C×h×w -> B×(h·w)×C
        return self.norm(x), h, w


# On a CPU, attention whose score matrix (B·heads·N·M entries) is at most this large takes the
# explicit backward of `_CPUAttention`, beyond it SDPA's (flash) backward is the faster: 0.2–1.0×
# the time up to 2^18 entries, 1.5–2.8× from 2^19 (MiT, bf16, one thread, measured); 0 switches it
# off (benchmarks/train_step.py counts a GPU's kernels)
CPU_ATTENTION_BACKWARD_MAX = 1 << 18


class _CPUAttention(torch.autograd.Function):
    """`scaled_dot_product_attention` forward (the same bits) with an explicit float32 backward.

    PyTorch's CPU flash-attention backward is slow at the MiT's few keys: 1.3–2.0 ms a call at
    the quickstart's shapes (B = 4, N = 16–1024 queries, M = 16 keys, bf16, forward included),
    0.3–0.9 ms with this one (5–7 % of a quickstart step). It recomputes the probabilities
    P = softmax(q·kᵀ/√d) in float32 (float64 inputs: float64) and takes the five products
    dv = Pᵀ·g, dP = g·vᵀ, dS = P∘(dP − rowsum(g∘P·v)), dq = dS·k/√d, dk = dSᵀ·q/√d; its gradients
    are as close to float64 as flash's or closer (tested), rounded to the inputs' dtype once.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        with torch.autocast("cpu", enabled=False):
            dtype = torch.promote_types(q.dtype, torch.float32)  # float64 stays float64
            qf, kf, vf, g = (t.to(dtype) for t in (q, k, v, grad))
            p = torch.matmul(qf, kf.transpose(-1, -2)).mul_(scale).softmax(-1)  # B×h×N×M
            grad_v = torch.matmul(p.transpose(-1, -2), g)
            row = (g * torch.matmul(p, vf)).sum(-1, keepdim=True)  # rowsum(g∘out), B×h×N×1
            ds = torch.matmul(g, vf.transpose(-1, -2)).sub_(row).mul_(p).mul_(scale)
            grad_q = torch.matmul(ds, kf)
            grad_k = torch.matmul(ds.transpose(-1, -2), qf)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v through `scaled_dot_product_attention`; a CPU pass that autograd
    records with a small enough score matrix (`CPU_ATTENTION_BACKWARD_MAX`) takes the same
    forward with the faster `_CPUAttention` backward (eager only: compiled graphs keep SDPA's).

    Shapes:
        q: B×heads×N×hd, k, v: B×heads×M×hd -> B×heads×N×hd
    """
    if (
        q.device.type == "cpu" and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= CPU_ATTENTION_BACKWARD_MAX
        and not torch.compiler.is_compiling()
    ):  # fmt: skip
        dtype = compute_dtype(q)  # SDPA's autocast: the three in the autocast dtype
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return _CPUAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Efficient self-attention with spatial reduction of keys/values (original `Attention`)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Shapes: x: B×N×C (N = h·w) -> B×N×C."""
        b, n, c = x.shape
        head_dim = c // self.num_heads
        q = self.q(x).view(b, n, self.num_heads, head_dim).transpose(1, 2)  # B×heads×N×hd
        if self.sr_ratio > 1:
            grid = x.transpose(1, 2).view(b, c, h, w)  # B×C×h×w (a view, no copy)
            x = self.sr(grid).flatten(2).transpose(1, 2)  # B×M×C, M = (h/sr)·(w/sr)
            x = self.norm(x)
        kv = self.kv(x).view(b, -1, 2, self.num_heads, head_dim)  # B×M×2×heads×hd
        # split along its own axis, so that backward stacks the two gradients straight into the
        # kv layout (no extra copy); the same strided views as permute(2, 0, 3, 1, 4).unbind(0)
        k, v = (t.transpose(1, 2) for t in kv.unbind(2))  # each B×heads×M×hd
        out = attention(q, k, v)  # B×heads×N×hd
        out = out.transpose(1, 2).reshape(b, n, c)  # B×N×C
        return self.proj(out)


class DWConv(nn.Module):
    """Depthwise 3×3 conv on the token grid (original `DWConv`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Shapes: x: B×N×C -> B×N×C."""
        b, n, c = x.shape
        x = self.dwconv(x.transpose(1, 2).view(b, c, h, w))  # B×C×h×w
        return x.flatten(2).transpose(1, 2)  # B×N×C


class Mlp(nn.Module):
    """Mix-FFN: fc1 → depthwise conv → GELU → fc2 (original `Mlp`, dropout 0 omitted)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    """Pre-norm transformer block (original `Block`, LayerNorm eps 1e-6)."""

    def __init__(
        self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float, drop_path: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self, x: torch.Tensor, h: int, w: int, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`keep`: the stochastic-depth masks of the two residual branches (attention, Mix-FFN),
        each sample's 0 or 1/keep probability, drawn by `MiT.forward` for all blocks at once;
        None: the block's own `DropPath` (identity in eval mode).

        Shapes:
            x: B×N×C -> B×N×C (N = h·w);  keep: 2×B×1×1
        """
        if keep is None:
            x = x + self.drop_path(self.attn(self.norm1(x), h, w))
            return x + self.drop_path(self.mlp(self.norm2(x), h, w))
        # the masks are in the branches' dtype: the product needs no cast under autocast (an
        # `addcmul` of the float32 residual would cast the branch first on CUDA)
        x = x + self.attn(self.norm1(x), h, w) * keep[0]
        return x + self.mlp(self.norm2(x), h, w) * keep[1]


class MiT(nn.Module):
    """Mix Transformer encoder returning the four stage outputs (strides 4, 8, 16, 32).

    Args:
        embed_dims: channels of the four stages.
        num_heads: attention heads per stage.
        depths: blocks per stage.
        sr_ratios: key/value spatial-reduction ratio per stage.
        mlp_ratio: Mix-FFN hidden width as a multiple of the stage width.
        drop_path_rate: stochastic-depth rate of the last block (linear from 0 over all blocks).
        in_chans: input image channels.
        variant: a name for logs and weight checks (`mit_b5`, or `custom`).
        grad_checkpointing: recompute each block's activations in backward instead of storing
            them (only when a graph is built); outputs and gradients are unchanged.
    """

    def __init__(
        self,
        embed_dims: list[int],
        num_heads: list[int],
        depths: list[int],
        sr_ratios: list[int],
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        in_chans: int = 3,
        variant: str = "custom",
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        for name, value in (("num_heads", num_heads), ("depths", depths), ("sr_ratios", sr_ratios)):
            if len(value) != len(embed_dims) or len(value) != 4:
                raise ValueError(f"MiT needs 4 stages; got {name}={value}, embed_dims={embed_dims}")
        self.embed_dims = list(embed_dims)
        self.depths = list(depths)
        self.variant = variant
        self.drop_path_rate = float(drop_path_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        start = 0
        for s in range(4):
            patch, stride = (7, 4) if s == 0 else (3, 2)
            prev = in_chans if s == 0 else embed_dims[s - 1]
            self.add_module(
                f"patch_embed{s + 1}", OverlapPatchEmbed(prev, embed_dims[s], patch, stride)
            )
            blocks = [
                Block(embed_dims[s], num_heads[s], sr_ratios[s], mlp_ratio, rates[start + j])
                for j in range(depths[s])
            ]
            self.add_module(f"block{s + 1}", nn.ModuleList(blocks))
            self.add_module(f"norm{s + 1}", nn.LayerNorm(embed_dims[s], eps=1e-6))
            start += depths[s]
        self.apply(_init_weights)
        # The convs that read a channels-last token grid (the spatial reductions, the patch
        # embeddings of stages 2-4) store their weights channels-last as well; an NCHW weight is
        # converted on every call (a copy forward, two backward), with the same result.
        grid_convs = [getattr(self, f"patch_embed{s}").proj for s in (2, 3, 4)]
        grid_convs += [m.sr for m in self.modules() if isinstance(m, Attention) and m.sr_ratio > 1]
        for conv in grid_convs:
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)

    def forward(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Encode an image batch.

        Shapes:
            img: B×3×H×W -> [B×C_1×H/4×W/4, B×C_2×H/8×W/8, B×C_3×H/16×W/16, B×C_4×H/32×W/32]
        """
        outs = []
        x = img
        masks = self.drop_path_masks(img.shape[0], img.device, compute_dtype(img))
        keeps = iter(masks) if masks is not None else itertools.repeat(None)  # one per block
        for s in range(1, 5):
            tokens, h, w = getattr(self, f"patch_embed{s}")(x)
            use_checkpoint = self.grad_checkpointing and torch.is_grad_enabled()
            for block in getattr(self, f"block{s}"):
                keep = next(keeps)
                if use_checkpoint:  # no randomness inside a block: the masks come in
                    tokens = checkpoint(
                        block, tokens, h, w, keep, use_reentrant=False, preserve_rng_state=False
                    )
                else:
                    tokens = block(tokens, h, w, keep)
            tokens = getattr(self, f"norm{s}")(tokens)
            # B×N×C -> B×C×h×w as a channels-last view: no copy, convs accept it as is
            x = tokens.view(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)
            outs.append(x)
        return outs

    def drop_path_masks(
        self, batch: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """The stochastic-depth masks of every block's two residual branches for one forward,
        drawn at once (four operators per forward, where `DropPath` takes two per branch): each
        sample's 0, or 1/keep with probability keep = 1 - the block's rate, in float32, then in
        `dtype` (the branches').

        Shapes:
            -> blocks×2×B×1×1; None in eval mode or at rate 0
        """
        if not self.training or self.drop_path_rate == 0.0:
            return None
        n = sum(self.depths)
        keep = torch.linspace(1.0, 1.0 - self.drop_path_rate, n, device=device)
        keep = keep.view(n, 1, 1, 1, 1).expand(n, 2, batch, 1, 1)
        return torch.bernoulli(keep).div_(keep).to(dtype)


def _init_weights(m: nn.Module) -> None:
    """Original MiT init: trunc-normal(0.02) Linear, LN 1/0, conv normal(0, sqrt(2/fan_out)).
    Weights on the meta device (a build that loads a checkpoint next) are left as they are."""
    if is_meta(m):
        return
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def build_mit(
    variant: str = "mit_b5", drop_path_rate: float = 0.1, grad_checkpointing: bool = False
) -> MiT:
    """Build a named MiT variant (`mit_b0`..`mit_b5`) with random (original) initialisation."""
    if variant not in MIT_VARIANTS:
        raise ValueError(f"unknown MiT variant '{variant}'; expected one of {sorted(MIT_VARIANTS)}")
    return MiT(
        **MIT_VARIANTS[variant], drop_path_rate=drop_path_rate, variant=variant,
        grad_checkpointing=grad_checkpointing,
    )  # fmt: skip
