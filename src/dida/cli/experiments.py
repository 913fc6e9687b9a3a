"""`dida experiments`: list the shipped experiment configs."""

from __future__ import annotations

import argparse

NAME = "experiments"
HELP = "list the shipped experiments (ids for `dida train --exp`)"
ORDER = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--paths", action="store_true", help="also print each config file's path")


def run(args: argparse.Namespace) -> int:
    from dida.experiments import list_experiments

    experiments = list_experiments()
    rows = []
    for e in experiments:
        c = e.config
        pair = f"{c.data.source.kind}->{c.data.target.kind}"
        rows.append((e.exp, c.method.name, pair, c.model.variant, str(c.train.seed), c.name))
    header = ("exp", "method", "source->target", "model", "seed", "name")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
    print(line(header))
    for row, e in zip(rows, experiments, strict=True):
        print(line(row))
        if e.config.description:
            print(f"    {e.config.description}")
    if args.paths:
        print()
        for e in experiments:
            print(f"{e.exp}: {e.path}")
    print("\ntrain one with `dida train --exp ID [--set key=value ...]`")
    return 0
