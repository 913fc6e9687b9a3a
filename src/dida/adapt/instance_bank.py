"""DIDA's labelled instance bank: K source feature vectors with class labels.

docs/method.md §3.2–§3.3 describes initialisation and update rules.

The bank lives in registered buffers (saved in checkpoints, moved by `.to()`); it is filled online
(class-balanced) or loaded, then pulled towards source class vectors with momentum, by one of two
rules: `reference` (the released code, docs/method.md §3.3.1: one momentum step per update event
with image 0's features averaged over the class positions of the whole batch, entries of absent
classes decayed toward 0) or `per_image` (each image's own class vectors, absent classes
untouched).
Under torch.distributed every rank gathers every rank's class vectors and applies them in rank
order, so all ranks hold the identical bank.
Bank files are read and written by `dida.engine.bank_io`.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

UPDATE_MODES = ("class_mean", "boundary")
UPDATE_RULES = ("reference", "per_image")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def boundary_mask(labels: torch.Tensor, threshold: int = 2) -> torch.Tensor:
    """Pixels whose 3×3 neighbourhood (inside the image) holds at least `threshold` distinct labels.

    The ignore label counts as a label, as in the reference BPS.

    Shapes:
        labels: [B, h, w] int64 -> [B, h, w] bool
    """
    b, h, w = labels.shape
    # replicate padding only repeats values already inside each 3x3 window, so it ignores the border
    padded = F.pad(labels[:, None].float(), (1, 1, 1, 1), mode="replicate")  # [B, 1, h+2, w+2]
    if threshold <= 1:
        return torch.ones_like(labels, dtype=torch.bool)
    if threshold == 2:  # two distinct labels <=> the window's max differs from its min
        hi = F.max_pool2d(padded, 3, stride=1)
        lo = -F.max_pool2d(-padded, 3, stride=1)
        return (hi != lo)[:, 0]
    windows = F.unfold(padded, kernel_size=3)  # [B, 9, h*w]
    ordered = windows.sort(dim=1).values
    distinct = 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)  # [B, h*w]
    return (distinct >= threshold).view(b, h, w)


def class_vectors(
    embed: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    mode: str = "class_mean",
    boundary_threshold: int = 2,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image class vectors from each image's own pixels, and which classes are present.

    `class_mean`: the class mean. `boundary`: ½ class mean + ½ mean of the class's boundary pixels,
    or the class mean where the class has no boundary pixel.

    Shapes:
        embed: [B, D, h, w], labels: [B, h, w] -> vectors [B, C, D] (at least float32),
        present [B, C] bool
    """
    b, d, h, w = embed.shape
    c = num_classes
    valid = (labels >= 0) & (labels < c) & (labels != ignore_index)
    bins = torch.where(valid, labels, torch.full_like(labels, c))  # invalid pixels -> bin C
    nbins = c + 1
    if mode == "boundary":
        on_edge = boundary_mask(labels, boundary_threshold) & valid
        bins = bins + on_edge.long() * nbins  # boundary pixels -> bins C+1 .. 2C+1
        nbins = 2 * nbins
    elif mode != "class_mean":
        raise ValueError(f"bank update mode '{mode}': expected one of {UPDATE_MODES}")
    flat_bins = bins.reshape(b, 1, h * w)  # [B, 1, h*w]
    feats = _at_least_fp32(embed.detach()).reshape(b, d, h * w)  # [B, D, h*w]
    sums = feats.new_zeros(b, d, nbins).scatter_add_(2, flat_bins.expand(b, d, h * w), feats)
    counts = feats.new_zeros(b, nbins)
    counts.scatter_add_(1, flat_bins[:, 0], torch.ones_like(flat_bins[:, 0], dtype=feats.dtype))
    sums = sums.transpose(1, 2)  # [B, nbins, D]
    if mode == "boundary":
        edge_sums, edge_counts = sums[:, c + 1 : 2 * c + 1], counts[:, c + 1 : 2 * c + 1]
        all_counts = counts[:, :c] + edge_counts
        means = (sums[:, :c] + edge_sums) / all_counts.clamp_min(1)[..., None]
        edge_means = edge_sums / edge_counts.clamp_min(1)[..., None]
        has_edge = (edge_counts > 0)[..., None]
        vectors = torch.where(has_edge, 0.5 * means + 0.5 * edge_means, means)
        return vectors, all_counts > 0
    counts = counts[:, :c]
    return sums[:, :c] / counts.clamp_min(1)[..., None], counts > 0


def reference_class_means(
    embed: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """The released code's per-class vectors (docs/method.md §3.3.1), vectorised.

    For class c, the positions p where *any* image of the batch has label c are collected (with
    multiplicity: a position labelled c in two images counts twice) and image 0's features are
    averaged over them. Classes absent from the batch get the zero vector.

    Shapes:
        embed: [B, D, h, w], labels: [B, h, w] -> [C, D] float32 (float64 stays float64)
    """
    c = num_classes
    feats = _at_least_fp32(embed[0].detach()).flatten(1)  # [D, h*w]
    valid = (labels >= 0) & (labels < c) & (labels != ignore_index)
    bins = torch.where(valid, labels, torch.full_like(labels, c)).flatten(1)  # [B, h*w]
    weights = F.one_hot(bins, c + 1)[..., :c].sum(0).to(feats.dtype)  # [h*w, C] multiplicities
    sums = weights.t() @ feats.t()  # [C, D]
    counts = weights.sum(0)[:, None]  # [C, 1]
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))


