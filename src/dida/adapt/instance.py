"""DIDA's instance level: pixel-to-bank similarities, the two cross-level interactions and L_in.

METHOD.md §3.4–3.7: similarities are dot products with the bank, normalised over K (`sum` or
`softmax`); "gather" calibrates the weak-view similarities with class probabilities of each bank
entry's class; "scatter" smooths the pseudo-label probabilities with the aggregated similarities;
the loss is the cross-entropy between the weak-view target and the strong-view similarities,
computed in row chunks whose gradients are accumulated during forward to bound the memory.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

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
    """S / Σ S over `dim` (see `normalise_similarity`), and where the normaliser is non-zero."""
    if safe:
        sim = sim.clamp_min(0)
        return sim / (sim.sum(dim=dim, keepdim=True) + eps), None
    den = sim.sum(dim=dim, keepdim=True)
    ok = den != 0
    out = torch.where(ok, sim / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(sim))
    return out, ok.squeeze(dim)


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
    """The instance-level pseudo-label T over K from raw weak-view similarities (§3.4, §3.5).

    Without `calib`: T = the normalised similarities. With it, the semantic → instance "gather":
    T_k ∝ S_w,k · calib[l_k]. `safe=False` (the reference): T = S_w ⊙ G / Σ_k (S_w ⊙ G) with no
    epsilon (T may be negative with raw logits; where the normaliser is 0, T is 0). `safe=True`:
    the normalised S_w times G (clamped at 0 for `teacher_probs`), divided by the sum + eps.

    Returns:
        `(T, ok)`: `ok` is False where a normaliser was exactly 0 (None when `safe`).

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


def _source_rows(r0: int, r1: int, h: int, out_h: int, device: torch.device):
    """Source rows and weights of output rows r0:r1 for bilinear, align_corners=False resizing."""
    y = torch.arange(r0, r1, device=device, dtype=torch.float64)
    src = ((y + 0.5) * (h / out_h) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(h - 1)
    i1 = (i0 + 1).clamp_max(h - 1)
    return i0, i1, src - i0.to(src.dtype)


def _rows(
    slab: torch.Tensor, i0: torch.Tensor, i1: torch.Tensor, lam: torch.Tensor, out_w: int
) -> torch.Tensor:
    """Bilinear rows from a slab of source rows: height by explicit lerp, width by F.interpolate.

    The same separable weights as one full F.interpolate(bilinear, align_corners=False).

    Shapes:
        slab: [h', B, K, w] (rows first, so row gathers are contiguous) -> [R, B, K, out_w]
    """
    if len(i0) == len(slab) and bool((lam == 0).all()):
        rows = slab  # same height: the rows themselves
    else:
        # advanced indexing: index_select along dim 0 of a 4-D tensor is ~10x slower on CPU
        lam = lam.to(slab.dtype).view(-1, 1, 1, 1)  # [R, 1, 1, 1]
        rows = torch.lerp(slab[i0], slab[i1], lam)  # [R, B, K, w]
    r, b, k, w = rows.shape
    if w == out_w:
        return rows
    flat = rows.reshape(r * b * k, 1, w)  # [R*B*K, 1, w]
    wide = F.interpolate(flat, out_w, mode="linear", align_corners=False)  # [R*B*K, 1, W]
    return wide.view(r, b, k, out_w)


class _EagerGradSum(torch.autograd.Function):
    """Sum of chunk losses whose gradient is accumulated chunk by chunk during forward.

    Each chunk's graph is built and freed inside forward, so peak memory is one chunk's graph;
    backward only scales the accumulated gradient. Costs one extra backward if never used.
    """

    @staticmethod
    def forward(ctx, sim: torch.Tensor, chunks: list) -> torch.Tensor:  # type: ignore[override]
        total = sim.new_zeros((), dtype=torch.promote_types(sim.dtype, torch.float32))
        grad = torch.zeros_like(sim)
        for lo, hi, fn in chunks:
            slab = sim[lo:hi].detach().requires_grad_(True)
            with torch.enable_grad():
                part = fn(slab)
            (slab_grad,) = torch.autograd.grad(part, slab)
            grad[lo:hi] += slab_grad
            total += part.detach()
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
    chunk_size: int = 32,
) -> torch.Tensor:
    """L_in = λ · mean over (masked) pixels of Σ_k −T_k log(S_s,k + log_eps) (METHOD.md §3.7).

    `safe=False` is the reference's arithmetic (normalisers without epsilon, `instance_target`); a
    pixel whose weak or strong normaliser is exactly 0 (the reference's 0/0 = NaN) contributes 0
    and no gradient, and still counts in the mean.

    T is the weak-view (teacher) distribution over the bank, calibrated with `calib` unless it is
    None, and carries no gradient; neither does the bank. `out_size` None works at feature
    resolution; otherwise similarities are computed at feature resolution and upsampled bilinearly
    to `out_size` (equal to upsampling the embeddings first, as similarity is linear in them).
    Output rows are processed `chunk_size` at a time; each chunk's gradient is taken right away
    (in forward) and its graph freed, so the peak is one chunk, not [B, K, H, W] tensors.

    Shapes:
        student_embed, teacher_embed: [B, D, h, w]; bank_feats: [K, D]; bank_labels: [K];
        calib: [B, C, h', w'] (resized to the loss resolution); pixel_mask: [B, H, W] at the loss
        resolution (h×w or out_size) -> scalar
    """
    _check_shapes(student_embed, teacher_embed, bank_feats, bank_labels)
    bank_feats, bank_labels = bank_feats.detach(), bank_labels.to(student_embed.device)
    b, _, h, w = student_embed.shape
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

    def chunk_loss(r0: int, r1: int, lo: int, hi: int, i0, i1, lam, slab) -> torch.Tensor:
        with torch.no_grad():
            target, _ = instance_target(
                _rows(weak[lo:hi], i0, i1, lam, out_w), None if calib is None else calib[r0:r1],
                bank_labels, normalisation=normalisation, tau=tau_weak, source=calibrate_source,
                safe=safe, eps=eps, dim=2,
            )  # fmt: skip
        pred, ok = _normalise(
            _rows(slab, i0, i1, lam, out_w), normalisation, tau_strong, eps, dim=2, safe=safe
        )
        per_pixel = -(target * torch.log(pred + log_eps)).sum(dim=2)  # [R, B, W]
        if ok is not None:  # zero strong normaliser: no contribution (T is already 0 where its is)
            per_pixel = torch.where(ok, per_pixel, torch.zeros_like(per_pixel))
        if mask is not None:
            per_pixel = per_pixel * mask[r0:r1]
        return per_pixel.sum()

    step = max(1, chunk_size)
    chunks = []
    for r0 in range(0, out_h, step):
        r1 = min(r0 + step, out_h)
        i0, i1, lam = _source_rows(r0, r1, h, out_h, strong.device)
        # the last row's second tap is only needed when its weight is non-zero
        lo, hi = int(i0[0]), int(i0[-1]) + 1 + int(lam[-1] > 0)
        i1 = i1.clamp_max(hi - 1)
        fn = functools.partial(chunk_loss, r0, r1, lo, hi, i0 - lo, i1 - lo, lam)
        chunks.append((lo, hi, fn))
    if strong.requires_grad:
        total = _EagerGradSum.apply(strong, chunks)
    else:
        total = sum((fn(strong[lo:hi]) for lo, hi, fn in chunks), strong.new_zeros(()))
    count = mask.sum().clamp_min(1) if mask is not None else b * out_h * out_w
    return weight * total / count
