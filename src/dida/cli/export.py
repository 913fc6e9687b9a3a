"""`dida export`: write a trained segmentor as ONNX, checked against PyTorch with onnxruntime."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dida.errors import UserError

NAME = "export"
HELP = "export a trained model to ONNX (checked with onnxruntime)"
ORDER = 32
DESCRIPTION = """Export a trained model to ONNX (opset >= 17) with dynamic batch and image size.

  dida export RUN_DIR -o model.onnx                     RUN_DIR/<name>.json + RUN_DIR/latest.pth
  dida export CONFIG CHECKPOINT -o model.onnx --include-normalize --argmax

Input `image`: [B, 3, H, W] float32 ImageNet-normalised RGB, or uint8 RGB with
--include-normalize. Output `logits`: [B, C, H, W] float32 at the input size, or `labels`:
[B, H, W] int64 trainIds with --argmax. Feed images resized to the test scale (eval.scale, kept in
the file's metadata with the whole config). After export, onnxruntime (CPU) is compared with
PyTorch on random images of two sizes; the file is kept only if max |logit difference| <= 1e-4.
Needs the `export` extra: pip install "dida[export]".
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="run directory, or a config file (.yaml / .json)")
    parser.add_argument("checkpoint", nargs="?", help="checkpoint (default: RUN_DIR/latest.pth)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output .onnx file")
    parser.add_argument(
        "--include-normalize", action="store_true",
        help="bake the ImageNet normalisation in: the model takes uint8 RGB",
    )  # fmt: skip
    parser.add_argument("--argmax", action="store_true", help="output the label map, not logits")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17, default 17)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="check: max |Δ logits| (default 1e-4)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="config override (repeatable)",
    )  # fmt: skip


def check_sizes(scale: list[int]) -> list[tuple[int, int]]:
    """Two (H, W) for the check: the test scale of a landscape image and a smaller odd size."""
    height, width = min(scale), max(scale)
    return [(height, width), (height // 2 + 7, width // 3 + 5)]


def run(args: argparse.Namespace) -> int:
    import importlib.util

    from dida.cli.test import resolve_run
    from dida.config import config_to_dict, load_config
    from dida.eval.evaluate import load_segmentor
    from dida.export import OnnxSegmentor, export_metadata, export_onnx
    from dida.io_safety import atomic_output, check_output

    needed = ("onnx",) if args.no_check else ("onnx", "onnxruntime")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"{', '.join(missing)} not installed: pip install 'dida[export]'")
    config, checkpoint, _ = resolve_run(
        Path(args.target), args.checkpoint and Path(args.checkpoint)
    )
    out = check_output(args.out, overwrite=args.overwrite, suffixes=(".onnx",), what="ONNX file")
    cfg = load_config(config, args.overrides)
    model = load_segmentor(cfg.model, checkpoint, "cpu")
    with atomic_output(out, what="ONNX file") as tmp:  # renamed to `out` only after the check
        meta = export_metadata(config_to_dict(cfg), args.include_normalize, args.argmax)
        export_onnx(
            model, tmp, include_normalize=args.include_normalize, argmax=args.argmax,
            opset=args.opset, metadata=meta,
        )  # fmt: skip
        if not args.no_check:
            _check(model, OnnxSegmentor(tmp), cfg.eval.scale, args)
    size_mb = out.stat().st_size / 2**20
    print(f"exported {cfg.model.variant} to {out} ({size_mb:.1f} MB, opset {args.opset})")
    return 0


def _check(model: Any, onnx_model: Any, scale: list[int], args: argparse.Namespace) -> None:
    """Print the comparison at two sizes; a failed check stops before the file is kept."""
    from dida.export import check_export

    results = check_export(
        model, onnx_model, check_sizes(scale), include_normalize=args.include_normalize,
        argmax=args.argmax, tolerance=args.tolerance,
    )  # fmt: skip
    for r in results:
        shape = "x".join(map(str, r.shape))
        if r.max_abs_diff is not None:
            measure = f"max |Δ logits| = {r.max_abs_diff:.2e}"
        else:
            measure = f"labels equal on {100 * r.label_agreement:.3f} % of pixels"
        print(f"check {shape}: {measure} ({'ok' if r.ok else 'FAILED'})")
    if not all(r.ok for r in results):
        raise UserError(f"onnxruntime differs from PyTorch beyond {args.tolerance}: not written")
