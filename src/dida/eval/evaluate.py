"""Evaluate a segmentor on a validation dataset: used by `dida test` and training.

Batch 1, the image at the test scale, logits resized to the full-resolution label, argmax, and a
dataset-level confusion matrix. Under DDP each rank takes indices `rank::world` (no duplicates) and
the confusion matrix is summed over ranks, so every rank returns the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from dida.config import ModelConfig
from dida.data.labels import IGNORE_INDEX
from dida.engine.distributed import get_rank_world
from dida.engine.logging import Progress
from dida.errors import CheckpointError, UserError
from dida.eval.inference import class_max, slide_inference, whole_inference
from dida.eval.metrics import SegEvaluator
from dida.models import load_pretrained, segmentor_from_config

PredictionCallback = Callable[[torch.Tensor, dict[str, Any]], None]
MODES = ("whole", "slide")


def _first(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return batch[0]


def resolve_device(name: str | None) -> torch.device:
    """`auto`/None -> cuda when available, else cpu; anything else as given (validated)."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device '{name}': not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}': CUDA is not available on this machine")
    return device


def _build_uninitialised(model_cfg: ModelConfig) -> nn.Module:
    """The segmentor with allocated but uninitialised weights (skips MiT-B5's ~4 s random init).

    Falls back to a normal build when the model has buffers a state dict does not restore.
    """
    try:
        with torch.device("meta"):
            model = segmentor_from_config(model_cfg)
    except (RuntimeError, NotImplementedError):  # constructor code that needs real tensors
        return segmentor_from_config(model_cfg)
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers()):
        return segmentor_from_config(model_cfg)
    return model.to_empty(device="cpu")


