"""Seed-compatible entry point: same as `dida convert gta ROOT [--nproc N] ...`."""

from __future__ import annotations

import sys

from dida.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["convert", "gta", *sys.argv[1:]]))
