"""`dida weights`: inspect a weights file, or convert any supported layout to our names."""

from __future__ import annotations

import argparse

NAME = "weights"
HELP = "inspect or convert MiT / DAFormer / DIDA weights"
DESCRIPTION = """Inspect or convert weights.

  dida weights inspect pretrained/mit_b5.pth
  dida weights convert released_gta.pth work_dirs/dida_gta_student.safetensors

Accepted inputs: NVlabs mit_b*.pth, Hugging Face SegFormer (hub id, folder, .safetensors),
released DAFormer/DIDA mmcv checkpoints, and dida checkpoints. `convert` writes a state dict
with our names (`encoder.*`, `head.*`) as .safetensors or .pth.
"""
ORDER = 80


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    inspect = sub.add_parser("inspect", help="print layout, MiT variant, classes, size")
    inspect.add_argument("source", help="file, folder or Hugging Face id")
    convert = sub.add_parser("convert", help="write the weights with dida names")
    convert.add_argument("source", help="file, folder or Hugging Face id")
    convert.add_argument("output", help="output .safetensors or .pth file (a new file)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")


def run(args: argparse.Namespace) -> int:
    import torch

    from dida.io_safety import atomic_write, check_output
    from dida.models.weights import describe_weights, read_weights, to_segmentor_names

    if args.action == "convert":  # refuse a bad output before reading anything
        out = check_output(
            args.output, inputs=[args.source], overwrite=args.overwrite,
            suffixes=(".safetensors", ".pth", ".pt"), what="weights file",
        )  # fmt: skip
    state, _ = read_weights(args.source)
    if args.action == "inspect":
        info = describe_weights(state)
        for key, value in info.items():
            print(f"{key:12} {value}")
        return 0
    converted, layout, ignored = to_segmentor_names(state)
    tensors = {k: v.contiguous() for k, v in converted.items()}
    if out.suffix == ".safetensors":
        from safetensors.torch import save

        atomic_write(out, save(tensors), what="weights file")
    else:
        atomic_write(out, lambda f: torch.save(tensors, f), what="weights file")
    print(
        f"{args.source}: {layout} layout, {len(tensors)} tensors -> {out} "
        f"({len(ignored)} keys dropped)"
    )
    return 0
