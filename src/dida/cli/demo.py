"""`dida demo`: segment images of any size and write colour overlays with a legend.

Each image is resized to the test scale, predicted (whole or sliding-window, as `eval.mode`), the
logits resized back to the original size; `<stem>_pred.png` (overlay + legend strip of the classes
present) and, with `--save-raw`, the trainId map `<stem>_trainIds.png` are written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dida.errors import DataError

NAME = "demo"
HELP = "segment images and write colour overlays"
ORDER = 30
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_OUTPUT_SUFFIXES = ("_pred.png", "_trainIds.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="images or folders")
    parser.add_argument("--config", required=True, help="config file (e.g. the run's .json)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint (.pth)")
    parser.add_argument("--out", type=Path, help="output folder (default: next to each input)")
    parser.add_argument("--opacity", type=float, default=0.5, help="colour opacity (default 0.5)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: train.device)")
    parser.add_argument("--save-raw", action="store_true", help="also write <stem>_trainIds.png")
    parser.add_argument("--no-legend", action="store_true", help="no legend strip")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="config override (repeatable)",
    )  # fmt: skip


def collect_images(inputs: list[str]) -> list[Path]:
    """Files as given; folders expand to their images (not recursive, skipping demo outputs)."""
    images: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(
                p for p in item.iterdir()
                if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.endswith(_OUTPUT_SUFFIXES)
            )  # fmt: skip
            if not found:
                raise DataError(f"{item}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            images.extend(found)
        elif item.is_file():
            images.append(item)
        else:
            raise DataError(f"{item}: image file not found")
    return images


MIN_SIDE = 16  # shorter side (pixels) an image needs at the test scale to be segmented


def output_paths(images: list[Path], out: Path | None, save_raw: bool) -> list[list[Path]]:
    """Per image: `<stem>_pred.png` (and `<stem>_trainIds.png`) in `out` or beside the image.

    Images whose outputs would share a name (`a.png` and `a.jpg` in one folder) keep their
    extension in it: `a_png_pred.png`, `a_jpg_pred.png`.
    """
    folders = [out or path.parent for path in images]
    keys = [(folder.resolve(), path.stem) for folder, path in zip(folders, images, strict=True)]
    result = []
    for path, folder, key in zip(images, folders, keys, strict=True):
        stem = path.stem if keys.count(key) == 1 else f"{path.stem}_{path.suffix.lstrip('.')}"
        names = [f"{stem}_pred.png"] + ([f"{stem}_trainIds.png"] if save_raw else [])
        result.append([folder / name for name in names])
    return result


def check_outputs(paths: list[list[Path]], out: Path | None, overwrite: bool) -> None:
    """Refuse existing outputs (unless `overwrite`) and unwritable folders, before any work."""
    from dida.io_safety import WriteError, check_writable_dir

    if out is not None:
        check_writable_dir(out, what="--out folder")
    existing = [p for group in paths for p in group if p.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise WriteError(f"{existing[0]}{more}: exists; pass --overwrite to replace")
    for folder in sorted({p.parent for group in paths for p in group}):
        check_writable_dir(folder, what="output folder", create=False)


def check_size(path: Path, width: int, height: int, scale: tuple[int, int]) -> None:
    """A one-line error for an image too elongated to be segmented at the test scale."""
    from dida.data.transforms import rescale_size

    new_w, new_h = rescale_size(width, height, scale)
    if min(new_w, new_h) < MIN_SIDE:
        raise DataError(
            f"{path}: {width}x{height} image is too elongated: resized to fit the test scale "
            f"{scale[0]}x{scale[1]} it is {new_w}x{new_h} pixels (needs >= {MIN_SIDE} on each "
            "side); crop it into parts first"
        )


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from dida.config import load_config
    from dida.data.io import read_image
    from dida.data.labels import CLASSES
    from dida.data.transforms import eval_pipeline
    from dida.errors import UserError
    from dida.eval.evaluate import load_segmentor, predict, resolve_device
    from dida.eval.inference import class_max
    from dida.viz import colorize, draw_legend, overlay, write_rgb

    if not 0.0 <= args.opacity <= 1.0:
        raise UserError(f"--opacity {args.opacity}: expected a value in [0, 1]")
    cfg = load_config(args.config, args.overrides)
    images = collect_images(args.inputs)
    outputs = output_paths(images, args.out, args.save_raw)
    check_outputs(outputs, args.out, args.overwrite)  # before the model is loaded
    device = resolve_device(args.device or cfg.train.device)
    model = load_segmentor(cfg.model, args.checkpoint, device)
    names = tuple(cfg.data.val.classes or CLASSES)
    for path, out_paths in zip(images, outputs, strict=True):
        rgb = read_image(path)  # [H, W, 3]; a corrupt file is a one-line DataError
        check_size(path, rgb.shape[1], rgb.shape[0], tuple(cfg.eval.scale))
        img, _ = eval_pipeline(rgb, None, tuple(cfg.eval.scale))
        with torch.no_grad():
            logits = predict(
                model, img.unsqueeze(0).to(device), rgb.shape[:2], mode=cfg.eval.mode,
                crop_size=cfg.eval.crop_size, stride=cfg.eval.stride,
                num_classes=cfg.model.num_classes, batched=cfg.eval.batched_slide,
            )  # fmt: skip
        pred = class_max(logits)[1][0].cpu().numpy()  # [H, W]
        result = overlay(rgb, colorize(pred), args.opacity)
        if not args.no_legend:
            result = draw_legend(result, np.unique(pred).tolist(), names)
        write_rgb(out_paths[0], result)
        print(f"{path} -> {out_paths[0]}")
        if args.save_raw:
            write_rgb(out_paths[1], pred.astype("uint8"))
    return 0
