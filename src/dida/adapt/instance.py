"""DIDA's instance level: pixel-to-bank similarities, the two cross-level interactions and L_in.

docs/method.md §3.4–§3.7: similarities are dot products with the bank, normalised over K (`sum`
or `softmax`); "gather" calibrates the weak-view similarities with a class score (the student's
mixed-image logits or the teacher's probabilities) of each bank entry's class; "scatter" smooths
the pseudo-label probabilities with the aggregated similarities; the loss is the cross-entropy
between the weak-view target and the strong-view similarities, computed in row chunks whose
gradients are accumulated during forward to bound the memory.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dida.eval.inference import cpu_any

NORMALISATIONS = ("sum", "softmax")
CALIBRATE_SOURCES = ("teacher_probs", "student_mixed_logits")


def instance_similarity(embed: torch.Tensor, bank_feats: torch.Tensor) -> torch.Tensor:
    """Dot products between every pixel embedding and every bank entry.

    Shapes:
        embed: [B, D, h, w], bank_feats: [K, D] -> [B, K, h, w]
    """
    return torch.einsum("bdhw,kd->bkhw", embed, bank_feats.to(embed.dtype))


def _sum_normalise(
    sim: torch.Tensor, dim: int, safe: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S / Σ S over `dim` (see `normalise_similarity`), and where the normaliser is non-zero
    (None where it is non-zero everywhere, or `safe`)."""
    if safe:
        sim = sim.clamp_min(0)
        return sim / (sim.sum(dim=dim, keepdim=True) + eps), None
    den = sim.sum(dim=dim, keepdim=True)
    zero = den == 0
    if sim.device.type == "cpu" and not torch.compiler.is_compiling() and not cpu_any(zero):
        # no 0/0 pixel (the rule): the masked fills would change nothing, and they cost more than
        # the division (the check would be a sync on a GPU, and a graph break when compiling)
        return sim / den, None
    # in place: division's backward does not read its result, so no copy of a [.., K, ..] tensor
    out = (sim / den.masked_fill(zero, 1.0)).masked_fill_(zero, 0.0)
    return out, ~zero.squeeze(dim)


