"""Tests for `dida demo` and the seed's `python -m image_demo` wrapper on a tiny random model."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from test_cli_test import make_run

from dida.cli.main import main
from dida.viz import colorize

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("demo_run"))


def _write(path: Path, height: int, width: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), image)
    return path


def test_demo_odd_sizes_folder_and_raw_output(run_dir: Path, tmp_path: Path) -> None:
    _write(tmp_path / "in" / "a.png", 61, 97)
    _write(tmp_path / "in" / "b.jpg", 97, 61, seed=1)
    out = tmp_path / "out"
    common = ["--config", str(run_dir / "tiny.json"), "--checkpoint", str(run_dir / "latest.pth")]
    argv = [
        "demo",
        str(tmp_path / "in"),
        *common,
        "--out",
        str(out),
        "--save-raw",
        "--opacity",
        "1",
    ]
    assert main(argv) == 0
    raw_a = cv2.imread(str(out / "a_trainIds.png"), cv2.IMREAD_UNCHANGED)
    raw_b = cv2.imread(str(out / "b_trainIds.png"), cv2.IMREAD_UNCHANGED)
    assert raw_a.shape == (61, 97) and raw_b.shape == (97, 61)
    assert raw_a.max() < 19
    pred_a = cv2.cvtColor(cv2.imread(str(out / "a_pred.png")), cv2.COLOR_BGR2RGB)
    assert pred_a.shape[1] == 97 and pred_a.shape[0] > 61  # legend strip below the image
    assert (pred_a[:61] == colorize(raw_a)).all()  # opacity 1: the pure colour map
    # without legend: exactly the original size, written next to the input
    assert main(["demo", str(tmp_path / "in" / "a.png"), *common, "--no-legend"]) == 0
    assert cv2.imread(str(tmp_path / "in" / "a_pred.png")).shape == (61, 97, 3)


def test_image_demo_wrapper(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    import image_demo

    image = _write(tmp_path / "demo4.png", 50, 73)
    cfg, ckpt = str(run_dir / "tiny.json"), str(run_dir / "latest.pth")
    assert image_demo.main([str(image), cfg, ckpt, "--device", "cpu", "--opacity", "0.3"]) == 0
    out = cv2.imread(str(tmp_path / "demo4_pred.png"))
    assert out.shape[1] == 73 and out.shape[0] >= 50


def test_demo_errors_are_one_line(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = make_run(tmp_path / "other", variant="mit_b1")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG garbage")
    good = _write(tmp_path / "ok.png", 20, 30)
    cfg, ckpt = str(run_dir / "tiny.json"), str(run_dir / "latest.pth")
    cases = [
        (["demo", str(corrupt), "--config", cfg, "--checkpoint", ckpt], "corrupt.png"),
        (["demo", str(tmp_path / "nope.png"), "--config", cfg, "--checkpoint", ckpt], "nope.png"),
        (["demo", str(good), "--config", cfg, "--checkpoint", str(other / "latest.pth")], "mit_b1"),
        (["demo", str(good), "--config", cfg, "--checkpoint", str(tmp_path / "x.pth")], "x.pth"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("dida demo: error:") and "\n" not in err and needle in err, err