def _gather_ranks(
    vectors: torch.Tensor, present: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's per-image vectors in rank order (identity when not distributed)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return vectors, present
    world = dist.get_world_size()
    n = torch.tensor([vectors.shape[0]], device=vectors.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    most = int(max(int(s) for s in sizes))
    # pad to the largest local batch so all_gather sees equal shapes; padding rows are dropped
    pad = most - vectors.shape[0]
    vec = F.pad(vectors, (0, 0, 0, 0, 0, pad))
    pres = F.pad(present.to(torch.uint8), (0, 0, 0, pad))
    vec_all = [torch.empty_like(vec) for _ in range(world)]
    pres_all = [torch.empty_like(pres) for _ in range(world)]
    dist.all_gather(vec_all, vec)
    dist.all_gather(pres_all, pres)
    keep = [int(s) for s in sizes]
    vectors = torch.cat([v[:k] for v, k in zip(vec_all, keep, strict=True)])
    present = torch.cat([p[:k] for p, k in zip(pres_all, keep, strict=True)]).bool()
    return vectors, present


class InstanceBank(nn.Module):
    """K labelled feature vectors updated from source class vectors (DIDA's instance bank).

    Buffers: `feats` [K, D] float32, `labels` [K] int64, `count` [] int64 (entries filled).
    `filled` is the host's copy of `count` (it changes only while the bank fills, on the host's
    initiative), so that checking `is_full` never waits for the device.

    Example:
        bank = InstanceBank(300, 256, 19)
        if not bank.is_full:
            bank.fill_online_(src_embed, src_label)
        elif step % update_interval == 0:
            bank.update_(src_embed, src_label)
    """

    def __init__(
        self,
        size: int,
        dim: int,
        num_classes: int,
        momentum: float = 0.999,
        update_mode: str = "class_mean",
        boundary_threshold: int = 2,
        ignore_index: int = 255,
        update_rule: str = "per_image",
    ) -> None:
        super().__init__()
        if update_mode not in UPDATE_MODES:
            raise ValueError(f"bank update mode '{update_mode}': expected one of {UPDATE_MODES}")
        if update_rule not in UPDATE_RULES:
            raise ValueError(f"bank update rule '{update_rule}': expected one of {UPDATE_RULES}")
        if update_rule == "reference" and update_mode != "class_mean":
            raise ValueError("bank update rule 'reference' needs update_mode=class_mean")
        if size <= 0 or dim <= 0 or num_classes <= 0:
            raise ValueError(
                f"bank size/dim/classes must be positive: {size}, {dim}, {num_classes}"
            )
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"bank momentum {momentum}: expected a value in [0, 1]")
        self.size, self.dim, self.num_classes = size, dim, num_classes
        self.momentum = momentum
        self.update_mode = update_mode
        self.update_rule = update_rule
        self.boundary_threshold = boundary_threshold
        self.ignore_index = ignore_index
        self.register_buffer("feats", torch.zeros(size, dim))
        self.register_buffer("labels", torch.zeros(size, dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.filled = 0

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, dim={self.dim}, num_classes={self.num_classes}, "
            f"momentum={self.momentum}, update_mode={self.update_mode}, "
            f"update_rule={self.update_rule}"
        )

    @property
    def is_full(self) -> bool:
        return self.filled >= self.size

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.filled = int(self.count)  # one read when a checkpoint is loaded

    def class_counts(self) -> torch.Tensor:
        """Number of filled entries per class. Shapes: -> [C] int64."""
        n = self.filled
        return torch.bincount(self.labels[:n], minlength=self.num_classes)[: self.num_classes]

    @torch.no_grad()
    def init_random_(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm Gaussian vectors, labels round-robin over the classes; the bank is full."""
        feats = torch.randn(self.size, self.dim, generator=generator)
        self.feats.copy_(F.normalize(feats, dim=1))
        self.labels.copy_(torch.arange(self.size) % self.num_classes)
        self.count.fill_(self.size)
        self.filled = self.size

    @torch.no_grad()
    def load_(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """Fill the whole bank from given features and labels (e.g. from `read_bank_file`).

        Shapes:
            feats: [K, D], labels: [K]
        """
        if tuple(feats.shape) != (self.size, self.dim) or tuple(labels.shape) != (self.size,):
            raise ValueError(
                f"bank of shape feats {tuple(feats.shape)}, labels {tuple(labels.shape)}: "
                f"expected ({self.size}, {self.dim}) and ({self.size},)"
            )
        labels = labels.long()
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"bank labels must lie in [0, {self.num_classes})")
        self.feats.copy_(feats)
        self.labels.copy_(labels)
        self.count.fill_(self.size)
        self.filled = self.size
        missing = (self.class_counts() == 0).nonzero().flatten().tolist()
        if missing:
            logger.warning("instance bank has no entries for classes %s", missing)

    @torch.no_grad()
    def fill_online_(self, embed: torch.Tensor, labels: torch.Tensor) -> bool:
        """Append per-image source class means, class-balanced; returns True once the bank is full.

        A class takes entries up to ceil(K / C). When no present class has room left but the bank
        is not full (some classes never occur, e.g. SYNTHIA), the present classes are appended
        least-populated first, one entry per class per call, so the bank still fills evenly.

        Shapes:
            embed: [B, D, h, w], labels: [B, h, w]
        """
        self._check_inputs(embed, labels)
        vectors, present = _gather_ranks(*self._class_vectors(embed, labels, "class_mean"))
        cap = math.ceil(self.size / self.num_classes)
        counts = self.class_counts().tolist()
        added = False
        for i in range(vectors.shape[0]):
            for c in present[i].nonzero().flatten().tolist():
                if self.is_full:
                    return True
                if counts[c] < cap:
                    self._append(vectors[i, c], c)
                    counts[c] += 1
                    added = True
        if not added and not self.is_full:
            seen = present.any(dim=0)
            first = present.float().argmax(dim=0)  # first image holding each class
            for c in sorted(seen.nonzero().flatten().tolist(), key=lambda k: (counts[k], k)):
                if self.is_full:
                    break
                self._append(vectors[first[c], c], c)
        return self.is_full

    @torch.no_grad()
    def update_(self, embed: torch.Tensor, labels: torch.Tensor) -> None:
        """One update event with the configured rule (`reference` or `per_image`).

        `reference`: f_k ← m f_k + (1 − m) v_{l_k} once, with v from `reference_class_means`
        (absent classes: v = 0, so their entries decay). Only image 0 is read, so callers may
        pass `embed[:1]` with the full `labels`. `per_image`: for each image in batch order,
        f_k ← m f_k + (1 − m) v_c for all k with l_k = c and c present in that image.

        Shapes:
            embed: [B, D, h, w] (or [1, D, h, w] for `reference`), labels: [B, h, w]
        """
        if self.update_rule == "reference":
            self._update_reference_(embed, labels)
        else:
            self._update_per_image_(embed, labels)

    def _update_reference_(self, embed: torch.Tensor, labels: torch.Tensor) -> None:
        self._check_inputs(embed, labels, any_batch=True)
        means = reference_class_means(
            embed.to(self.feats.device), labels.to(self.feats.device), self.num_classes,
            self.ignore_index,
        )  # fmt: skip
        present = torch.ones(1, self.num_classes, dtype=torch.bool, device=means.device)
        events, _ = _gather_ranks(means[None], present)
        n = self.filled
        feats, entry_labels = self.feats[:n], self.labels[:n]
        for cache in events:  # one event per rank, in rank order
            feats.lerp_(cache.index_select(0, entry_labels).to(feats.dtype), 1.0 - self.momentum)

    def _update_per_image_(self, embed: torch.Tensor, labels: torch.Tensor) -> None:
        self._check_inputs(embed, labels)
        vectors, present = _gather_ranks(*self._class_vectors(embed, labels, self.update_mode))
        n = self.filled
        entry_labels = self.labels[:n]
        feats = self.feats[:n]
        m = self.momentum
        for i in range(vectors.shape[0]):
            target = vectors[i].index_select(0, entry_labels)  # [n, D]
            hit = present[i].index_select(0, entry_labels)[:, None]  # [n, 1]
            feats.copy_(torch.where(hit, m * feats + (1.0 - m) * target, feats))

    def _class_vectors(
        self, embed: torch.Tensor, labels: torch.Tensor, mode: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return class_vectors(
            embed.to(self.feats.device),
            labels.to(self.feats.device),
            self.num_classes,
            mode=mode,
            boundary_threshold=self.boundary_threshold,
            ignore_index=self.ignore_index,
        )

    def _append(self, vector: torch.Tensor, label: int) -> None:
        n = self.filled
        self.feats[n] = vector
        self.labels[n] = label
        self.count += 1
        self.filled += 1

    def _check_inputs(
        self, embed: torch.Tensor, labels: torch.Tensor, any_batch: bool = False
    ) -> None:
        if embed.dim() != 4 or embed.shape[1] != self.dim:
            raise ValueError(
                f"embedding of shape {tuple(embed.shape)}: expected [B, {self.dim}, h, w]"
            )
        expected = (embed.shape[0], *embed.shape[2:])
        if any_batch and labels.dim() == 3 and labels.shape[1:] == embed.shape[2:]:
            return
        if tuple(labels.shape) != expected:
            raise ValueError(f"labels of shape {tuple(labels.shape)}: expected {expected}")
