"""UDA training pairs (source crop + label, target crop) with optional rare-class sampling.

Determinism contract: `UDADataset[i]` is a pure function of (seed, i); every random draw comes
from `np.random.default_rng([seed, i])`, so resuming and DDP sharding only need the index stream.
"""

from __future__ import annotations

import shlex

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from dida.config import DataConfig, DatasetConfig
from dida.data.datasets import SegDataset, ValDataset, build_dataset, resolve_layout
from dida.data.rcs import RareClassSampler, load_stats
from dida.data.transforms import crop_flip, finish, resize_pair, train_crop
from dida.errors import DataError

# enough for any training run; the engine's sampler yields i = 0, 1, 2, ...
VIRTUAL_LENGTH = 2**31 - 1
_RCS_CROP_TRIES = 10
# Decoded and resized training images stay in memory when both domains together fit in this
# budget (at most scale area x (3 + 1) bytes per item; the built-in benchmark needs ~130 MB and
# saves ~9 ms of PNG decoding per iteration; real datasets are far larger and are read per item).
# Only in the process that trains: DataLoader workers decode in parallel and keep nothing.
CACHE_BUDGET_MB = 512


class UDADataset(Dataset):
    """Items: dict(src_img [3, h, w] float32, src_label [h, w] int64, tgt_img [3, h, w] float32),
    plus valid_pseudo_mask [h, w] float32 (1 = pseudo-label used) with `target_pseudo_margins`.

    Args:
        source: labelled source dataset.
        target: target dataset (labels unused; may be built without them).
        crop_size: (h, w).
        cat_max_ratio: source crop rule (the target crop is unchecked).
        flip_prob: horizontal flip probability (both domains).
        rcs: rare-class sampler over `source` indices, or None for uniform sampling.
        seed: base seed; item i uses `default_rng([seed, i])`.
        source_scale, target_scale: keep-ratio resize (long, short) before cropping.
        target_pseudo_margins: HRDA's "cpl v2" (top, bottom, left, right): rows/columns of each
            target image, at its original size, whose pseudo-labels are not used. The mask goes
            through the target's resize (nearest), crop and flip, so a crop shows the margins it
            touches; padding is 0. The crop and flip draws are the same with or without it.
    """

    def __init__(
        self,
        source: SegDataset,
        target: SegDataset,
        crop_size: tuple[int, int],
        cat_max_ratio: float,
        flip_prob: float,
        rcs: RareClassSampler | None = None,
        seed: int = 0,
        source_scale: tuple[int, int] = (1280, 720),
        target_scale: tuple[int, int] = (1024, 512),
        target_pseudo_margins: tuple[int, int, int, int] | None = None,
    ) -> None:
        if source.classes != target.classes:
            raise DataError("source and target datasets must share their class names")
        self.source, self.target, self.rcs, self.seed = source, target, rcs, seed
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.cat_max_ratio, self.flip_prob = cat_max_ratio, flip_prob
        self.source_scale = tuple(source_scale)
        self.target_scale = tuple(target_scale)
        self.margins = None if target_pseudo_margins is None else tuple(target_pseudo_margins)
        self.classes, self.palette = source.classes, source.palette
        self.cache = self.cache_bytes() <= CACHE_BUDGET_MB * 2**20
        self._cache: dict[tuple[str, int], tuple[np.ndarray, np.ndarray | None]] = {}

    def cache_bytes(self) -> int:
        """Upper bound of the memory that keeping every resized item of both domains takes."""
        (sw, sh), (tw, th) = self.source_scale, self.target_scale  # keep-ratio: inside the box
        return 4 * (sw * sh * len(self.source) + tw * th * len(self.target))

    def _resized(self, domain: str, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Item `index` of the source (image, label) or of the target (image, pseudo-label
        margin mask or None) after the keep-ratio resize, which draws nothing at random: kept
        (read-only) for the next draw of the same file when `self.cache` is on."""
        pair = self._cache.get((domain, index))
        if pair is not None:
            return pair
        if domain == "source":
            pair = resize_pair(*self.source.load(index), self.source_scale)
        else:
            image, _ = self.target.load(index)
            valid = None if self.margins is None else margin_mask(image.shape[:2], self.margins)
            pair = resize_pair(image, valid, self.target_scale)
        if self.cache and get_worker_info() is None:
            for array in pair:
                if array is not None:
                    array.flags.writeable = False
            self._cache[(domain, index)] = pair
        return pair

    def __len__(self) -> int:
        return VIRTUAL_LENGTH

    def _source(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rcs is None:
            image, label = self._resized("source", int(rng.integers(len(self.source))))
            return train_crop(image, label, self.crop_size, self.cat_max_ratio, self.flip_prob, rng)
        cls, index = self.rcs.sample(rng)
        image, label = self._resized("source", index)
        for _ in range(_RCS_CROP_TRIES):  # re-crop the same file until the class is visible
            img, lbl = crop_flip(
                image, label, self.crop_size, self.cat_max_ratio, self.flip_prob, rng
            )
            if int(np.count_nonzero(lbl == cls)) > self.rcs.min_crop_pixels:
                break
        return finish(img, lbl, self.crop_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        src_img, src_label = self._source(rng)
        image, valid = self._resized("target", int(rng.integers(len(self.target))))
        tgt_img, valid = train_crop(image, valid, self.crop_size, 1.0, self.flip_prob, rng)
        item = {"src_img": src_img, "src_label": src_label, "tgt_img": tgt_img}
        if valid is not None:  # padding came in as the label pad value: only 1 is valid
            item["valid_pseudo_mask"] = (valid == 1).float()
        return item


def margin_mask(size: tuple[int, int], margins: tuple[int, int, int, int]) -> np.ndarray:
    """1 inside, 0 on the `margins` = (top, bottom, left, right) of an image of `size` (h, w).

    Shapes: returns [h, w] uint8
    """
    top, bottom, left, right = margins
    mask = np.zeros(size, dtype=np.uint8)
    mask[top : max(size[0] - bottom, top), left : max(size[1] - right, left)] = 1
    return mask


def convert_command(cfg: DatasetConfig, num_classes: int) -> str:
    """The `dida convert` command that writes the rare-class statistics of dataset `cfg`."""
    root = shlex.quote(str(cfg.root))
    if cfg.kind != "folder":
        return f"dida convert {cfg.kind} {root}"
    layout = resolve_layout(cfg)
    suffix = (
        "" if layout.seg_suffix == ".png" else f" --seg-suffix {shlex.quote(layout.seg_suffix)}"
    )
    return (
        f"dida convert folder {root} --gt-dir {shlex.quote(layout.ann_dir)} "
        f"--num-classes {num_classes}{suffix}"
    )


def build_train_dataset(cfg: DataConfig, seed: int) -> UDADataset:
    """Source (labels) + target (images only) datasets, RCS from the source root's stats files."""
    source = build_dataset(cfg.source)
    target = build_dataset(cfg.target, with_labels=False)
    rcs = None
    if cfg.rcs.enabled:
        stats, with_class = load_stats(
            cfg.source.root, convert_command(cfg.source, len(source.classes))
        )
        rcs = RareClassSampler(
            stats,
            with_class,
            source.label_path_to_index,
            temperature=cfg.rcs.temperature,
            min_pixels=cfg.rcs.min_pixels,
            min_crop_ratio=cfg.rcs.min_crop_ratio,
        )
    return UDADataset(
        source,
        target,
        crop_size=tuple(cfg.crop_size),
        cat_max_ratio=cfg.cat_max_ratio,
        flip_prob=cfg.flip_prob,
        rcs=rcs,
        seed=seed,
        source_scale=tuple(cfg.source.scale),
        target_scale=tuple(cfg.target.scale),
        target_pseudo_margins=cfg.target_pseudo_margins,
    )


def build_val_dataset(ds_cfg: DatasetConfig, scale: list[int]) -> ValDataset:
    """Evaluation dataset: images resized to `scale` (long, short), labels at full resolution."""
    return ValDataset(build_dataset(ds_cfg), (int(scale[0]), int(scale[1])))
