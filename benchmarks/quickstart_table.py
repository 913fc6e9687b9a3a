"""The README's quickstart table: mIoU mean ± std over seeds and per-class IoU means, per method.

Reads `<work_dir>/seed*/<method>/preds/results.json` as written by `dida quickstart` and prints a
Markdown table (values ×100).

    python benchmarks/quickstart_table.py work_dirs/quickstart
    python benchmarks/quickstart_table.py work_dirs/quickstart work_dirs/qs_no_st \
        --rename work_dirs/qs_no_st:daformer=daformer_no_self_training
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path


def collect(work_dirs: list[Path], rename: dict[str, str]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for work_dir in work_dirs:
        for path in sorted(work_dir.glob("seed*/*/preds/results.json")):
            method = path.parent.parent.name
            method = rename.get(f"{work_dir}:{method}", rename.get(method, method))
            runs.setdefault(method, []).append(json.loads(path.read_text()))
    return runs


def table(runs: dict[str, list[dict]]) -> str:
    first = next(iter(runs.values()))[0]
    classes = [c for c, acc in first["Acc"].items() if acc is not None]
    short = [c.replace("traffic ", "t. ") for c in classes]
    lines = ["| method | seeds | mIoU (mean ± std) | per seed | " + " | ".join(short) + " |",
             "|---|---|---|---|" + "---|" * len(classes)]  # fmt: skip
    for method, results in runs.items():
        miou = [100 * r["mIoU"] for r in results]
        std = statistics.stdev(miou) if len(miou) > 1 else math.nan
        per_class = [statistics.mean(100 * r["IoU"][c] for r in results) for c in classes]
        cells = [method, str(len(miou)), f"{statistics.mean(miou):.2f} ± {std:.2f}",
                 " / ".join(f"{m:.2f}" for m in miou)] + [f"{v:.1f}" for v in per_class]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work_dirs", nargs="+", type=Path)
    parser.add_argument("--rename", nargs="*", default=[], metavar="[DIR:]OLD=NEW",
                        help="show a method under another name")  # fmt: skip
    args = parser.parse_args()
    rename = dict(item.split("=", 1) for item in args.rename)
    print(table(collect(args.work_dirs, rename)))


if __name__ == "__main__":
    main()
