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
    convert.add_argument("output", help="output .safetensors or .pth file")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from dida.errors import UserError
    from dida.models.weights import describe_weights, read_weights, to_segmentor_names

    state, _ = read_weights(args.source)
    if args.action == "inspect":
        info = describe_weights(state)
        for key, value in info.items():
            print(f"{key:12} {value}")
        return 0
    converted, layout, ignored = to_segmentor_names(state)
    out = Path(args.output)
    if out.suffix not in (".safetensors", ".pth", ".pt"):
        raise UserError(f"{out}: output must end in .safetensors or .pth")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in converted.items()}
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(out))
    else:
        torch.save(tensors, out)
    print(
        f"{args.source}: {layout} layout, {len(tensors)} tensors -> {out} "
        f"({len(ignored)} keys dropped)"
    )
    return 0
