"""Tests for `dida predict` on a tiny random model: folders, odd images, corrupt files, a video,
agreement with `dida test`, and the refusal to overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from test_cli_test import make_run

from dida.cli.main import main
from dida.data.inputs import collect_inputs
from dida.engine.predict import is_output
from dida.viz import colorize, overlay


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("predict_run"))


def _image(path: Path, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Write a random image (BGR / BGRA / gray as OpenCV stores it) and return the array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    assert cv2.imwrite(str(path), array)
    return array


def _video(path: Path, frames: int, size: tuple[int, int], fps: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size[1], size[0]))
    rng = np.random.default_rng(7)
    for _ in range(frames):
        writer.write(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    writer.release()
    assert path.is_file()


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def test_predict_folder_tree_odd_images_corrupt_file_and_video(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "in"
    bgr = _image(src / "a.png", (61, 97, 3), seed=0)
    _image(src / "city" / "day" / "b.jpg", (97, 61, 3), seed=1)
    gray = _image(src / "city" / "gray.png", (40, 50), seed=2)
    cv2.imwrite(str(src / "city" / "gray_as_rgb.png"), cv2.merge([gray, gray, gray]))
    bgra = _image(src / "rgba.png", (33, 70, 4), seed=3)
    cv2.imwrite(str(src / "rgba_as_rgb.png"), bgra[:, :, :3])
    (src / "city" / "broken.png").write_bytes(b"\x89PNG not really")
    _video(src / "clips" / "drive.mp4", frames=7, size=(48, 80), fps=5.0)
    out = tmp_path / "out"

    argv = [
        "predict",
        str(run_dir),
        str(src),
        "-o",
        str(out),
        "--save",
        "label",
        "color",
        "overlay",
    ]
    assert main([*argv, "video", "--workers", "1", "--batch-size", "3", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "broken.png: cannot decode image" in captured.err
    assert "gray.png: grayscale, converted to RGB" in captured.err
    assert "rgba.png: RGBA, alpha dropped" in captured.err
    assert "predicted 6 images and 1 videos (7 frames)" in captured.out
    assert "skipped 1 unreadable" in captured.out

    # the input tree is mirrored, labels have the input's size
    assert _read(out / "a_trainIds.png").shape == (61, 97)
    assert _read(out / "city" / "day" / "b_trainIds.png").shape == (97, 61)
    assert not (out / "city" / "broken_trainIds.png").exists()
    label = _read(out / "a_trainIds.png")
    assert label.max() < 19 and len(np.unique(label)) > 1
    expected = overlay(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), colorize(label), 0.5)
    assert np.array_equal(_read(out / "a_overlay.png"), expected)
    # the colour output is a palette PNG: class colours when viewed, trainIds as its indices
    assert np.array_equal(
        cv2.cvtColor(cv2.imread(str(out / "a_color.png")), cv2.COLOR_BGR2RGB), colorize(label)
    )
    with Image.open(out / "a_color.png") as color:
        assert color.mode == "P" and np.array_equal(np.array(color), label)
    # grayscale and RGBA inputs are predicted as their RGB versions
    for name, same in (("city/gray", "city/gray_as_rgb"), ("rgba", "rgba_as_rgb")):
        assert np.array_equal(
            _read(out / f"{name}_trainIds.png"), _read(out / f"{same}_trainIds.png")
        )

    # the video: overlay video with every frame at the source size and frame rate, frame labels
    capture = cv2.VideoCapture(str(out / "clips" / "drive_overlay.mp4"))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(5.0)
    capture.release()
    assert len(frames) == 7 and all(f.shape == (48, 80, 3) for f in frames)
    labels = sorted((out / "clips" / "drive").glob("*_trainIds.png"))
    assert [p.name for p in labels] == [f"{k:06d}_trainIds.png" for k in range(7)]
    assert _read(labels[3]).shape == (48, 80)


@pytest.mark.parametrize("mode", ["whole", pytest.param("slide", marks=pytest.mark.slow)])
def test_predict_labels_equal_dida_test_predictions(
    run_dir: Path, tmp_path: Path, mode: str
) -> None:
    # the run's val images, through `dida test --format-only` and through `dida predict`
    tested = tmp_path / "test_labelIds"
    windows = [
        "--inference",
        mode,
        "--set",
        "eval.crop_size=[48,48]",
        "--set",
        "eval.stride=[32,32]",
    ]
    argv = ["test", str(run_dir), "--format-only", "--out-dir", str(tested), *windows]
    assert main([*argv, "--no-progress"]) == 0
    val = Path(json.loads((run_dir / "tiny.json").read_text())["data"]["val"]["root"])
    images = val / "leftImg8bit" / "val"
    predicted = tmp_path / "predict_labelIds"
    argv = ["predict", str(run_dir), str(images), "-o", str(predicted), "--save", "label"]
    assert main([*argv, *windows, "--label-ids", "--workers", "0", "--no-progress"]) == 0
    expected = sorted(p.relative_to(tested) for p in tested.rglob("*.png"))
    assert len(expected) == 3
    assert sorted(p.relative_to(predicted) for p in predicted.rglob("*.png")) == expected
    for rel in expected:
        assert np.array_equal(_read(predicted / rel), _read(tested / rel)), rel


def test_predict_never_overwrites_without_flag(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _image(tmp_path / "in" / "x.png", (30, 40, 3), seed=4)
    out = tmp_path / "out"
    argv = ["predict", str(run_dir), str(tmp_path / "in"), "-o", str(out), "--no-progress"]
    out.mkdir()
    (out / "x_overlay.png").write_bytes(b"mine")
    assert main([*argv, "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dida predict: error:") and "x_overlay.png: exists already" in err
    assert "\n" not in err and "--overwrite" in err
    assert (out / "x_overlay.png").read_bytes() == b"mine"
    assert not (out / "x_trainIds.png").exists()  # refused before anything was written
    assert main([*argv, "--workers", "0", "--overwrite"]) == 0
    assert _read(out / "x_overlay.png").shape == (30, 40, 3)
    assert not list(out.glob(".*tmp*"))  # no temporary files left


def test_predict_errors(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bad.png").write_bytes(b"nope")
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "out")
    cases = [
        ([str(run_dir), str(tmp_path / "bad.png")], "nothing could be processed"),
        ([str(run_dir), str(tmp_path / "missing.png")], "missing.png"),
        ([str(run_dir), str(tmp_path / "empty")], "no images or videos"),
        ([str(run_dir), str(tmp_path / "*.tif")], "no images or videos"),
        ([str(run_dir)], "no INPUT given"),
        (["--onnx", str(tmp_path / "bad.png"), str(tmp_path / "bad.png")], "not a loadable ONNX"),
        # an exported model where a checkpoint or input goes (the file need not exist)
        ([str(run_dir), "m.onnx", str(tmp_path / "bad.png")], "m.onnx: an ONNX model goes after"),
        (["m.onnx", str(tmp_path / "bad.png")], "--onnx m.onnx INPUT"),
    ]
    for paths, needle in cases:
        assert main(["predict", *paths, "-o", out, "--no-progress", "--workers", "0"]) == 2, paths
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("dida predict: error:") and needle in err, err


def test_collect_inputs_globs_prefixes_and_earlier_outputs(tmp_path: Path) -> None:
    inputs = ("a/1.png", "a/sub/2.jpg", "a/notes.txt", "a/x_overlay.png", "b/1.png")
    outputs = ("a/out/old_overlay.png", "a/out/clip/000001_trainIds.png", "a/out/mine.png")
    for rel in inputs + outputs:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    out = tmp_path / "a" / "out"
    single = collect_inputs([str(tmp_path / "a")], skip=lambda p: is_output(p, out))
    # earlier outputs in the output folder are left out, anything else is an input
    assert [e.rel.as_posix() for e in single] == [
        "1.png",
        "out/mine.png",
        "sub/2.jpg",
        "x_overlay.png",
    ]
    several = collect_inputs([str(tmp_path / "a" / "sub"), str(tmp_path / "b" / "*.png")])
    assert [e.rel.as_posix() for e in several] == ["sub/2.jpg", "b/1.png"]
    glob = collect_inputs([str(tmp_path / "**" / "2.jpg"), str(tmp_path / "a" / "sub" / "2.jpg")])
    assert [e.rel.as_posix() for e in glob] == [f"{tmp_path.name}/a/sub/2.jpg"]  # taken once
