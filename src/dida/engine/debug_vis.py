"""Periodic debug panels of a training step (source, target, pseudo-label, mix mask, mixed image,
mixed label, pseudo-weight; MIC's masked target), one PNG per batch image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dida.data.transforms import denormalize_tensor
from dida.viz import colorize, make_panel, write_rgb

ORDER = ("src_img", "src_label", "src_pred", "tgt_img", "pseudo_label", "mix_mask", "mixed_img",
         "mixed_label", "pseudo_weight", "masked_img")  # fmt: skip


def _to_rgb(name: str, tensor: torch.Tensor) -> np.ndarray:
    t = tensor.detach().float().cpu()
    if t.dim() == 3:  # image [3, H, W], normalised
        return denormalize_tensor(t).clamp(0, 255).byte().permute(1, 2, 0).numpy()
    if name in ("mix_mask", "pseudo_weight"):  # [H, W] in [0, 1]
        grey = (t.clamp(0, 1) * 255).byte().numpy()
        return np.repeat(grey[..., None], 3, axis=2)
    return colorize(t.long().numpy())


def write_debug_panel(out_dir: Path, iteration: int, images: dict[str, torch.Tensor]) -> list[Path]:
    """Write `<out_dir>/<iteration:06d>_<b>.png` for each batch image; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in ORDER if n in images]
    batch = images[names[0]].shape[0]
    paths = []
    for b in range(batch):
        tiles = [_to_rgb(n, images[n][b]) for n in names]
        panel = make_panel(tiles, names)
        path = out_dir / f"{iteration:06d}_{b}.png"
        write_rgb(path, panel)
        paths.append(path)
    return paths
