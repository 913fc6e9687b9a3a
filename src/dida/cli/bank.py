"""`dida bank`: convert the original `embedding_cache` npz pair to our bank file; inspect a bank."""

from __future__ import annotations

import argparse

NAME = "bank"
HELP = "import or inspect an instance bank file"
DESCRIPTION = """Instance bank files.

  dida bank import SRC_DIR_OR_NPZ -o OUT.pt   original f_buffer_s.npz / l_buffer_s.npz -> our format
  dida bank show FILE_OR_DIR                  per-class counts, feature norms, missing classes
"""
ORDER = 80


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bank_command", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="convert an embedding_cache folder or npz pair")
    imp.add_argument("src", help="folder holding f_buffer_s.npz and l_buffer_s.npz, or one of them")
    imp.add_argument("-o", "--output", required=True, help="output .pt or .safetensors file")
    imp.add_argument("--size", type=int, default=None, help="expected number of entries K")
    show = sub.add_parser("show", help="print per-class counts and feature norms")
    show.add_argument("path", help="bank file (.pt, .safetensors) or embedding_cache folder/npz")
    for p in (imp, show):
        p.add_argument("--num-classes", type=int, default=19, help="number of classes (default 19)")


def _summary(feats, labels, num_classes: int) -> list[str]:
    import torch

    from dida.data.labels import CLASSES

    names = list(CLASSES) + [str(i) for i in range(len(CLASSES), num_classes)]
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    norms = feats.norm(dim=1)
    lines = [f"entries: {feats.shape[0]}  dim: {feats.shape[1]}"]
    lines.append(
        f"feature norms: min {norms.min():.3f}  mean {norms.mean():.3f}  max {norms.max():.3f}"
    )
    lines += [f"  {c:>2} {names[c]:<14} {counts[c]:>4}" for c in range(num_classes)]
    missing = [c for c in range(num_classes) if counts[c] == 0]
    if missing:
        lines.append("missing classes: " + ", ".join(f"{c} ({names[c]})" for c in missing))
    else:
        lines.append("missing classes: none")
    return lines


def run(args: argparse.Namespace) -> int:
    from dida.engine.bank_io import read_bank_file, save_bank_file
    from dida.errors import UserError

    if args.bank_command == "import":
        feats, labels = read_bank_file(args.src, size=args.size, num_classes=args.num_classes)
        try:
            save_bank_file(args.output, feats, labels)
        except OSError as err:
            raise UserError(f"{args.output}: cannot write bank: {err.strerror}") from None
        print(f"wrote {args.output}")
    else:
        feats, labels = read_bank_file(args.path, num_classes=args.num_classes)
    for line in _summary(feats, labels, args.num_classes):
        print(line)
    return 0
