"""Tests for rare-class sampling: probabilities, candidates by basename, dropped classes."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from dida.data.rcs import RareClassSampler, class_probabilities, load_stats
from dida.errors import DataError

STATS = [
    {"0": 6000, "2": 4000, "file": "data/gta/labels/00001_labelTrainIds.png"},
    {"0": 5000, "5": 3500, "file": "data/gta/labels/00002_labelTrainIds.png"},
    {"2": 100, "5": 2500, "file": "data/gta/labels/00003_labelTrainIds.png"},
]
WITH_CLASS = {
    "0": [["data/gta/labels/00001_labelTrainIds.png", 6000],
          ["data/gta/labels/00002_labelTrainIds.png", 5000]],
    "2": [["data/gta/labels/00001_labelTrainIds.png", 4000],
          ["data/gta/labels/00003_labelTrainIds.png", 100]],
    "5": [["data/gta/labels/00002_labelTrainIds.png", 3500],
          ["data/gta/labels/00003_labelTrainIds.png", 2500]],
}  # fmt: skip
INDEX = {f"0000{k}_labelTrainIds.png": k - 1 for k in (1, 2, 3)}


def _by_hand(temperature: float) -> tuple[list[int], list[float]]:
    totals = {0: 11000, 2: 4100, 5: 6000}
    order = sorted(totals, key=totals.get)  # ascending count: 2, 5, 0
    f = [totals[c] / 21100 for c in order]
    e = [math.exp((1 - x) / temperature) for x in f]
    return order, [v / sum(e) for v in e]


def test_probabilities_match_softmax_by_hand() -> None:
    classes, freq, probs = class_probabilities(STATS, 0.01)
    order, expected = _by_hand(0.01)
    assert classes.tolist() == order == [2, 5, 0]
    np.testing.assert_allclose(freq, [4100 / 21100, 6000 / 21100, 11000 / 21100])
    np.testing.assert_allclose(probs, expected, rtol=1e-9)
    assert probs[0] > 0.99  # T = 0.01 strongly favours the rarest class


def test_candidates_and_sampling() -> None:
    rcs = RareClassSampler(STATS, WITH_CLASS, INDEX, temperature=1.0, min_pixels=3000)
    assert {c: v.tolist() for c, v in rcs.candidates.items()} == {2: [0], 5: [1], 0: [0, 1]}
    np.testing.assert_allclose(rcs.probs, _by_hand(1.0)[1])
    assert rcs.min_crop_pixels == 1500
    rng = np.random.default_rng(0)
    draws = [rcs.sample(rng) for _ in range(3000)]
    for c, index in draws:
        assert index in rcs.candidates[c]
    share = np.mean([c == 2 for c, _ in draws])
    assert abs(share - rcs.probs[0]) < 0.03
    again = [rcs.sample(np.random.default_rng(0)) for _ in range(2)]
    assert again[0] == again[1] == draws[0]


def test_class_without_candidate_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        rcs = RareClassSampler(STATS, WITH_CLASS, INDEX, temperature=1.0, min_pixels=3600)
    assert rcs.classes.tolist() == [2, 0]  # class 5 has at most 3500 pixels per file
    assert "class 5" in caplog.text
    full = _by_hand(1.0)[1]
    np.testing.assert_allclose(rcs.probs, [full[0], full[2]] / np.sum([full[0], full[2]]))
    with pytest.raises(DataError):
        RareClassSampler(STATS, WITH_CLASS, {}, min_pixels=0)  # no file in the dataset


def test_load_stats(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="sample_class_stats.json"):
        load_stats(tmp_path)
    (tmp_path / "sample_class_stats.json").write_text(json.dumps(STATS))
    (tmp_path / "samples_with_class.json").write_text("{broken")
    with pytest.raises(DataError, match="samples_with_class.json"):
        load_stats(tmp_path)
    (tmp_path / "samples_with_class.json").write_text(json.dumps(WITH_CLASS))
    assert load_stats(tmp_path) == (STATS, WITH_CLASS)
