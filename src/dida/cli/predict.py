"""`dida predict`: run a trained model (or its ONNX export) on image files, folders, globs and
videos, batched, and write label maps, colour maps, overlays and overlay videos."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dida.errors import UserError

if TYPE_CHECKING:
    from dida.config import ExperimentConfig
    from dida.engine.predict import OutputOptions

NAME = "predict"
HELP = "segment your own images, folders and videos with a trained model"
ORDER = 31
DESCRIPTION = """Segment images and videos with a trained model.

  dida predict RUN_DIR photos/ -o out                 RUN_DIR/<name>.json + RUN_DIR/latest.pth
  dida predict RUN_DIR iter_16000.pth 'data/**/*.jpg' drive.mp4 -o out
  dida predict CONFIG CHECKPOINT img.png -o out --save label color --label-ids
  dida predict --onnx model.onnx photos/ -o out       onnxruntime, config from the .onnx file

Inputs: image files, folders (searched recursively), glob patterns (quote them) and videos
(.mp4 .avi .mkv .mov .webm). Outputs mirror the input layout under OUT: <name>_trainIds.png
(or _labelIds.png with --label-ids), <name>_color.png, <name>_overlay.png; a video gives
<name>_overlay.mp4 and, when asked with --save, per-frame PNGs in <name>/. Existing outputs are
never replaced without --overwrite. Unreadable files are reported and skipped.
"""
SAVE_KINDS = ("label", "color", "overlay", "video")
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors", ".bin")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", metavar="CONFIG_OR_RUN_DIR [CKPT] INPUT",
        help="run directory or config, optional checkpoint (.pth, ...), then inputs "
        "(only inputs with --onnx)",
    )  # fmt: skip
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--save", nargs="+", choices=SAVE_KINDS, metavar="KIND",
        help="outputs: label, color, overlay, video (default: label overlay for images, video "
        "for videos; given kinds apply to both, label/color/overlay of a video as frame PNGs)",
    )  # fmt: skip
    parser.add_argument(
        "--label-ids", action="store_true",
        help="label PNGs hold Cityscapes labelIds (as dida test --format-only) instead of trainIds",
    )  # fmt: skip
    parser.add_argument("--opacity", type=float, default=0.5, help="overlay opacity (default 0.5)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--inference", choices=("whole", "slide"), help="inference mode (default: eval.mode)"
    )
    parser.add_argument("--onnx", type=Path, help="run this exported model with onnxruntime")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward (default 4)")
    parser.add_argument(
        "--workers", type=int, default=2, help="image-loading processes (default 2)"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: train.device)")
    parser.add_argument(
        "--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
        help="autocast dtype (default auto: bf16 on GPUs that support it, else fp32; "
        "--onnx runs the exported fp32 graph)",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="config override, e.g. --set eval.scale=[2048,1024] (repeatable)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def split_paths(paths: list[str], onnx: bool) -> tuple[str | None, str | None, list[str]]:
    """(config or run dir, checkpoint, inputs) from the positionals."""
    for path in paths:
        if Path(path).suffix.lower() == ".onnx":  # an exported model among the positionals
            raise UserError(
                f"{path}: an ONNX model goes after --onnx (dida predict --onnx {path} INPUT ... "
                "-o OUT), not among the run directory, checkpoint and inputs"
            )
    if onnx:
        return None, None, paths
    target, rest = paths[0], paths[1:]
    checkpoint = None
    if rest and Path(rest[0]).suffix.lower() in _CHECKPOINT_SUFFIXES:
        checkpoint, rest = rest[0], rest[1:]
    if not rest:
        raise UserError("no INPUT given: expected images, folders, globs or videos after the model")
    return target, checkpoint, rest


def _options(args: argparse.Namespace, num_classes: int) -> OutputOptions:
    import numpy as np

    from dida.cli.test import trainid_to_labelid
    from dida.data.datasets import _palette_for
    from dida.engine.predict import OutputOptions

    if not 0.0 <= args.opacity <= 1.0:
        raise UserError(f"--opacity {args.opacity}: expected a value in [0, 1]")
    if args.batch_size < 1 or args.workers < 0:
        raise UserError("--batch-size must be >= 1 and --workers >= 0")
    if args.label_ids and num_classes != 19:
        raise UserError("--label-ids writes Cityscapes labelIds: needs a 19-class model")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"{args.out}: exists and is not a folder")
    kinds = set(args.save or ())
    table = trainid_to_labelid(np.arange(256, dtype=np.uint8)) if args.label_ids else None
    return OutputOptions(
        out_dir=args.out,
        image_kinds=frozenset(kinds - {"video"} if args.save else {"label", "overlay"}),
        video_kinds=frozenset(kinds if args.save else {"video"}),
        opacity=args.opacity, palette=_palette_for(num_classes), label_table=table,
        overwrite=args.overwrite,
    )  # fmt: skip


def _load_config(
    args: argparse.Namespace, target: str | None, checkpoint: str | None
) -> tuple[ExperimentConfig, Any, Path | None]:
    """(config, onnxruntime model or None, checkpoint or None): cheap, before the outputs check."""
    import torch

    from dida.cli.test import resolve_run
    from dida.config import apply_overrides, config_from_dict, load_config

    if args.onnx is None:
        config, ckpt, _ = resolve_run(Path(target), checkpoint and Path(checkpoint))
        return load_config(config, args.overrides), None, ckpt
    from dida.export import OnnxSegmentor

    device = "cuda" if (args.device or "").startswith("cuda") else "cpu"
    model = OnnxSegmentor(args.onnx, device=device, threads=torch.get_num_threads())
    if model.outputs_labels:
        raise UserError(f"{args.onnx}: exported with --argmax; dida predict needs logits")
    if model.config is None:
        raise UserError(f"{args.onnx}: no dida.config metadata; export it with dida export")
    return (
        apply_overrides(config_from_dict(model.config, str(args.onnx)), args.overrides),
        model,
        None,
    )


def run(args: argparse.Namespace) -> int:
    import sys

    import torch
    from tqdm import tqdm

    from dida.data.inputs import collect_inputs
    from dida.engine.predict import check_outputs, is_output, run_predictions
    from dida.eval.evaluate import MODES, load_segmentor, resolve_device
    from dida.eval.predict import Predictor

    target, checkpoint, inputs = split_paths(args.paths, args.onnx is not None)
    entries = collect_inputs(inputs, skip=lambda path: is_output(path, args.out))
    cfg, model, ckpt = _load_config(args, target, checkpoint)
    mode = args.inference or cfg.eval.mode
    if mode not in MODES:
        raise UserError(f"eval.mode '{mode}': expected one of {MODES}")
    options = _options(args, cfg.model.num_classes)
    check_outputs(entries, options)  # before the (slow) model loading
    device, dtype = torch.device("cpu"), torch.float32  # onnxruntime: the exported fp32 graph
    if model is None:
        device = resolve_device(args.device or cfg.train.device)
        model = load_segmentor(cfg.model, ckpt, device)
        if device.type != "cpu" or args.precision != "auto":
            from dida.engine.train import resolve_precision  # imported only when needed

            dtype = resolve_precision(args.precision, device)
    predictor = Predictor(
        model, num_classes=cfg.model.num_classes, mode=mode, crop_size=cfg.eval.crop_size,
        stride=cfg.eval.stride, device=device, dtype=dtype,
    )  # fmt: skip
    log = lambda message: tqdm.write(message, file=sys.stderr)
    summary = run_predictions(
        predictor, entries, scale=cfg.eval.scale, options=options, batch_size=args.batch_size,
        num_workers=args.workers, progress=not args.no_progress, log=log,
    )  # fmt: skip
    if summary.processed == 0:
        raise UserError(f"nothing could be processed: {len(summary.skipped)} unreadable input(s)")
    print(f"{summary.text()}; outputs in {args.out}")
    return 0
