"""The built-in synthetic domain-adaptation benchmark: GTA-like source, Cityscapes-like target.

`make_synthetic_benchmark` renders `dida.data.scenes` scenes once, writes them in the real dataset
formats (`root/gta`, `root/cityscapes`), runs the real converters on them and leaves a marker file,
so that a second call with the same parameters reuses the cache.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dida.data.convert import convert_dataset
from dida.data.scenes import render_scene
from dida.data.synthetic import write_cityscapes_sample, write_gta_sample
from dida.errors import DataError

MARKER = "benchmark.json"
TRAIN_CITY = "simtown"
VAL_CITY = "simville"
# index of each part in the per-sample seed, so parts never share random streams
_STREAMS = {"source": 0, "train": 1, "val": 2}


@dataclass(frozen=True)
class _Params:
    seed: int
    n_source: int
    n_target_train: int
    n_val: int
    source_size: tuple[int, int]
    target_size: tuple[int, int]
    generator_version: int = 2


def _render(seed: int, stream: str, index: int, size: tuple[int, int], domain: str):
    rng = np.random.default_rng([seed, _STREAMS[stream], index])
    return render_scene(rng, size[0], size[1], domain)


def _write_one(job: tuple[Path, _Params, str, int]) -> None:
    """Render and write sample `index` of `stream` ("source", "train" or "val")."""
    root, p, stream, index = job
    if stream == "source":
        image, labels = _render(p.seed, stream, index, p.source_size, "source")
        write_gta_sample(root / "gta", f"{index + 1:05d}", image, labels)
        return
    image, labels = _render(p.seed, stream, index, p.target_size, "target")
    city = TRAIN_CITY if stream == "train" else VAL_CITY
    write_cityscapes_sample(root / "cityscapes", stream, city, 0, index, image, labels)


def _jobs(root: Path, p: _Params) -> list[tuple[Path, _Params, str, int]]:
    counts = {"source": p.n_source, "train": p.n_target_train, "val": p.n_val}
    return [(root, p, stream, i) for stream, n in counts.items() for i in range(n)]


def _run_jobs(jobs: list, nproc: int) -> None:
    if nproc <= 1:
        for job in jobs:
            _write_one(job)
        return
    import multiprocessing

    with multiprocessing.get_context().Pool(nproc) as pool:
        for _ in pool.imap_unordered(_write_one, jobs, chunksize=16):
            pass


def _read_marker(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        msg = f"{path}: unreadable benchmark marker; remove the folder to regenerate"
        raise DataError(msg) from None


def make_synthetic_benchmark(
    root: str | Path,
    *,
    seed: int = 0,
    n_source: int = 400,
    n_target_train: int = 400,
    n_val: int = 100,
    source_size: tuple[int, int] = (176, 320),
    target_size: tuple[int, int] = (128, 256),
    nproc: int = 1,
) -> dict:
    """Generate (once) and convert the synthetic GTA-like → Cityscapes-like benchmark under `root`.

    Args:
        root: output folder; gets `gta/` (images/, labels/ + converted trainIds and RCS stats),
            `cityscapes/` (leftImg8bit/{train,val}, gtFine/{train,val} + converted) and a marker.
        seed: scene seed; sample i of each part uses `default_rng([seed, part, i])`, so the data
            do not depend on `nproc`.
        n_source, n_target_train, n_val: numbers of source, target-train and target-val scenes.
        source_size, target_size: `(height, width)` of the source and target images.
        nproc: worker processes for rendering and conversion.

    Returns:
        The marker contents: the parameters, `gta_root`, `cityscapes_root` (absolute: the marker
        stores them relative to its folder, so a cached benchmark is found from any working
        folder), `seconds` (generation time of the first call) and `cached` (True when an
        existing benchmark was reused).

    Raises:
        DataError: `root` holds a benchmark made with other parameters.
    """
    root = Path(root).absolute()
    params = _Params(seed, n_source, n_target_train, n_val, tuple(source_size), tuple(target_size))
    expected = json.loads(json.dumps(asdict(params)))  # tuples -> lists, as read back from JSON
    marker = root / MARKER
    info = _read_marker(marker)
    if info is not None:
        if info.get("params") != expected:
            raise DataError(
                f"{marker}: benchmark made with other parameters {info.get('params')}; "
                f"remove {root} or pick another folder"
            )
        return {**info, **_roots(root), "cached": True}
    start = time.perf_counter()
    _run_jobs(_jobs(root, params), nproc)
    convert_dataset("gta", root / "gta", nproc=nproc)
    convert_dataset("cityscapes", root / "cityscapes", nproc=nproc)
    info = {
        "params": expected,
        "gta_root": "gta",  # relative to this marker's folder
        "cityscapes_root": "cityscapes",
        "seconds": round(time.perf_counter() - start, 2),
    }
    marker.write_text(json.dumps(info, indent=2) + "\n")
    return {**info, **_roots(root), "cached": False}


def _roots(root: Path) -> dict[str, str]:
    """The absolute dataset folders of a benchmark at `root`."""
    return {"gta_root": str(root / "gta"), "cityscapes_root": str(root / "cityscapes")}
