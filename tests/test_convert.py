"""Tests for the dataset converters (`dida convert`): mappings, stats JSON, errors, no overwrite."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from dida.cli.main import main
from dida.data import synthetic
from dida.data.labels import CITYSCAPES_ID_TO_TRAINID, SYNTHIA_ID_TO_TRAINID

REPO = Path(__file__).resolve().parents[1]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _assert_untouched(before: dict[str, bytes]) -> None:
    for path, data in before.items():
        assert Path(path).is_file(), f"{path} was removed"
        assert Path(path).read_bytes() == data, f"{path} was overwritten"


def _run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = main(["convert", *argv])
    return code, capsys.readouterr().err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1, err
    return lines[0]


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.array(image)


def test_gta_mapping_and_stats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    ids = np.tile(np.arange(40, dtype=np.uint8), (6, 1))  # every labelId 0..39, mapped or not
    synthetic.write_gta_sample("data/gta", "00001", np.zeros((6, 40, 3), np.uint8), ids * 0)
    label = Image.fromarray(ids, mode="P")
    label.putpalette([0] * 768)
    label.save("data/gta/labels/00001.png")  # overwrite the indices with all ids
    synthetic.make_gta("data/gta2", 2, size=(20, 30), seed=3)
    assert _run_cli(capsys, "gta", "data/gta", "--nproc", "1")[0] == 0
    out = _read(Path("data/gta/labels/00001_labelTrainIds.png"))
    expected = np.array([CITYSCAPES_ID_TO_TRAINID.get(i, 255) for i in range(40)], np.uint8)
    np.testing.assert_array_equal(out, np.tile(expected, (6, 1)))
    stats = json.loads(Path("data/gta/sample_class_stats.json").read_text())
    entry = {str(t): 6 for t in range(19)}
    assert stats == [{**entry, "file": "data/gta/labels/00001_labelTrainIds.png"}]


def test_json_structures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    synthetic.make_gta("data/gta", 3, size=(20, 30), seed=1)
    assert _run_cli(capsys, "gta", "data/gta", "-o", "stats")[0] == 0
    stats = json.loads(Path("stats/sample_class_stats.json").read_text())
    as_dict = json.loads(Path("stats/sample_class_stats_dict.json").read_text())
    with_class = json.loads(Path("stats/samples_with_class.json").read_text())
    files = [f"data/gta/labels/{k:05d}_labelTrainIds.png" for k in (1, 2, 3)]
    assert [s["file"] for s in stats] == files
    for sample in stats:
        label = _read(Path(sample["file"]))
        values, numbers = np.unique(label, return_counts=True)
        counts = {str(c): int(n) for c, n in zip(values, numbers, strict=True) if c < 255}
        assert {k: v for k, v in sample.items() if k != "file"} == counts
        assert as_dict[sample["file"]] == counts
        for c, n in counts.items():
            assert [sample["file"], n] in with_class[c]
    assert sum(len(v) for v in with_class.values()) == sum(len(s) - 1 for s in stats)
    assert not Path("data/gta/sample_class_stats.json").exists()


def test_synthia_mapping_16bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    synthetic.make_synthia("data/synthia", 1, size=(4, 30))
    ids = np.tile(np.arange(30, dtype=np.uint16) + 256 * 3, (4, 1))  # high byte set: needs 16 bit
    ids[:, :24] -= 256 * 3
    label = np.stack([np.zeros_like(ids), np.full_like(ids, 999), ids], axis=-1)  # BGR: R last
    cv2.imwrite("data/synthia/GT/LABELS/0000000.png", label)
    assert _run_cli(capsys, "synthia", "data/synthia")[0] == 0
    out = _read(Path("data/synthia/GT/LABELS/0000000_labelTrainIds.png"))
    expected = [SYNTHIA_ID_TO_TRAINID.get(int(i), 255) for i in ids[0]]
    np.testing.assert_array_equal(out[0], expected)
    assert out.shape == (4, 30)


def test_cityscapes_labelids_and_polygons(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    truth = {}
    for k, (split, poly) in enumerate([("train", True), ("train", False), ("val", True)]):
        image, train_ids = synthetic.random_sample(rng, (24, 40), (0, 2, 11, 13, 18), grid=5)
        synthetic.write_cityscapes_sample("data/cs", split, "ulm", 0, k, image, train_ids, poly)
        truth[(split, k)] = train_ids
    ids = np.arange(34, dtype=np.uint8)[None].repeat(2, 0)
    synthetic.write_cityscapes_sample("data/cs", "train", "ulm", 1, 0, ids[..., None].repeat(3, 2),
                                      ids * 0)  # fmt: skip
    cv2.imwrite("data/cs/gtFine/train/ulm/ulm_000001_000000_gtFine_labelIds.png", ids)
    assert _run_cli(capsys, "cityscapes", "data/cs")[0] == 0
    for (split, k), train_ids in truth.items():
        out = Path(f"data/cs/gtFine/{split}/ulm/ulm_000000_{k:06d}_gtFine_labelTrainIds.png")
        np.testing.assert_array_equal(_read(out), train_ids)
    out = _read(Path("data/cs/gtFine/train/ulm/ulm_000001_000000_gtFine_labelTrainIds.png"))
    np.testing.assert_array_equal(out[0], [CITYSCAPES_ID_TO_TRAINID.get(i, 255) for i in range(34)])
    stats = json.loads(Path("data/cs/sample_class_stats.json").read_text())
    assert len(stats) == 3 and all("/train/" in s["file"] for s in stats)  # train split only
    assert Path("data/cs/train.txt").read_text().splitlines() == [
        "ulm/ulm_000000_000000", "ulm/ulm_000000_000001", "ulm/ulm_000001_000000"
    ]  # fmt: skip
    assert Path("data/cs/val.txt").read_text() == "ulm/ulm_000000_000002\n"
    assert Path("data/cs/test.txt").read_text() == ""


def test_nproc2_byte_equal_and_rerun(tmp_path: Path, monkeypatch, capsys) -> None:
    synthetic.make_synthia(tmp_path / "a/data/synthia", 12, size=(16, 24), seed=5)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    monkeypatch.chdir(tmp_path / "a")
    assert _run_cli(capsys, "synthia", "data/synthia", "--nproc", "1")[0] == 0
    monkeypatch.chdir(tmp_path / "b")
    assert _run_cli(capsys, "synthia", "data/synthia", "--nproc", "2")[0] == 0
    snap_a = {k[len(str(tmp_path / "a")) :]: v for k, v in _snapshot(tmp_path / "a").items()}
    snap_b = {k[len(str(tmp_path / "b")) :]: v for k, v in _snapshot(tmp_path / "b").items()}
    assert snap_a == snap_b and len(snap_a) == 12 * 3 + 3
    before = _snapshot(tmp_path / "b")
    assert _run_cli(capsys, "synthia", "data/synthia", "--nproc", "2")[0] == 0  # rerun is safe
    _assert_untouched(before)
    assert _snapshot(tmp_path / "b").keys() == before.keys()


def _gta(tmp_path: Path, monkeypatch) -> dict[str, bytes]:
    monkeypatch.chdir(tmp_path)
    synthetic.make_gta("data/gta", 3, size=(16, 24))
    return _snapshot(tmp_path)


def test_error_missing_root(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = _run_cli(capsys, "gta", "data/nothing")
    assert code != 0 and "data/nothing" in _error_line(err)


def test_error_label_without_image(tmp_path: Path, monkeypatch, capsys) -> None:
    before = _gta(tmp_path, monkeypatch)
    Path("data/gta/images/00002.png").unlink()
    del before[str(tmp_path / "data/gta/images/00002.png")]
    code, err = _run_cli(capsys, "gta", "data/gta")
    assert code != 0 and "data/gta/labels/00002.png" in _error_line(err)
    _assert_untouched(before)


def test_error_8bit_synthia(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    synthetic.make_synthia("data/synthia", 2, size=(8, 8))
    cv2.imwrite("data/synthia/GT/LABELS/0000001.png", np.zeros((8, 8, 3), np.uint8))
    before = _snapshot(tmp_path)
    code, err = _run_cli(capsys, "synthia", "data/synthia", "--nproc", "1")
    line = _error_line(err)
    assert code != 0 and "data/synthia/GT/LABELS/0000001.png" in line and "16-bit" in line
    _assert_untouched(before)


@pytest.mark.parametrize("kind", ["gta", "synthia"])
def test_error_corrupt_png(tmp_path: Path, monkeypatch, capsys, kind: str) -> None:
    monkeypatch.chdir(tmp_path)
    if kind == "gta":
        bad = synthetic.make_gta("data/x", 2, size=(8, 8))[1]
    else:
        bad = synthetic.make_synthia("data/x", 2, size=(8, 8))[1]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    before = _snapshot(tmp_path)
    code, err = _run_cli(capsys, kind, "data/x", "--nproc", "2")
    assert code != 0 and str(bad) in _error_line(err)
    _assert_untouched(before)


def test_error_unwritable_output(tmp_path: Path, monkeypatch, capsys) -> None:
    before = _gta(tmp_path, monkeypatch)
    Path("blocker").write_text("user file")
    before[str(tmp_path / "blocker")] = b"user file"
    code, err = _run_cli(capsys, "gta", "data/gta", "-o", "blocker/stats")
    assert code != 0 and "blocker/stats" in _error_line(err)
    _assert_untouched(before)
    assert not Path("data/gta/labels/00001_labelTrainIds.png").exists()


def test_error_existing_output_differs(tmp_path: Path, monkeypatch, capsys) -> None:
    _gta(tmp_path, monkeypatch)
    mine = Path("data/gta/labels/00002_labelTrainIds.png")
    cv2.imwrite(str(mine), np.full((16, 24), 7, np.uint8))
    before = _snapshot(tmp_path)
    code, err = _run_cli(capsys, "gta", "data/gta", "--nproc", "1")
    assert code != 0 and str(mine) in _error_line(err)
    _assert_untouched(before)


def test_wrapper_script(tmp_path: Path) -> None:
    synthetic.make_gta(tmp_path / "data/gta", 2, size=(8, 8))
    script = REPO / "tools/convert_datasets/gta.py"
    done = subprocess.run(
        [sys.executable, str(script), "data/gta", "--nproc", "1"], cwd=tmp_path, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    stats = json.loads((tmp_path / "data/gta/sample_class_stats.json").read_text())
    assert stats[0]["file"] == "data/gta/labels/00001_labelTrainIds.png"
    bad = subprocess.run(
        [sys.executable, str(script), "missing"], cwd=tmp_path, capture_output=True
    )
    assert bad.returncode == 2 and b"missing" in bad.stderr


def test_gta_size_mismatch_is_reported_and_training_resizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """GTA5 has image/label pairs of different sizes: reported, and loading resizes the label."""
    from dida.config import DatasetConfig
    from dida.data.datasets import build_dataset

    monkeypatch.chdir(tmp_path)
    synthetic.make_gta("data/gta", 3, size=(20, 30), seed=4)
    ids = np.full((10, 15), 26, np.uint8)  # car, at half the image size
    ids[:, :5] = 7  # road on the left third
    label = Image.fromarray(ids, mode="P")
    label.putpalette([0] * 768)
    label.save("data/gta/labels/00002.png")
    code = main(["convert", "gta", "data/gta", "--nproc", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "1 image/label pairs differ in size" in out
    assert "data/gta/labels/00002.png: image 30×20, label 15×10" in out
    assert _read(Path("data/gta/labels/00002_labelTrainIds.png")).shape == (10, 15)  # unchanged
    dataset = build_dataset(DatasetConfig(kind="gta", root="data/gta"))
    assert len(dataset.size_mismatches()) == 1 and "00002" in dataset.size_mismatches()[0]
    image, train_ids = dataset.load(1)
    assert image.shape[:2] == train_ids.shape == (20, 30)
    assert (train_ids[:, :10] == 0).all() and (train_ids[:, 10:] == 13).all()  # nearest


def _folder(root: Path, labels: dict[str, np.ndarray], palette: bool = False) -> None:
    for rel, ids in labels.items():
        path = root / "labels" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(ids, mode="P" if palette else "L")
        if palette:
            image.putpalette([v for i in range(256) for v in (i, 255 - i, 9)])
        image.save(path)


def test_folder_statistics(tmp_path: Path, monkeypatch, capsys) -> None:
    """`dida convert folder`: the three statistics files of labels that are class indices
    already (grayscale or palette), nothing converted, the same for any --nproc, rerun-safe."""
    monkeypatch.chdir(tmp_path)
    a = np.array([[0, 0, 1, 255], [2, 2, 2, 1]], np.uint8)
    b = np.array([[3, 3, 3, 3], [255, 255, 0, 0]], np.uint8)
    _folder(Path("a/data/mine"), {"x/one.png": a, "two.png": b}, palette=True)
    _folder(Path("b/data/mine"), {"x/one.png": a, "two.png": b})
    monkeypatch.chdir(tmp_path / "a")
    before = _snapshot(Path("data/mine"))
    assert _run_cli(capsys, "folder", "data/mine", "--gt-dir", "labels", "--num-classes", "4",
                    "--nproc", "1")[0] == 0  # fmt: skip
    _assert_untouched(before)  # the labels are left as they are, and no label is written
    assert sorted(p.name for p in Path("data/mine").rglob("*.png")) == ["one.png", "two.png"]
    stats = json.loads(Path("data/mine/sample_class_stats.json").read_text())
    assert stats == [  # sorted by path, ignored pixels not counted
        {"0": 2, "3": 4, "file": "data/mine/labels/two.png"},
        {"0": 2, "1": 2, "2": 3, "file": "data/mine/labels/x/one.png"},
    ]
    with_class = json.loads(Path("data/mine/samples_with_class.json").read_text())
    assert with_class["3"] == [["data/mine/labels/two.png", 4]] and set(with_class) == set("0123")
    monkeypatch.chdir(tmp_path / "b")  # grayscale copies, two processes: the same files
    assert _run_cli(capsys, "folder", "data/mine", "--gt-dir", "labels", "--num-classes", "4",
                    "--nproc", "2")[0] == 0  # fmt: skip
    for name in ("sample_class_stats.json", "sample_class_stats_dict.json",
                 "samples_with_class.json"):  # fmt: skip
        assert (tmp_path / "a/data/mine" / name).read_text() == Path("data/mine", name).read_text()
    before = _snapshot(Path("data/mine"))
    argv = ("folder", "data/mine", "--gt-dir", "labels", "--num-classes", "4")
    assert _run_cli(capsys, *argv)[0] == 0  # rerun is safe
    _assert_untouched(before)


def test_folder_statistics_errors(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    ok = np.array([[0, 1], [255, 1]], np.uint8)
    _folder(Path("mine"), {"a.png": ok, "b.png": np.array([[0, 9], [1, 1]], np.uint8)})
    code, err = _run_cli(capsys, "folder", "mine", "--num-classes", "2")
    assert code == 2 and "folder needs --gt-dir and --num-classes" in _error_line(err)
    code, err = _run_cli(capsys, "gta", "mine", "--num-classes", "2")
    assert code == 2 and "--num-classes is for folder" in _error_line(err)
    code, err = _run_cli(capsys, "folder", "mine", "--gt-dir", "labels", "--num-classes", "2")
    assert code == 2 and "mine/labels/b.png: has label values 9;" in _error_line(err)
    assert not Path("mine/sample_class_stats.json").exists()  # nothing written on an error
    _folder(Path("mine"), {"b.png": ok, "sub/a.png": ok})
    code, err = _run_cli(capsys, "folder", "mine", "--gt-dir", "labels", "--num-classes", "2")
    assert code == 2 and "names must be unique" in _error_line(err)
    code, err = _run_cli(capsys, "folder", "mine", "--gt-dir", "labels", "--num-classes", "2",
                         "--seg-suffix", ".tif")  # fmt: skip
    assert code == 2 and "no labels (*.tif)" in _error_line(err)
