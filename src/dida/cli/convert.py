"""`dida convert`: GTA / SYNTHIA / Cityscapes labels -> trainId PNGs and RCS statistics files."""

from __future__ import annotations

import argparse

NAME = "convert"
HELP = "convert dataset labels to trainIds and write class statistics (run once per dataset)"
DESCRIPTION = """\
Writes <stem>_labelTrainIds.png beside every input label and sample_class_stats.json,
sample_class_stats_dict.json, samples_with_class.json into the output folder (Cityscapes also
train.txt, val.txt, test.txt). Safe to re-run: existing identical outputs are left alone; an
existing output that differs is an error (nothing is ever overwritten or removed).

  dida convert gta data/gta --nproc 8
  dida convert synthia data/synthia --nproc 8
  dida convert cityscapes data/cityscapes --nproc 8
"""
ORDER = 60


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=["gta", "synthia", "cityscapes"], help="dataset kind")
    parser.add_argument("root", help="dataset root folder, e.g. data/gta")
    parser.add_argument("--gt-dir", default=None, help="label folder relative to ROOT")
    parser.add_argument("-o", "--out-dir", default=None, help="statistics folder (default ROOT)")
    parser.add_argument(
        "--nproc", type=int, default=None, help="worker processes (default 4; Cityscapes 1)"
    )


def run(args: argparse.Namespace) -> int:
    from dida.data.convert import convert_dataset
    from dida.engine.logging import track

    def progress(iterable, total):  # a bar on a terminal, else a plain line every 30 s
        return track(iterable, total, f"convert {args.dataset}")

    result = convert_dataset(
        args.dataset, args.root, args.out_dir, args.gt_dir, args.nproc, progress=progress
    )
    print(
        f"converted {args.dataset} at {args.root}: {len(result.stats)} files with class statistics"
    )
    if result.size_mismatches:
        print(f"note: {len(result.size_mismatches)} image/label pairs differ in size; training "
              "resizes these labels to their images (nearest):")  # fmt: skip
        for line in result.size_mismatches[:20]:
            print(f"  {line}")
        if len(result.size_mismatches) > 20:
            print(f"  ... and {len(result.size_mismatches) - 20} more")
    return 0
