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
import time

import dida
from dida.errors import Interrupted, UserError, one_line

# commands that compute: their thread settings adapt to other work on the CPU
COMPUTE = {"quickstart", "train", "test", "demo", "predict", "export"}


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
            help="CPU threads of PyTorch (default: OMP_NUM_THREADS if set; else one per core, "
            "or one per free core when other work keeps cores busy; README: 'Speed on a "
            "shared CPU')",
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
        if os.environ["OPENCV_LOG_LEVEL"] == "ERROR":
            cv_logging = getattr(getattr(cv2, "utils", None), "logging", None)
            if cv_logging is not None:
                cv_logging.setLogLevel(cv_logging.LOG_LEVEL_ERROR)
            elif hasattr(cv2, "setLogLevel"):  # OpenCV < 4.12 has no cv2.utils.logging
                cv2.setLogLevel(2)  # LOG_LEVEL_ERROR
    logging.captureWarnings(True)
    logger = logging.getLogger("py.warnings")
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())


def cpu_ids() -> list[int]:
    """The CPUs this process may run on (Linux: its affinity); empty where the OS does not say."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def busy_cpus(cpus: list[int], interval: float = 0.25) -> float | None:
    """How many of `cpus` other processes keep busy now: two samples of /proc/stat (Linux),
    `interval` seconds apart; None where /proc/stat is not readable."""

    def sample() -> dict[int, tuple[int, int]]:
        times = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit():
                    values = [int(v) for v in fields[:8]]  # user .. steal; guest is inside user
                    times[int(name[3:])] = (sum(values), values[3] + values[4])  # total, idle
        return times

    try:
        first = sample()
        time.sleep(interval)
        second = sample()
    except (OSError, ValueError):
        return None
    busy = 0.0
    for cpu in cpus:
        if cpu in first and cpu in second:
            total = second[cpu][0] - first[cpu][0]
            idle = second[cpu][1] - first[cpu][1]
            busy += 1.0 - idle / total if total > 0 else 0.0
    return busy


def configure_threads(threads: int | None, adapt: bool = True) -> str | None:
    """CPU threads that degrade gracefully when other processes share the CPU; returns a note
    for the user when the choice was made for them.

    `threads`, or OMP_NUM_THREADS, sets PyTorch's thread count. Otherwise, when other work keeps
    some of this process's cores busy (sampled at start), dida uses one thread per free core and
    OpenMP threads that sleep while they wait (`OMP_WAIT_POLICY=PASSIVE`): spinning threads of two
    jobs on the same cores slowed both 4-6x. On idle cores it keeps PyTorch's thread count and
    OpenMP's own policy (spin, then sleep), 3x faster on this 2-core machine than sleeping threads.
    A set OMP_WAIT_POLICY is kept; set but empty means OpenMP's own. The sampling (0.25 s) runs
    only with `adapt` and before torch is loaded (the wait policy is read then).
    """
    note = None
    user_threads = threads or os.environ.get("OMP_NUM_THREADS", "").strip()
    cpus = cpu_ids()
    if adapt and not user_threads and len(cpus) > 1 and "torch" not in sys.modules:
        busy = busy_cpus(cpus)
        free = len(cpus) - busy if busy is not None else len(cpus)
        if free < len(cpus) - 0.5:  # other work holds at least half a core
            threads = max(1, round(free))
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            note = (
                f"{busy:.1f} of {len(cpus)} CPU cores busy with other work: {threads} thread(s), "
                "sleeping while they wait (--threads N to choose)"
            )
    if not os.environ.get("OMP_WAIT_POLICY", "x"):
        del os.environ["OMP_WAIT_POLICY"]  # set but empty: the OpenMP runtime's own policy
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # also for processes started later
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
    return note


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 1
    note = configure_threads(getattr(args, "threads", None), adapt=args.command in COMPUTE)
    if note:
        print(f"dida {args.command}: note: {note}", file=sys.stderr)
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
