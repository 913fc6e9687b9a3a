"""`dida` console script: discovers the subcommand modules of this package and dispatches to them.

A subcommand module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`; heavy
imports live inside `run` so that `dida --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import dida
from dida.errors import UserError


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
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 1
    try:
        return int(args._run(args) or 0)
    except UserError as err:
        print(f"dida {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dida {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