def load_segmentor(
    model_cfg: ModelConfig, checkpoint: str | Path, device: torch.device | str = "cpu"
) -> nn.Module:
    """Build `model_cfg` and load a checkpoint's student strictly (no missing weights), eval mode.

    Raises:
        CheckpointError: missing/unreadable file, weights of another model.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint file not found")
    model = _build_uninitialised(model_cfg)
    report = load_pretrained(model, checkpoint)
    hrda = model_cfg.hrda.enabled
    if not hrda and any(k.startswith("attention_head.") for k in report.unexpected):
        raise CheckpointError(
            f"{checkpoint}: an HRDA checkpoint (scale-attention head); evaluate it with "
            "model.hrda.enabled=true"
        )
    if report.missing:  # also guarantees that no uninitialised weight is left
        hint = " (an HRDA model needs an HRDA checkpoint)" if hrda else ""
        raise CheckpointError(
            f"{checkpoint}: {len(report.missing)} weights of the {model_cfg.variant} model are "
            f"missing (e.g. {report.missing[0]}); is it a checkpoint of this model?{hint}"
        )
    return model.to(device).eval()


def predict(
    model: nn.Module,
    img: torch.Tensor,
    out_size: Sequence[int],
    *,
    mode: str = "whole",
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    num_classes: int | None = None,
    batched: bool = False,
    aug_ratios: Sequence[float] | None = None,
    flip: bool = False,
) -> torch.Tensor:
    """Logits at `out_size` by whole-image or sliding-window inference (call under no_grad).

    `batched` runs all slide windows of an image as one batch. An `HRDASegmentor` runs its own
    detail-branch windows inside each call. With `aug_ratios` (image scale factors) and/or
    `flip` (also the horizontally flipped image), as mmseg's `--aug-test`, the result is the
    mean of the softmax probabilities of every view instead of logits (same argmax use).

    Shapes:
        img: [B, 3, h, w] normalised.
        returns: [B, C, out_h, out_w] logits (probabilities with test-time augmentation).
    """
    if aug_ratios or flip:
        kwargs = dict(mode=mode, crop_size=crop_size, stride=stride, num_classes=num_classes,
                      batched=batched)  # fmt: skip
        return _augmented(model, img, out_size, list(aug_ratios or [1.0]), flip, kwargs)
    if mode == "whole":
        return whole_inference(model, img, out_size)
    if mode == "slide":
        if crop_size is None or stride is None or num_classes is None:
            raise ValueError("slide inference needs crop_size, stride and num_classes")
        return slide_inference(model, img, out_size, crop_size, stride, num_classes, batched)
    raise ValueError(f"unknown inference mode '{mode}'; expected one of {MODES}")


def _augmented(
    model: nn.Module, img: torch.Tensor, out_size: Sequence[int], ratios: list[float],
    flip: bool, kwargs: dict,
) -> torch.Tensor:  # fmt: skip
    """Mean softmax over scaled (and flipped) views. Shapes: [B, 3, h, w] -> [B, C, H, W]."""
    import torch.nn.functional as F

    total, views = None, 0
    for ratio in ratios:
        size = [max(1, round(s * ratio)) for s in img.shape[-2:]]
        scaled = img if ratio == 1.0 else F.interpolate(
            img, size=size, mode="bilinear", align_corners=False
        )  # fmt: skip
        for flipped in (False, True) if flip else (False,):
            view = scaled.flip(-1) if flipped else scaled
            logits = predict(model, view, out_size, **kwargs)
            probs = (logits.flip(-1) if flipped else logits).softmax(dim=1)
            total = probs if total is None else total + probs
            views += 1
    return total / views


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    num_classes: int,
    mode: str = "whole",
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    batched_slide: bool = False,
    device: torch.device | str = "cpu",
    subsets: Mapping[str, Sequence[int]] | None = None,
    class_names: Sequence[str] | None = None,
    on_prediction: PredictionCallback | None = None,
    progress: bool = True,
    num_workers: int = 0,
    ignore_index: int = IGNORE_INDEX,
    aug_ratios: Sequence[float] | None = None,
    flip: bool = False,
) -> dict[str, Any]:
    """Predict every item of `dataset` and return the metrics of `SegEvaluator.compute`.

    Items are dicts with `img` (normalised, test scale) and `label` (full resolution); the model
    returns `(logits, embedding)`. The model is put in eval mode and its previous mode restored.
    `on_prediction(pred, item)` receives each prediction, e.g. to write images. `aug_ratios` and
    `flip` turn on test-time augmentation (see `predict`). `progress` shows a bar on a terminal,
    plain periodic lines otherwise.

    Shapes:
        item["img"]: [3, h, w] float32; item["label"]: [H, W] int64 (255 = ignore).
        pred (callback): [H, W] int64 on the CPU.
    """
    if mode not in MODES:
        raise ValueError(f"unknown inference mode '{mode}'; expected one of {MODES}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # ranks see different image counts: no DDP collectives in forward
    if class_names is None:
        class_names = getattr(dataset, "classes", None)
    device = torch.device(device)
    rank, world = get_rank_world()
    shard = Subset(dataset, range(rank, len(dataset), world))  # type: ignore[arg-type]
    loader = DataLoader(shard, batch_size=1, num_workers=num_workers, collate_fn=_first)
    evaluator = SegEvaluator(
        num_classes, ignore_index=ignore_index, class_names=class_names, subsets=subsets
    )
    was_training = model.training
    model.eval()
    bar = Progress(len(shard), 0, enabled=progress and rank == 0, desc="eval")
    try:
        for done, item in enumerate(loader, 1):
            img = item["img"].unsqueeze(0).to(device)  # [1, 3, h, w]
            label = item["label"]
            logits = predict(
                model,
                img,
                label.shape[-2:],
                mode=mode,
                crop_size=crop_size,
                stride=stride,
                num_classes=num_classes,
                batched=batched_slide,
                aug_ratios=aug_ratios,
                flip=flip,
            )
            pred = class_max(logits)[1][0].cpu()  # = argmax(1)  # [H, W]
            evaluator.process(pred, label)
            if on_prediction is not None:
                on_prediction(pred, item)
            bar.update(done)
    finally:
        bar.close()
        model.train(was_training)
    return evaluator.compute()
