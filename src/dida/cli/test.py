"""`dida test`: evaluate a checkpoint on the validation (or test) set, as the seed's tools/test.py.

Prints the per-class and summary tables (as mmseg's tools/test.py), writes all numbers as JSON and,
optionally, colour predictions (`--show-dir`) or Cityscapes `*_labelIds.png` (`--format-only`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dida.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from dida.config import ExperimentConfig

NAME = "test"
HELP = "evaluate a checkpoint (mIoU) and optionally write predictions"
DESCRIPTION = """Evaluate a trained model on the validation set.

  dida test RUN_DIR                 config = RUN_DIR/<name>.json, checkpoint = RUN_DIR/latest.pth
  dida test RUN_DIR iter_1600.pth   another checkpoint of that run
  dida test CONFIG CHECKPOINT       any config file and checkpoint
"""
ORDER = 20
AUG_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmseg's multi-scale test ratios


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="run directory, or a config file (.yaml / .json)")
    parser.add_argument("checkpoint", nargs="?", help="checkpoint (default: RUN_DIR/latest.pth)")
    parser.add_argument("--show-dir", type=Path, help="write colour predictions into this folder")
    parser.add_argument("--opacity", type=float, default=0.5, help="colour opacity (default 0.5)")
    parser.add_argument(
        "--format-only",
        action="store_true",
        help="write Cityscapes *_labelIds.png (trainId -> labelId) into --out-dir (or --show-dir, "
        "instead of the colour images) for the official evaluation or a submission",
    )
    parser.add_argument("--out-dir", type=Path, help="folder for --format-only predictions")
    parser.add_argument(
        "--inference", choices=("whole", "slide"), help="inference mode (default: eval.mode)"
    )
    parser.add_argument("--test-set", action="store_true", help="use split 'test' instead of val")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: train.device)")
    parser.add_argument(
        "--out", type=Path, help="results JSON (default: RUN_DIR/preds/results.json)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="config override, e.g. --set data.val.root=data/cityscapes (repeatable)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--aug-test", action="store_true",
        help="test-time augmentation as mmseg: image scales --aug-ratios and horizontal flip, "
        "softmax averaged",
    )  # fmt: skip
    parser.add_argument(
        "--aug-ratios", type=float, nargs="+", default=list(AUG_RATIOS), metavar="R",
        help="scale factors of --aug-test (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--quiet", action="store_true", help="print only the summary line")


def resolve_run(target: Path, checkpoint: Path | None) -> tuple[Path, Path, Path | None]:
    """(config, checkpoint, run dir or None) from `dida test` positionals."""
    if target.is_dir():
        configs = sorted(target.glob("*.json"))
        if len(configs) != 1:
            found = ", ".join(p.name for p in configs) or "none"
            raise UserError(f"{target}: expected exactly one config *.json, found {found}")
        if checkpoint is not None and not checkpoint.exists() and (target / checkpoint).exists():
            checkpoint = target / checkpoint  # a checkpoint name inside the run directory
        return configs[0], checkpoint or target / "latest.pth", target
    if not target.is_file():
        raise UserError(f"{target}: no such run directory or config file")
    if checkpoint is None:
        raise UserError(f"{target}: a config file needs a CHECKPOINT argument")
    return target, checkpoint, None


def _relative(path: str, root: Path | None) -> Path:
    try:
        return Path(path).relative_to(root) if root is not None else Path(Path(path).name)
    except ValueError:
        return Path(Path(path).name)


def _label_ids_name(name: str) -> str:
    for suffix in ("_leftImg8bit.png", "_leftImg8bit.jpg", Path(name).suffix):
        if name.endswith(suffix):
            return name[: len(name) - len(suffix)] + "_labelIds.png"
    return name + "_labelIds.png"


def trainid_to_labelid(pred: np.ndarray) -> np.ndarray:
    """Map trainIds to Cityscapes labelIds (ignore -> 0 'unlabeled'). Shapes: [H, W] -> uint8."""
    import numpy as np

    from dida.data.labels import TRAINID_TO_CITYSCAPES_ID

    table = np.zeros(256, dtype=np.uint8)
    for train_id, label_id in TRAINID_TO_CITYSCAPES_ID.items():
        table[train_id] = label_id
    return table[pred.astype(np.uint8)]


class PredictionWriter:
    """`on_prediction` callback writing colour overlays and/or Cityscapes labelId maps."""

    def __init__(
        self,
        img_root: Path | None,
        palette: Any,
        show_dir: Path | None,
        opacity: float,
        format_dir: Path | None,
    ) -> None:
        self.img_root, self.palette = img_root, palette
        self.show_dir, self.opacity, self.format_dir = show_dir, opacity, format_dir

    def __call__(self, pred: torch.Tensor, item: dict[str, Any]) -> None:
        import cv2

        from dida.data.io import read_image
        from dida.viz import colorize, overlay, write_rgb

        label = pred.numpy()
        rel = _relative(item["img_path"], self.img_root)
        if self.format_dir is not None:
            path = self.format_dir / rel.parent / _label_ids_name(rel.name)
            write_rgb(path, trainid_to_labelid(label))
        if self.show_dir is not None:
            color = colorize(label, self.palette)
            if self.opacity < 1.0:
                image = read_image(item["img_path"])
                if image.shape[:2] != color.shape[:2]:
                    size = (image.shape[1], image.shape[0])
                    color = cv2.resize(color, size, interpolation=cv2.INTER_NEAREST)
                color = overlay(image, color, self.opacity)
            write_rgb((self.show_dir / rel).with_suffix(".png"), color)


def _prepare(args: argparse.Namespace) -> tuple[ExperimentConfig, Path, Path, Path]:
    """Config (with overrides applied), its file, the checkpoint and the results path."""
    from dida.config import load_config
    from dida.eval.evaluate import MODES

    config, checkpoint, run_dir = resolve_run(
        Path(args.target), args.checkpoint and Path(args.checkpoint)
    )
    cfg = load_config(config, args.overrides)
    if args.test_set:
        cfg.data.val.split = "test"
    if args.inference:
        cfg.eval.mode = args.inference
    if cfg.eval.mode not in MODES:
        raise UserError(f"{config}: eval.mode '{cfg.eval.mode}': expected one of {MODES}")
    if not 0.0 <= args.opacity <= 1.0:
        raise UserError(f"--opacity {args.opacity}: expected a value in [0, 1]")
    if args.format_only and not (args.out_dir or args.show_dir):
        raise UserError("--format-only needs --out-dir or --show-dir")
    if args.format_only and cfg.model.num_classes != 19:
        raise UserError("--format-only writes Cityscapes labelIds: needs model.num_classes=19")
    if args.aug_test and any(not 0.0 < r <= 8.0 for r in args.aug_ratios):
        raise UserError(f"--aug-ratios {args.aug_ratios}: expected factors in (0, 8]")
    out = _check_outputs(args, run_dir, checkpoint, [config])
    return cfg, config, checkpoint, out


def _check_outputs(args: argparse.Namespace, run_dir: Path | None, checkpoint: Path,
                   inputs: list[Path]) -> Path:  # fmt: skip
    """The results path; every output checked for writability before the evaluation runs."""
    from dida.io_safety import check_output, check_writable_dir

    if args.out is not None:  # a file the user names: never replaced unless --overwrite
        out = check_output(args.out, inputs=[*inputs, checkpoint], overwrite=args.overwrite,
                           suffixes=(".json",), what="results file")  # fmt: skip
    else:  # the run's own results file, replaced (atomically) by every test
        if run_dir is not None:
            out = run_dir / "preds" / "results.json"
        else:
            out = checkpoint.with_name(f"{checkpoint.stem}_results.json")
        check_writable_dir(out.parent, what="results folder", create=False)
    for folder, what in ((args.show_dir, "--show-dir"), (args.out_dir, "--out-dir")):
        if folder is not None:
            check_writable_dir(folder, what=f"{what} folder")
    return out


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from dida.data.uda import build_val_dataset
    from dida.engine.distributed import cleanup, init_distributed
    from dida.eval.evaluate import evaluate, load_segmentor, resolve_device
    from dida.eval.metrics import format_results, to_jsonable
    from dida.io_safety import atomic_write

    cfg, config, checkpoint, out = _prepare(args)
    device = resolve_device(args.device or cfg.train.device)
    info = init_distributed(device.type)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    dataset = build_val_dataset(cfg.data.val, cfg.eval.scale)  # data errors before model building
    model = load_segmentor(cfg.model, checkpoint, device)
    format_dir = (args.out_dir or args.show_dir) if args.format_only else None
    show_dir = args.show_dir if args.show_dir != format_dir else None
    writer = None
    if show_dir is not None or format_dir is not None:
        img_root = getattr(dataset, "img_root", None)
        palette = getattr(dataset, "palette", None)
        writer = PredictionWriter(img_root, palette, show_dir, args.opacity, format_dir)
    results = evaluate(
        model, dataset, num_classes=cfg.model.num_classes, mode=cfg.eval.mode,
        crop_size=cfg.eval.crop_size, stride=cfg.eval.stride,
        batched_slide=cfg.eval.batched_slide, device=device,
        subsets=cfg.eval.subsets, on_prediction=writer, progress=not args.no_progress,
        num_workers=cfg.eval.num_workers,
        aug_ratios=args.aug_ratios if args.aug_test else None, flip=args.aug_test,
    )  # fmt: skip
    if info.is_main:
        if args.quiet:
            print(f"mIoU {100 * results['mIoU']:.2f}  ({len(dataset)} images)")
        else:
            print(format_results(results))
        record = {
            "config": str(config), "checkpoint": str(checkpoint), "split": cfg.data.val.split,
            "mode": cfg.eval.mode, "aug_test": args.aug_ratios if args.aug_test else None,
            "num_images": len(dataset), **to_jsonable(results),
        }  # fmt: skip
        atomic_write(out, json.dumps(record, indent=2) + "\n", what="results file")
        print(f"results written to {out}")
    cleanup()
    return 0
