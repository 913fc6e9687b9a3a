"""The seed's `python create_buffer.py`: a placeholder instance bank of unit random vectors.

Wraps `dida bank random`: K feature vectors of D channels drawn from a Gaussian and normalised to
unit length, labels round-robin over C classes; train with it through
`--set method.bank.init=file --set method.bank.init_path=OUTPUT`.

    python create_buffer.py -o random_bank.pt --size 300 --dim 256 --classes 19
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python create_buffer.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-o", "--output", default="random_bank.pt",
                        help="new .pt or .safetensors file (default random_bank.pt)")  # fmt: skip
    parser.add_argument("--size", type=int, default=300, help="entries K (default 300)")
    parser.add_argument("--dim", type=int, default=256, help="channels D (default 256)")
    parser.add_argument("--classes", type=int, default=19, help="classes C (default 19)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    args = parser.parse_args(argv)

    from dida.cli.main import main as dida_main

    forwarded = ["bank", "random", "-o", args.output, "--size", str(args.size),
                 "--dim", str(args.dim), "--num-classes", str(args.classes),
                 "--seed", str(args.seed)]  # fmt: skip
    return dida_main(forwarded + (["--overwrite"] if args.overwrite else []))


if __name__ == "__main__":
    sys.exit(main())