def _normalise(
    sim: torch.Tensor, normalisation: str, tau: float, eps: float, dim: int, safe: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if normalisation == "sum":
        return _sum_normalise(sim, dim, safe, eps)
    if normalisation == "softmax":
        return torch.softmax(sim / tau, dim=dim), None
    raise ValueError(f"normalisation '{normalisation}': expected one of {NORMALISATIONS}")


def normalise_similarity(
    sim: torch.Tensor,
    normalisation: str = "sum",
    *,
    tau: float = 1.0,
    eps: float = 1e-6,
    dim: int = 1,
    safe: bool = False,
) -> torch.Tensor:
    """Turn similarities into a distribution over K (`dim`, 1 by default).

    `sum`, `safe=False` (the reference): S / Σ_k S with no epsilon; where Σ_k S is exactly 0 the
    result is 0 (the reference divides 0 by 0). `sum`, `safe=True`: S clamped at 0, divided by
    Σ_k S + eps. `softmax`: softmax(S / tau).

    Shapes:
        sim: [B, K, ...] -> [B, K, ...]
    """
    return _normalise(sim, normalisation, tau, eps, dim, safe)[0]


def instance_target(
    weak_sim: torch.Tensor,
    calib: torch.Tensor | None,
    bank_labels: torch.Tensor,
    *,
    normalisation: str = "sum",
    tau: float = 1.0,
    source: str = "student_mixed_logits",
    safe: bool = False,
    eps: float = 1e-6,
    dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The instance-level pseudo-label T over K from raw weak-view similarities.

    docs/method.md §3.4, §3.5.

    Without `calib`: T = the normalised similarities. With it, the semantic → instance "gather":
    T_k ∝ S_w,k · calib[l_k]. `safe=False` (the reference): T = S_w ⊙ G / Σ_k (S_w ⊙ G) with no
    epsilon (T may be negative with raw logits; where the normaliser is 0, T is 0). `safe=True`:
    the normalised S_w times G (clamped at 0 for `teacher_probs`), divided by the sum + eps.

    Returns:
        `(T, ok)`: `ok` is False where a normaliser was exactly 0 (None when `safe`, and may be
        None when no normaliser was 0).

    Shapes:
        weak_sim: [B, K, H, W], calib: [B, C, H, W], bank_labels: [K] -> [B, K, H, W], [B, H, W]
        (or any layout with K and C at `dim`)
    """
    if calib is None:
        return _normalise(weak_sim, normalisation, tau, eps, dim, safe)
    if source not in CALIBRATE_SOURCES:
        raise ValueError(f"calibrate source '{source}': expected one of {CALIBRATE_SOURCES}")
    per_entry = calib.index_select(dim, bank_labels)  # [B, K, H, W] (K at `dim`)
    if not safe:
        # a positive per-pixel normalisation of S_w cancels in T, so the raw S_w is used
        weak = torch.softmax(weak_sim / tau, dim=dim) if normalisation == "softmax" else weak_sim
        return _sum_normalise(weak * per_entry, dim, safe=False, eps=0.0)
    weak = _normalise(weak_sim, normalisation, tau, eps, dim, safe=True)[0]
    if source == "teacher_probs":
        per_entry = per_entry.clamp_min(0)
    target = weak * per_entry
    return target / (target.sum(dim=dim, keepdim=True) + eps), None


def calibrate_similarity(
    weak_sim_norm: torch.Tensor,
    calib: torch.Tensor,
    bank_labels: torch.Tensor,
    *,
    source: str = "teacher_probs",
    eps: float = 1e-6,
    dim: int = 1,
) -> torch.Tensor:
    """Semantic → instance "gather" on normalised similarities (`instance_target`, safe form).

    `teacher_probs`: `calib` are class probabilities (clamped at 0). `student_mixed_logits`: raw
    logits, possibly negative; the normaliser gets only `eps`.

    Shapes:
        weak_sim_norm: [B, K, H, W], calib: [B, C, H, W], bank_labels: [K] -> [B, K, H, W]
    """
    if source not in CALIBRATE_SOURCES:
        raise ValueError(f"calibrate source '{source}': expected one of {CALIBRATE_SOURCES}")
    per_entry = calib.index_select(dim, bank_labels)
    if source == "teacher_probs":
        per_entry = per_entry.clamp_min(0)
    target = weak_sim_norm * per_entry
    return target / (target.sum(dim=dim, keepdim=True) + eps)


def smooth_probs(
    probs: torch.Tensor, weak_sim_norm: torch.Tensor, bank_labels: torch.Tensor, a_smooth: float
) -> torch.Tensor:
    """Instance → semantic "scatter": P ← a·P + (1 − a)·agg, agg[c] = Σ_{k: l_k = c} S̃_w,k.

    A proper convex combination when S̃ sums to 1 over K; `a_smooth = 1` returns `probs` itself.

    Shapes:
        probs: [B, C, H, W], weak_sim_norm: [B, K, H, W], bank_labels: [K] -> [B, C, H, W]
    """
    if a_smooth >= 1.0:
        return probs
    if probs.shape[2:] != weak_sim_norm.shape[2:]:
        raise ValueError(
            f"probs {tuple(probs.shape)} and similarities {tuple(weak_sim_norm.shape)}: "
            "expected the same H, W"
        )
    agg = torch.zeros_like(probs).index_add_(1, bank_labels, weak_sim_norm.to(probs.dtype))
    return a_smooth * probs + (1.0 - a_smooth) * agg


@dataclass(frozen=True)
class _RowPlan:
    """Bilinear row taps of every output row (bilinear, align_corners=False), planned on the
    host and stored once per device: output row y is lerp(row i0[y], row i1[y], lam[y]).

    Shapes: i0, i1: [out_h] int64; lam: [out_h, 1, 1, 1] (the similarities' dtype)
    """

    i0: torch.Tensor
    i1: torch.Tensor
    lam: torch.Tensor
    identity: bool  # same height: every output row is its own source row

    def rows(self, x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Output rows r0:r1 from source rows: height by explicit lerp (advanced indexing:
        index_select along dim 0 of a 4-D tensor is ~10x slower on CPU).

        Shapes: x: [h, B, K, w] -> [r1 - r0, B, K, w]
        """
        if self.identity:
            return x[r0:r1]
        return torch.lerp(x[self.i0[r0:r1]], x[self.i1[r0:r1]], self.lam[r0:r1])


_PLANS: dict[tuple, _RowPlan] = {}


def _plan_rows(h: int, out_h: int, device: torch.device, dtype: torch.dtype) -> _RowPlan:
    """The taps of every output row; pure host arithmetic (float64, as torch's float64),
    cached, so that planning never reads a device tensor."""
    key = (h, out_h, str(device), dtype)
    if key in _PLANS:
        return _PLANS[key]
    srcs = [max((y + 0.5) * (h / out_h) - 0.5, 0.0) for y in range(out_h)]
    i0 = [min(math.floor(v), h - 1) for v in srcs]
    lam = [v - i for v, i in zip(srcs, i0, strict=True)]
    plan = _RowPlan(
        i0=torch.tensor(i0).to(device, non_blocking=True),
        i1=torch.tensor([min(i + 1, h - 1) for i in i0]).to(device, non_blocking=True),
        lam=torch.tensor(lam, dtype=torch.float64).to(dtype).view(-1, 1, 1, 1)
        .to(device, non_blocking=True),
        identity=h == out_h and all(v == 0 for v in lam),
    )  # fmt: skip
    if len(_PLANS) > 64:  # a few shapes per run; bound the cache anyway
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def _widen(rows: torch.Tensor, out_w: int) -> torch.Tensor:
    """Bilinear width resize of rows (the same separable weights as one full
    F.interpolate(bilinear, align_corners=False) after the height lerp of `_RowPlan.rows`).

    One batch of R*B*K channels: the same arithmetic per row as R*B*K batches of one channel,
    1.7x faster forward on CPUs (the quickstart's 30,720 rows: 3.6 against 6.3 ms).

    Shapes:
        rows: [R, B, K, w] -> [R, B, K, out_w]
    """
    r, b, k, w = rows.shape
    if w == out_w:
        return rows
    wide = F.interpolate(rows.reshape(1, r * b * k, w), out_w, mode="linear", align_corners=False)
    return wide.view(r, b, k, out_w)


def _chunk_loss(
    rows: torch.Tensor,
    weak_rows: torch.Tensor,
    calib_rows: torch.Tensor | None,
    mask_rows: torch.Tensor | None,
    bank_labels: torch.Tensor,
    *,
    out_w: int,
    normalisation: str,
    tau_weak: float,
    tau_strong: float,
    eps: float,
    log_eps: float,
    safe: bool,
    calibrate_source: str,
) -> torch.Tensor:
    """Σ_k −T_k log(S_s,k + log_eps) at each pixel of one chunk's output rows (`instance_loss`).

    Shapes:
        rows, weak_rows: [R, B, K, w] strong / weak similarities at the output height;
        calib_rows: [R, B, C, W]; mask_rows: [R, B, W] -> [R, B, W]
    """
    with torch.no_grad():
        target, _ = instance_target(
            _widen(weak_rows, out_w), calib_rows, bank_labels, normalisation=normalisation,
            tau=tau_weak, source=calibrate_source, safe=safe, eps=eps, dim=2,
        )  # fmt: skip
    pred, ok = _normalise(_widen(rows, out_w), normalisation, tau_strong, eps, dim=2, safe=safe)
    # negated after the sum over K (the same bits: rounding is symmetric), one pass fewer over
    # [R, B, K, W] forward and backward
    per_pixel = (target * torch.log(pred + log_eps)).sum(dim=2).neg()  # [R, B, W]
    if ok is not None:  # zero strong normaliser: no contribution (T is already 0 where its is)
        per_pixel = per_pixel.masked_fill(~ok, 0.0)
    if mask_rows is not None:
        per_pixel = per_pixel * mask_rows
    return per_pixel


@functools.cache
def _compiled_chunk_loss():  # noqa: ANN202
    """`_chunk_loss` compiled once per process (static shapes: a graph per chunk shape)."""
    return torch.compile(_chunk_loss, dynamic=False)


# [R, B, K, W] tensors alive at once in one chunk's forward and backward (about 6 measured, on
# top of ~3 row-independent [h, B, K, w] and [H, B, C, W] tensors), with a margin
CHUNK_LIVE_TENSORS = 8
# on a CPU, chunks whose [R, B, K, W] tensors stay in the core's cache run the loss's ~25
# element-wise passes faster than one big chunk (the quickstart's: 8 rows of 0.94 MiB, 65-75
# against 80-115 ms forward and backward); the bits do not depend on the chunks
CPU_CHUNK_TENSOR_BYTES = 1 << 20


def chunk_rows(
    out_h: int, row_bytes: int, chunk_size: int = 0, chunk_bytes: int = 1 << 30, cpu: bool = False
) -> int:
    """Output rows per chunk: `chunk_size` if positive, else as many as fit `chunk_bytes` (one
    chunk where the whole loss fits), and on a `cpu` at most `CPU_CHUNK_TENSOR_BYTES` per
    [R, B, K, W] tensor; `row_bytes` is one output row of one such tensor.

    Fewer chunks mean fewer kernel launches on a GPU: at 512x512 input resolution, batch 2,
    K = 300, the default 1 GiB gives 5 chunks of 109 rows (32-row chunks took 16).
    """
    if chunk_size > 0:
        return chunk_size
    budget = chunk_bytes // CHUNK_LIVE_TENSORS
    if cpu:
        budget = min(budget, CPU_CHUNK_TENSOR_BYTES)
    return max(1, min(out_h, budget // max(1, row_bytes)))


class _EagerGradSum(torch.autograd.Function):
    """A loss whose gradient is computed during forward, by `fn(sim) -> (loss, grad)`.

    `fn` builds and frees its graphs chunk by chunk, so the peak is one chunk's graph; backward
    only scales the gradient. Costs one extra backward if never used.
    """

    @staticmethod
    def forward(ctx, sim: torch.Tensor, fn) -> torch.Tensor:  # type: ignore[override]  # noqa: ANN001
        total, grad = fn(sim.detach())
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None


def _check_shapes(
    student_embed: torch.Tensor,
    teacher_embed: torch.Tensor,
    bank_feats: torch.Tensor,
    bank_labels: torch.Tensor,
) -> None:
    if student_embed.dim() != 4 or student_embed.shape != teacher_embed.shape:
        raise ValueError(
            f"student {tuple(student_embed.shape)} and teacher {tuple(teacher_embed.shape)} "
            "embeddings: expected the same [B, D, h, w]"
        )
    k, d = bank_feats.shape
    if d != student_embed.shape[1] or tuple(bank_labels.shape) != (k,):
        raise ValueError(
            f"bank feats {tuple(bank_feats.shape)}, labels {tuple(bank_labels.shape)}: "
            f"expected [K, {student_embed.shape[1]}] and [K]"
        )


def instance_loss(
    student_embed: torch.Tensor,
    teacher_embed: torch.Tensor,
    bank_feats: torch.Tensor,
    bank_labels: torch.Tensor,
    calib: torch.Tensor | None,
    *,
    normalisation: str = "sum",
    tau_weak: float = 1.0,
    tau_strong: float = 1.0,
    eps: float = 1e-6,
    log_eps: float = 1e-10,
    weight: float = 0.5,
    out_size: tuple[int, int] | None = None,
    pixel_mask: torch.Tensor | None = None,
    calibrate_source: str = "student_mixed_logits",
    safe: bool = False,
    chunk_size: int = 0,
    chunk_bytes: int = 1 << 30,
    compiled: bool = False,
) -> torch.Tensor:
    """L_in = λ · mean over (masked) pixels of Σ_k −T_k log(S_s,k + log_eps) (docs/method.md §3.7).

    `safe=False` is the reference's arithmetic (normalisers without epsilon, `instance_target`); a
    pixel whose weak or strong normaliser is exactly 0 (the reference's 0/0 = NaN) contributes 0
    and no gradient, and still counts in the mean.

    T is the weak-view (teacher) distribution over the bank, calibrated with `calib` unless it is
    None, and carries no gradient; neither does the bank. `out_size` None works at feature
    resolution; otherwise similarities are computed at feature resolution and upsampled bilinearly
    to `out_size` (equal to upsampling the embeddings first, as similarity is linear in them).
    Output rows are processed `chunk_size` at a time (0: as many as fit `chunk_bytes`, and on a
    CPU, not `compiled`, a cache-sized chunk, see `chunk_rows`); each chunk's gradient at its
    rows is taken right away (in forward) and its graph freed, so the peak is one chunk, not
    [B, K, H, W] tensors; loss and gradient have the same bits for any chunking. The chunks are
    planned on the host: the loss never waits for the device. `compiled` runs each chunk's
    arithmetic through `torch.compile` (`train.compile`): its ~25 element-wise passes over
    [R, B, K, W] tensors forward and backward become a few fused kernels.

    Shapes:
        student_embed, teacher_embed: [B, D, h, w]; bank_feats: [K, D]; bank_labels: [K];
        calib: [B, C, h', w'] (resized to the loss resolution); pixel_mask: [B, H, W] at the loss
        resolution (h×w or out_size) -> scalar
    """
    _check_shapes(student_embed, teacher_embed, bank_feats, bank_labels)
    # similarities and their normalisers in the embeddings' precision, never autocast's 16 bits
    with torch.autocast(student_embed.device.type, enabled=False):
        return _instance_loss(
            student_embed, teacher_embed, bank_feats, bank_labels, calib,
            normalisation=normalisation, tau_weak=tau_weak, tau_strong=tau_strong, eps=eps,
            log_eps=log_eps, weight=weight, out_size=out_size, pixel_mask=pixel_mask,
            calibrate_source=calibrate_source, safe=safe, chunk_size=chunk_size,
            chunk_bytes=chunk_bytes, compiled=compiled,
        )  # fmt: skip


def _instance_loss(
    student_embed: torch.Tensor,
    teacher_embed: torch.Tensor,
    bank_feats: torch.Tensor,
    bank_labels: torch.Tensor,
    calib: torch.Tensor | None,
    *,
    normalisation: str,
    tau_weak: float,
    tau_strong: float,
    eps: float,
    log_eps: float,
    weight: float,
    out_size: tuple[int, int] | None,
    pixel_mask: torch.Tensor | None,
    calibrate_source: str,
    safe: bool,
    chunk_size: int,
    chunk_bytes: int,
    compiled: bool,
) -> torch.Tensor:
    bank_feats, bank_labels = bank_feats.detach(), bank_labels.to(student_embed.device)
    b, _, h, w = student_embed.shape
    k = bank_feats.shape[0]
    out_h, out_w = (h, w) if out_size is None else tuple(out_size)
    if pixel_mask is not None and tuple(pixel_mask.shape) != (b, out_h, out_w):
        raise ValueError(f"pixel_mask {tuple(pixel_mask.shape)}: expected {(b, out_h, out_w)}")
    # rows-first layout [h, B, K, w]: row chunks and row gathers are contiguous slices
    with torch.no_grad():
        weak = torch.einsum(
            "bdhw,kd->hbkw", teacher_embed.detach(), bank_feats.to(teacher_embed.dtype)
        ).contiguous()
        if calib is not None:
            if tuple(calib.shape[2:]) != (out_h, out_w):
                calib = F.interpolate(calib, (out_h, out_w), mode="bilinear", align_corners=False)
            calib = calib.permute(2, 0, 1, 3).contiguous()  # [H, B, C, W]
    strong = torch.einsum("bdhw,kd->hbkw", student_embed, bank_feats.to(student_embed.dtype))
    strong = strong.contiguous()  # [h, B, K, w]
    mask = None if pixel_mask is None else pixel_mask.to(strong.dtype).permute(1, 0, 2)  # [H, B, W]

    loss_fn = _compiled_chunk_loss() if compiled else _chunk_loss
    options = dict(out_w=out_w, normalisation=normalisation, tau_weak=tau_weak,
                   tau_strong=tau_strong, eps=eps, log_eps=log_eps, safe=safe,
                   calibrate_source=calibrate_source)  # fmt: skip
    plan = _plan_rows(h, out_h, strong.device, strong.dtype)
    row_bytes = b * k * out_w * strong.element_size()
    # cache-sized chunks for the eager passes on a CPU; compiled ones are fused (and each chunk
    # shape is a graph of its own)
    cpu = strong.device.type == "cpu" and not compiled
    rows = chunk_rows(out_h, row_bytes, chunk_size, chunk_bytes, cpu=cpu)
    spans = [(r0, min(r0 + rows, out_h)) for r0 in range(0, out_h, rows)]

    def chunk_loss(r0: int, r1: int, rows: torch.Tensor) -> torch.Tensor:
        return loss_fn(
            rows, plan.rows(weak, r0, r1), None if calib is None else calib[r0:r1],
            None if mask is None else mask[r0:r1], bank_labels, **options,
        )  # fmt: skip

    def loss_and_grad(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed loss and its gradient at `sim`, chunk by chunk. Per chunk, only the
        gradient at its output rows is taken; the height lerp's backward runs once over all rows,
        so the gradient and the sum (over one [H, B, W] tensor) have the bits of a single chunk."""
        per_pixel = sim.new_empty((out_h, b, out_w))
        grad_rows = sim.new_empty((out_h, *sim.shape[1:]))  # d loss / d (rows at output height)
        for r0, r1 in spans:
            x = plan.rows(sim, r0, r1).detach().requires_grad_()
            with torch.enable_grad():
                part = chunk_loss(r0, r1, x)
                (x_grad,) = torch.autograd.grad(part.sum(), x)
            grad_rows[r0:r1] = x_grad
            per_pixel[r0:r1] = part.detach()
        grad = grad_rows  # the same height: the rows are `sim`'s own
        if not plan.identity:
            leaf = sim.requires_grad_()
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(plan.rows(leaf, 0, out_h), leaf, grad_rows)
        # + 0.0 turns -0 into +0, as the gradient accumulated into zeros did before
        return per_pixel.sum(), grad + 0.0

    if strong.requires_grad:
        total = _EagerGradSum.apply(strong, loss_and_grad)
    else:
        per_pixel = [chunk_loss(r0, r1, plan.rows(strong, r0, r1)) for r0, r1 in spans]
        total = torch.cat(per_pixel).sum()
    count = mask.sum().clamp_min(1) if mask is not None else b * out_h * out_w
    return weight * total / count
