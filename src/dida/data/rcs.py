"""Rare-class sampling (DAFormer RCS): class frequencies -> sampling probabilities
P(c) = softmax((1 - f_c) / T), and per-class candidate source files matched by label basename.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dida.errors import DataError

log = logging.getLogger(__name__)


def class_probabilities(
    sample_class_stats: list[dict], temperature: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Classes present in the stats sorted by total count ascending, their frequencies and P(c).

    Returns:
        (classes int64 [C'], freq float64 [C'], probs float64 [C']).
    """
    totals: dict[int, int] = {}
    for sample in sample_class_stats:
        for key, count in sample.items():
            if key != "file":
                totals[int(key)] = totals.get(int(key), 0) + int(count)
    ordered = sorted(totals.items(), key=lambda item: item[1])
    classes = np.array([c for c, _ in ordered], dtype=np.int64)
    counts = np.array([n for _, n in ordered], dtype=np.float64)
    freq = counts / counts.sum()
    return classes, freq, _softmax((1.0 - freq) / temperature)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


class RareClassSampler:
    """Samples (class, dataset index) pairs: rare classes more often, then a file containing them.

    Attributes:
        classes: sampled trainIds, ascending by frequency.
        freq: their pixel frequencies f_c (over all classes in the stats).
        probs: their sampling probabilities (renormalised if classes were dropped).
        candidates: per class, dataset indices with more than `min_pixels` pixels of it.
    """

    def __init__(
        self,
        sample_class_stats: list[dict],
        samples_with_class: Mapping[str, list],
        label_path_to_index: Mapping[str, int],
        temperature: float = 0.01,
        min_pixels: int = 3000,
        min_crop_ratio: float = 0.5,
    ) -> None:
        classes, freq, probs = class_probabilities(sample_class_stats, temperature)
        self.min_pixels = min_pixels
        self.min_crop_ratio = min_crop_ratio
        keep, self.candidates = [], {}
        for k, c in enumerate(classes.tolist()):
            files = samples_with_class.get(str(c), [])
            indices = sorted(
                {label_path_to_index[Path(f).name] for f, n in files
                 if n > min_pixels and Path(f).name in label_path_to_index}
            )  # fmt: skip
            if not indices:
                log.warning(
                    "RCS: class %d has no file with > %d pixels; not sampled", c, min_pixels
                )
                continue
            keep.append(k)
            self.candidates[c] = np.array(indices, dtype=np.int64)
        if not keep:
            raise DataError("RCS: no class has a candidate file; check the stats files")
        self.classes = classes[keep]
        self.freq = freq[keep]
        self.probs = probs[keep] / probs[keep].sum()

    @property
    def min_crop_pixels(self) -> float:
        """A crop is accepted when it holds more than this many pixels of the sampled class."""
        return self.min_pixels * self.min_crop_ratio

    def sample(self, rng: np.random.Generator) -> tuple[int, int]:
        """Draw a class c ~ P, then a candidate file of c uniformly: returns (c, dataset index)."""
        c = int(self.classes[rng.choice(len(self.classes), p=self.probs)])
        candidates = self.candidates[c]
        return c, int(candidates[rng.integers(len(candidates))])


def load_stats(
    stats_dir: str | Path, convert_command: str = "dida convert"
) -> tuple[list[dict], dict[str, list]]:
    """Read `sample_class_stats.json` and `samples_with_class.json` from a converted root; a
    missing file's error names `convert_command`, which writes them."""
    loaded = []
    for name in ("sample_class_stats.json", "samples_with_class.json"):
        path = Path(stats_dir) / name
        try:
            loaded.append(json.loads(path.read_text()))
        except FileNotFoundError:
            raise DataError(
                f"{path}: not found; rare-class sampling needs it: run `{convert_command}` once, "
                "or set data.rcs.enabled=false"
            ) from None
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot read JSON ({err})") from None
    return loaded[0], loaded[1]
