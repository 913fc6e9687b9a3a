"""Every command that writes a file the user names: an existing output is refused unless
--overwrite, output == input is refused, the format follows the extension, writes go through a
temporary file, and write failures (read-only, not a folder, disk full) are one line; outputs of
`dida test` and `dida demo` are checked before the evaluation runs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from io_helpers import fill_disk, mounted_tmpfs
from test_cli_test import make_run

from dida.cli.main import main
from dida.engine.bank_io import read_bank_file


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("outputs_run"))


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- dida weights convert ----------------------------------------------------------------------


def test_weights_convert_never_replaces_by_accident(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    ckpt = run_dir / "latest.pth"
    before = ckpt.read_bytes()
    assert main(["weights", "convert", str(ckpt), str(ckpt), "--overwrite"]) == 2
    assert "is the input" in _error(capsys) and ckpt.read_bytes() == before
    out = tmp_path / "w.safetensors"
    assert main(["weights", "convert", str(ckpt), str(out)]) == 0
    first = out.read_bytes()
    capsys.readouterr()
    assert main(["weights", "convert", str(ckpt), str(out)]) == 2
    assert "exists; pass --overwrite" in _error(capsys)
    assert main(["weights", "convert", str(ckpt), str(tmp_path / "w.npz")]) == 2
    assert "must end in .safetensors or .pth or .pt" in _error(capsys)
    (tmp_path / "file").write_text("x")
    assert main(["weights", "convert", str(ckpt), str(tmp_path / "file" / "w.pth")]) == 2
    assert "is a file, not a folder" in _error(capsys)
    fill_disk(monkeypatch)
    assert main(["weights", "convert", str(ckpt), str(out), "--overwrite"]) == 2
    assert _error(capsys) == f"dida weights: error: {out}: cannot write weights file: no space " \
                             "left on device"  # fmt: skip
    assert out.read_bytes() == first and sorted(p.name for p in tmp_path.iterdir()) == [
        "file", "w.safetensors"]  # fmt: skip


def test_weights_convert_on_a_read_only_file_system(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with mounted_tmpfs(tmp_path / "ro", "ro") as ro:
        assert main(["weights", "convert", str(run_dir / "latest.pth"), str(ro / "w.pth")]) == 2
        assert _error(capsys).endswith("read-only file system")


# --- dida bank ---------------------------------------------------------------------------------


def _write_pair(folder: Path, k: int = 6) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "f_buffer_s.npz", np.arange(k * 4, dtype=np.float32).reshape(k, 4))
    np.savez(folder / "l_buffer_s.npz", np.arange(k) % 3)


def test_bank_import_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "cache"
    _write_pair(src)
    before = _snapshot(src)
    for out in (src / "l_buffer_s.npz", tmp_path / "out.npz"):
        assert main(["bank", "import", str(src), "-o", str(out), "--overwrite"]) == 2
        assert "must end in .pt or .pth or .safetensors" in _error(capsys)
    assert main(["bank", "import", str(src / "f_buffer_s.npz"), "-o", str(src / "l_buffer_s.npz"),
                 "--overwrite"]) == 2  # fmt: skip
    assert _snapshot(src) == before
    capsys.readouterr()
    bank = tmp_path / "bank.pt"
    assert main(["bank", "import", str(src), "-o", str(bank)]) == 0
    good = bank.read_bytes()
    capsys.readouterr()
    assert main(["bank", "import", str(src), "-o", str(bank)]) == 2
    assert "bank.pt: exists; pass --overwrite" in _error(capsys)
    fill_disk(monkeypatch)
    assert main(["bank", "import", str(src), "-o", str(bank), "--overwrite"]) == 2
    assert _error(capsys).endswith("bank.pt: cannot write bank file: no space left on device")
    assert bank.read_bytes() == good  # not a corrupt 4 KB file
    assert read_bank_file(bank)[0].shape == (6, 4)


def test_bank_random_and_show_of_a_training_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "random.safetensors"
    args = ["bank", "random", "-o", str(out), "--size", "10", "--dim", "8", "--classes", "4"]
    assert main(args) == 0
    feats, labels = read_bank_file(out)
    assert feats.shape == (10, 8) and torch.allclose(feats.norm(dim=1), torch.ones(10))
    assert labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    ckpt = tmp_path / "latest.pth"
    bank = {"feats": torch.randn(5, 8), "labels": torch.tensor([0, 1, 1, 2, 0]),
            "count": torch.tensor(3)}  # fmt: skip
    torch.save({"format": "dida", "iteration": 7, "method": {"bank": bank}}, ckpt)
    capsys.readouterr()
    assert main(["bank", "show", str(ckpt), "--num-classes", "4"]) == 0
    text = capsys.readouterr().out
    assert "entries: 3  dim: 8" in text and "missing classes: 2 (building), 3 (wall)" in text
    torch.save({"format": "dida", "config": {"method": {"name": "daformer"}}}, ckpt)
    assert main(["bank", "show", str(ckpt)]) == 2
    assert "training checkpoint without an instance bank (daformer)" in _error(capsys)
    (tmp_path / "notes.pt").write_text("some text")
    assert main(["bank", "show", str(tmp_path / "notes.pt")]) == 2
    assert "not a checkpoint" in _error(capsys)


# --- dida test ---------------------------------------------------------------------------------


def test_test_outputs_are_checked_before_the_evaluation(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import dida.eval.evaluate

    def no_evaluation(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the evaluation ran before the outputs were checked")

    (tmp_path / "file").write_text("x")
    existing = tmp_path / "res.json"
    existing.write_text("{}")
    with monkeypatch.context() as patch:
        patch.setattr(dida.eval.evaluate, "evaluate", no_evaluation)
        base = ["test", str(run_dir), "--no-progress"]
        assert main([*base, "--out", str(existing)]) == 2
        assert "res.json: exists; pass --overwrite" in _error(capsys)
        assert main([*base, "--out", str(tmp_path / "r.txt")]) == 2
        assert "must end in .json" in _error(capsys)
        assert main([*base, "--show-dir", str(tmp_path / "file")]) == 2
        assert "--show-dir folder is a file, not a folder" in _error(capsys)
        assert main([*base, "--out", str(tmp_path / "file" / "r.json")]) == 2
        assert "is a file, not a folder" in _error(capsys)
        with mounted_tmpfs(tmp_path / "ro", "ro") as ro:
            assert main([*base, "--show-dir", str(ro / "preds")]) == 2
            assert _error(capsys).endswith("read-only file system")
    assert existing.read_text() == "{}"


def test_results_json_is_written_atomically(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    out = tmp_path / "res.json"
    assert main(["test", str(run_dir), "--no-progress", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("mIoU ") and "| road" not in text  # --quiet: no per-class table
    good = out.read_text()
    fill_disk(monkeypatch)
    args = ["test", str(run_dir), "--no-progress", "--out", str(out), "--overwrite", "--quiet"]
    assert main(args) == 2
    assert _error(capsys).endswith("res.json: cannot write results file: no space left on device")
    assert out.read_text() == good and json.loads(good)["mIoU"] >= 0


def test_aug_test_flip_and_scales(run_dir: Path, tmp_path: Path) -> None:
    plain, aug = tmp_path / "plain.json", tmp_path / "aug.json"
    base = ["test", str(run_dir), "--no-progress", "--quiet"]
    assert main([*base, "--out", str(plain)]) == 0
    assert main([*base, "--out", str(aug), "--aug-test", "--aug-ratios", "0.75", "1.0"]) == 0
    p, a = json.loads(plain.read_text()), json.loads(aug.read_text())
    assert a["aug_test"] == [0.75, 1.0] and p["aug_test"] is None
    assert a["num_images"] == p["num_images"] and 0.0 <= a["mIoU"] <= 1.0


def test_augmented_prediction_is_the_mean_of_its_views() -> None:
    from dida.eval.evaluate import predict

    class Shift(torch.nn.Module):  # logits = the image's first 3 channels, as 3 "classes"
        def forward(self, x: torch.Tensor):  # noqa: ANN201
            return x[:, :3], None

    img = torch.randn(1, 3, 8, 12)
    model = Shift().eval()
    probs = predict(model, img, (8, 12), flip=True)
    assert torch.allclose(probs, predict(model, img, (8, 12)).softmax(1), atol=1e-6)
    both = predict(model, img, (8, 12), aug_ratios=[1.0, 0.5])
    half = torch.nn.functional.interpolate(img, size=(4, 6), mode="bilinear", align_corners=False)
    expected = (img.softmax(1) + predict(model, half, (8, 12)).softmax(1)) / 2
    assert torch.allclose(both, expected, atol=1e-6)


# --- dida demo ---------------------------------------------------------------------------------


def _image(path: Path, h: int, w: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), image)
    return path


def test_demo_outputs(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import dida.eval.evaluate

    common = ["--config", str(run_dir / "tiny.json"), "--checkpoint", str(run_dir / "latest.pth")]
    folder = tmp_path / "in"
    _image(folder / "a.png", 40, 60)
    _image(folder / "a.jpg", 40, 60, seed=1)
    assert main(["demo", str(folder), *common]) == 0
    outputs = sorted(p.name for p in folder.glob("*_pred.png"))
    assert outputs == ["a_jpg_pred.png", "a_png_pred.png"]  # two inputs, two outputs
    first = (folder / "a_png_pred.png").read_bytes()
    capsys.readouterr()
    assert main(["demo", str(folder), *common]) == 2
    assert "a_jpg_pred.png and 1 more: exists; pass --overwrite" in _error(capsys)
    assert (folder / "a_png_pred.png").read_bytes() == first
    assert main(["demo", str(folder), *common, "--overwrite"]) == 0
    capsys.readouterr()
    (tmp_path / "file").write_text("x")
    with monkeypatch.context() as patch:  # refused before the model is even loaded
        patch.setattr(dida.eval.evaluate, "load_segmentor", None)
        assert main(["demo", str(folder / "a.png"), *common, "--out", str(tmp_path / "file")]) == 2
        assert "--out folder is a file, not a folder" in _error(capsys)
    thin = _image(tmp_path / "thin" / "strip.png", 2, 5000)
    assert main(["demo", str(thin), *common]) == 2
    err = _error(capsys)
    assert "5000x2 image is too elongated" in err and "strip.png" in err
