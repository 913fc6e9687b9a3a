"""`dida demo`: segment images of any size and write colour overlays with a legend (METHOD.md §5.3).

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


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from dida.config import load_config
    from dida.data.io import read_image
    from dida.data.labels import CLASSES
    from dida.data.transforms import eval_pipeline
    from dida.errors import UserError
    from dida.eval.evaluate import load_segmentor, predict, resolve_device
    from dida.viz import colorize, draw_legend, overlay, write_rgb

    if not 0.0 <= args.opacity <= 1.0:
        raise UserError(f"--opacity {args.opacity}: expected a value in [0, 1]")
    cfg = load_config(args.config, args.overrides)
    images = collect_images(args.inputs)
    device = resolve_device(args.device or cfg.train.device)
    model = load_segmentor(cfg.model, args.checkpoint, device)
    names = tuple(cfg.data.val.classes or CLASSES)
    for path in images:
        rgb = read_image(path)  # [H, W, 3]; a corrupt file is a one-line DataError
        img, _ = eval_pipeline(rgb, None, tuple(cfg.eval.scale))
        with torch.no_grad():
            logits = predict(
                model, img.unsqueeze(0).to(device), rgb.shape[:2], mode=cfg.eval.mode,
                crop_size=cfg.eval.crop_size, stride=cfg.eval.stride,
                num_classes=cfg.model.num_classes, batched=cfg.eval.batched_slide,
            )  # fmt: skip
        pred = logits.argmax(dim=1)[0].cpu().numpy()  # [H, W]
        result = overlay(rgb, colorize(pred), args.opacity)
        if not args.no_legend:
            result = draw_legend(result, np.unique(pred).tolist(), names)
        out_dir = args.out or path.parent
        write_rgb(out_dir / f"{path.stem}_pred.png", result)
        print(f"{path} -> {out_dir / f'{path.stem}_pred.png'}")
        if args.save_raw:
            write_rgb(out_dir / f"{path.stem}_trainIds.png", pred.astype("uint8"))
    return 0
