"""`dida convert`: GTA / SYNTHIA / Cityscapes labels -> trainId PNGs and RCS statistics files;
your own folder dataset's labels -> RCS statistics files."""

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

Your own source dataset (`kind: folder`, labels already class indices): `folder` writes only the
statistics that rare-class sampling reads, after checking every label (8-bit grayscale or palette
PNG, values 0..N-1 or 255):

  dida convert folder data/mysource --gt-dir labels --num-classes 4
"""
ORDER = 60


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dataset", choices=["gta", "synthia", "cityscapes", "folder"], help="dataset kind"
    )
    parser.add_argument("root", help="dataset root folder, e.g. data/gta")
    parser.add_argument(
        "--gt-dir", default=None, help="label folder relative to ROOT (folder: required)"
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, help="folder: number of classes (required)"
    )
    parser.add_argument(
        "--seg-suffix", default=".png", help="folder: label file ending (default .png)"
    )
    parser.add_argument("-o", "--out-dir", default=None, help="statistics folder (default ROOT)")
    parser.add_argument(
        "--nproc", type=int, default=None, help="worker processes (default 4; Cityscapes 1)"
    )


def run(args: argparse.Namespace) -> int:
    from dida.data.convert import convert_dataset
    from dida.engine.logging import track
    from dida.errors import UserError

    def progress(iterable, total):  # a bar on a terminal, else a plain line every 30 s
        return track(iterable, total, f"convert {args.dataset}")

    folder = args.dataset == "folder"
    if folder and (args.gt_dir is None or args.num_classes is None):
        raise UserError("folder needs --gt-dir and --num-classes")
    if not folder and args.num_classes is not None:
        raise UserError("--num-classes is for folder datasets (the others have 19 classes)")
    result = convert_dataset(
        args.dataset, args.root, args.out_dir, args.gt_dir, args.nproc, progress=progress,
        num_classes=args.num_classes, seg_suffix=args.seg_suffix,
    )  # fmt: skip
    if folder:
        print(f"wrote the class statistics of {len(result.stats)} labels under {args.root}")
        return 0
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
