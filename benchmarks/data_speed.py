"""Training-data throughput: UDADataset + DataLoader samples/second on GTA-sized synthetic data.

Also times PNG decode + keep-ratio resize of a 1914x1052 image with PIL and with OpenCV (the
measurement behind `dida.data.io` using OpenCV).

    python benchmarks/data_speed.py --workers 0 1 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _decode_compare(path: Path, repeats: int) -> dict[str, float]:
    import cv2
    from PIL import Image

    from dida.data.transforms import rescale_size

    def with_pil() -> np.ndarray:
        with Image.open(path) as image:
            image = image.convert("RGB")
            size = rescale_size(image.width, image.height, (1280, 720))
            return np.asarray(image.resize(size, Image.BILINEAR))

    def with_cv2() -> np.ndarray:
        image = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        size = rescale_size(image.shape[1], image.shape[0], (1280, 720))
        return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)

    result = {}
    for name, fn in (("pil", with_pil), ("opencv", with_cv2)):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[name] = float(np.median(times))
    return result


def _make_data(base: Path, n: int) -> None:
    from dida.data import synthetic
    from dida.data.convert import convert_dataset

    synthetic.make_gta(base / "gta", n, size=(1052, 1914), seed=0, classes=(0, 1, 2, 8, 10, 13, 17))
    synthetic.make_cityscapes(base / "cityscapes", n, size=(1024, 2048), seed=1, splits=("train",))
    convert_dataset("gta", base / "gta", nproc=2)


def _throughput(base: Path, workers: int, batches: int, batch_size: int) -> float:
    import torch
    from torch.utils.data import DataLoader

    from dida.config import DataConfig, DatasetConfig
    from dida.data.uda import build_train_dataset

    cfg = DataConfig(
        source=DatasetConfig(kind="gta", root=str(base / "gta"), scale=[1280, 720]),
        target=DatasetConfig(kind="cityscapes", root=str(base / "cityscapes")),
    )
    dataset = build_train_dataset(cfg, seed=0)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=range(10**9), num_workers=workers, drop_last=True
    )
    it = iter(loader)
    next(it)  # worker start-up and first batch are not counted
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    elapsed = time.perf_counter() - start
    assert batch["src_img"].dtype == torch.float32
    del it
    return batches * batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=8, help="synthetic images per domain")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="decode timing repeats")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        _make_data(base, args.images)
        decode = _decode_compare(base / "gta/images/00001.png", args.repeats)
        print(
            f"decode+resize 1914x1052 -> 1280x704: PIL {decode['pil'] * 1e3:.1f} ms, "
            f"OpenCV {decode['opencv'] * 1e3:.1f} ms (median of {args.repeats})"
        )
        for workers in args.workers:
            rate = _throughput(base, workers, args.batches, args.batch_size)
            print(f"workers={workers}: {rate:.2f} samples/s (batch {args.batch_size}, RCS on)")


if __name__ == "__main__":
    main()
