"""The seed's image demo command, `python -m image_demo IMAGE CONFIG CHECKPOINT`: wraps `dida demo`.

Writes `<image stem>_pred.png` next to the image: the image with the predicted classes in colour
(`--opacity`) and a legend strip naming the classes present. `python -m image_demo` works from
any folder once dida is installed (`image_demo` is installed as a top-level module).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m image_demo", description=__doc__)
    parser.add_argument("img", help="image file")
    parser.add_argument("config", help="config file (the run's .json)")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("--device", default=None, help="device, e.g. cuda:0 or cpu")
    parser.add_argument("--palette", default="cityscapes", choices=["cityscapes"])
    parser.add_argument("--opacity", type=float, default=0.5, help="colour opacity in [0, 1]")
    args = parser.parse_args(argv)

    from dida.cli.main import main as dida_main

    forwarded = ["demo", args.img, "--config", args.config, "--checkpoint", args.checkpoint]
    forwarded += ["--opacity", str(args.opacity)]
    if args.device:
        forwarded += ["--device", args.device]
    return dida_main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
