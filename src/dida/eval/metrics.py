"""Segmentation metrics from a confusion matrix accumulated over a whole dataset (as mmseg does).

Intersection and union are summed over all images before dividing (not averaged per image),
pixels whose label is `ignore_index` are skipped, and classes absent from both prediction and label
are NaN and left out of the means (nan-mean, as mmseg's `mean_iou`). Evaluation subsets (e.g.
SYNTHIA's 16 and 13 classes, docs/method.md §4.2) are means over the per-class values, never
rescaled full means. The evaluator follows detectron2's `reset/process/compute` protocol; under
DDP the confusion matrix is all-reduced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from dida.data.labels import IGNORE_INDEX


def confusion_matrix(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Count (label, prediction) pairs with `torch.bincount`, skipping ignored label pixels.

    Predictions outside `[0, num_classes)` on valid pixels raise a ValueError.

    Shapes:
        pred, label: any identical shape, e.g. [B, H, W] or [H, W] (integer).
        returns: [C, C] int64, rows = label class, columns = predicted class.
    """
    if pred.shape != label.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}"
        )
    label = label.reshape(-1).long()  # [N]
    pred = pred.reshape(-1).long().to(label.device)  # [N]
    valid = label != ignore_index
    label, pred = label[valid], pred[valid]
    if label.numel():  # one min/max pass per tensor (full-resolution labels are large)
        lo, hi = torch.aminmax(label)
        if int(hi) >= num_classes or int(lo) < 0:
            raise ValueError(f"label values must be in [0, {num_classes}) or {ignore_index}")
        lo, hi = torch.aminmax(pred)
        if int(hi) >= num_classes or int(lo) < 0:
            raise ValueError(f"prediction values must be in [0, {num_classes})")
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)  # [C, C]


def _nanmean(values: torch.Tensor) -> float:
    return float(torch.nanmean(values))  # NaN when every value is NaN


def metrics_from_confusion(
    conf: torch.Tensor,
    class_names: Sequence[str] | None = None,
    subsets: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Per-class IoU/Acc, their nan-means and overall accuracy, as fractions in [0, 1].

    Returns a dict with `aAcc`, `mIoU`, `mAcc`, `IoU` and `Acc` (class name -> value, NaN where
    the class is absent from both prediction and label, resp. from the label), `num_pixels`, and
    for every subset `s`: `mIoU<s>` and `mAcc<s>` plus `subsets[s]` = the class ids. `to_jsonable`
    turns NaN into None.

    Shapes:
        conf: [C, C], rows = label, columns = prediction.
    """
    num_classes = conf.shape[0]
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    conf = conf.double().cpu()
    intersect = conf.diagonal()
    area_label = conf.sum(dim=1)
    area_pred = conf.sum(dim=0)
    union = area_label + area_pred - intersect
    nan = torch.tensor(math.nan, dtype=torch.float64)
    iou = torch.where(union > 0, intersect / union.clamp(min=1), nan)
    acc = torch.where(area_label > 0, intersect / area_label.clamp(min=1), nan)
    total = float(area_label.sum())
    results: dict[str, Any] = {
        "aAcc": float(intersect.sum()) / total if total > 0 else math.nan,
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "IoU": {n: float(v) for n, v in zip(names, iou, strict=True)},
        "Acc": {n: float(v) for n, v in zip(names, acc, strict=True)},
        "num_pixels": int(total),
        "subsets": {},
    }
    for key, ids in (subsets or {}).items():
        ids = [int(i) for i in ids]
        if not ids or min(ids) < 0 or max(ids) >= num_classes:
            raise ValueError(f"subset '{key}': class ids {ids} must be in [0, {num_classes})")
        index = torch.tensor(ids)
        results[f"mIoU{key}"] = _nanmean(iou[index])
        results[f"mAcc{key}"] = _nanmean(acc[index])
        results["subsets"][key] = ids
    return results


class SegEvaluator:
    """Accumulates a confusion matrix over `process` calls; `compute` reduces it across ranks.

    Example:
        >>> ev = SegEvaluator(19, class_names=CLASSES)
        >>> ev.process(pred, label)  # as many times as there are images
        >>> results = ev.compute()  # results["mIoU"], results["IoU"]["road"], ...
    """

    def __init__(
        self,
        num_classes: int,
        *,
        ignore_index: int = IGNORE_INDEX,
        class_names: Sequence[str] | None = None,
        subsets: Mapping[str, Sequence[int]] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.subsets = dict(subsets or {})
        self.device = torch.device(device) if device is not None else None
        self.conf: torch.Tensor | None = None

    def reset(self) -> None:
        self.conf = None

    def process(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add one batch of predictions.

        Shapes:
            pred, label: [B, H, W] or [H, W] integer class ids (label may hold `ignore_index`).
        """
        conf = confusion_matrix(pred, label, self.num_classes, self.ignore_index)
        if self.device is not None:
            conf = conf.to(self.device)
        self.conf = conf if self.conf is None else self.conf + conf.to(self.conf.device)

    def confusion(self) -> torch.Tensor:
        """The confusion matrix summed over all processed batches and, under DDP, all ranks.

        Shapes:
            returns: [C, C] int64 on the CPU.
        """
        conf = self.conf
        if conf is None:
            device = self.device or torch.device("cpu")
            conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            conf = conf.clone()
            if dist.get_backend() == "nccl" and conf.device.type != "cuda":
                conf = conf.cuda()
            dist.all_reduce(conf, op=dist.ReduceOp.SUM)
        return conf.cpu()

    def compute(self) -> dict[str, Any]:
        """All metrics (see `metrics_from_confusion`); call on every rank under DDP."""
        return metrics_from_confusion(self.confusion(), self.class_names, self.subsets)


def to_jsonable(results: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `results` with NaN floats replaced by None (strict JSON)."""

    def convert(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, Mapping):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [convert(v) for v in value]
        return value

    return convert(results)


def _pct(value: float) -> str:
    return "nan" if math.isnan(value) else f"{100 * value:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
    return "\n".join([line, fmt(header), line, *[fmt(r) for r in rows], line])


def format_results(results: Mapping[str, Any]) -> str:
    """Console tables, ×100: per class (Class | IoU | Acc) and summary (aAcc | mIoU | mAcc | …)."""
    rows = [[n, _pct(v), _pct(results["Acc"][n])] for n, v in results["IoU"].items()]
    header = ["aAcc", "mIoU", "mAcc"]
    values = [_pct(results["aAcc"]), _pct(results["mIoU"]), _pct(results["mAcc"])]
    for key in results.get("subsets", {}):
        header.append(f"mIoU{key}")
        values.append(_pct(results[f"mIoU{key}"]))
    return "\n".join(
        [
            "per class results:",
            _table(["Class", "IoU", "Acc"], rows),
            "Summary:",
            _table(header, [values]),
        ]
    )
