"""`dida` console script: discovers the subcommand modules of this package and dispatches to them.

A subcommand module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`; heavy
imports live inside `run` so that `dida --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import dida
from dida.errors import Interrupted, UserError, one_line


def _subcommand_modules() -> list:
    import dida.cli as package

    modules = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in ("main",) or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"dida.cli.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "run"):
            modules.append(module)
    return sorted(modules, key=lambda m: getattr(m, "ORDER", 50))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dida",
        description="DIDA / DAFormer domain-adaptive semantic segmentation.",
        epilog="New here? Run `dida quickstart`, then see README.md.",
    )
    parser.add_argument("--version", action="version", version=f"dida {dida.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _subcommand_modules():
        p = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        _add_common_options(p)
        p.set_defaults(_run=module.run)
    return parser


def _add_common_options(p: argparse.ArgumentParser) -> None:
    """`--threads` everywhere; `--cfg-options` (mmseg's spelling) wherever `--set` exists."""
    if "--set" in p._option_string_actions and "--cfg-options" not in p._option_string_actions:
        p.add_argument(
            "--cfg-options", dest="overrides", nargs="+", action="extend", metavar="KEY=VALUE",
            help="same as --set, several KEY=VALUE at once (mmseg's spelling)",
        )  # fmt: skip
    if "--threads" not in p._option_string_actions:
        p.add_argument(
            "--threads", type=_positive_int, metavar="N",
            help="CPU threads of PyTorch (default: OMP_NUM_THREADS if set, else PyTorch's own); "
            "idle threads sleep instead of spinning (README: 'Speed on a shared CPU')",
        )  # fmt: skip


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected 1 or more")
    return value


def quiet_library_warnings() -> None:
    """Library warnings (torch, numpy, ...) and OpenCV's own messages stay off the console:
    Python warnings go to the `py.warnings` logger, which a training writes into its train.log."""
    import logging

    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # read when cv2 is imported
    if "cv2" in sys.modules:  # already imported (e.g. by a caller of main())
        cv2 = sys.modules["cv2"]
        if os.environ["OPENCV_LOG_LEVEL"] == "ERROR" and hasattr(cv2, "utils"):
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    logging.captureWarnings(True)
    logger = logging.getLogger("py.warnings")
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())


def configure_threads(threads: int | None) -> None:
    """CPU thread settings that degrade gracefully when other processes share the CPU.

    OpenMP threads sleep while they wait (`OMP_WAIT_POLICY=PASSIVE`, unless the variable is set;
    set but empty: the OpenMP runtime's own policy) instead of spinning against other programs;
    `threads` sets PyTorch's thread count.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP
    if not os.environ["OMP_WAIT_POLICY"]:
        del os.environ["OMP_WAIT_POLICY"]
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # also for processes started later
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 1
    configure_threads(getattr(args, "threads", None))
    quiet_library_warnings()
    try:
        return int(args._run(args) or 0)
    except UserError as err:
        print(f"dida {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"dida {args.command}: interrupted: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"dida {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
