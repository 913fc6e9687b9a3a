"""End-to-end tests of `dida test` and `sh test.sh` on a tiny random model and synthetic Cityscapes.

Also the correctness anchor: `--format-only` predictions scored by the official cityscapesscripts
pixel-level evaluation agree with our mIoU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dida.cli.main import main
from dida.cli.test import trainid_to_labelid
from dida.config import config_to_dict, load_config, save_config
from dida.data.labels import CITYSCAPES_ID_TO_TRAINID, CLASSES, lookup_table
from dida.data.synthetic import make_cityscapes
from dida.eval.metrics import SegEvaluator
from dida.models import segmentor_from_config

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.variant=mit_b0",
    "model.embed_dim=32",
    "model.pretrained=null",
    "eval.scale=[128,64]",
    "eval.num_workers=0",
    "train.device=cpu",
]


def make_val_data(root: Path, n: int = 3, size: tuple[int, int] = (64, 128)) -> Path:
    """Synthetic Cityscapes val split with labelIds and converted labelTrainIds."""
    table = lookup_table(CITYSCAPES_ID_TO_TRAINID, 256)
    classes = (0, 1, 2, 8, 10, 11, 13)
    for path in make_cityscapes(root, n, size=size, splits=("val",), classes=classes):
        label_ids = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        out = str(path).replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png")
        cv2.imwrite(out, table[label_ids])
    return root


def make_run(tmp: Path, variant: str = "mit_b0", seed: int = 0) -> Path:
    """A run directory with `<name>.json` and `latest.pth` of a tiny random segmentor."""
    data = make_val_data(tmp / "cityscapes")
    overrides = [*TINY, f"model.variant={variant}", f"data.val.root={data}", "name=tiny"]
    cfg = load_config(None, overrides)
    torch.manual_seed(seed)
    model = segmentor_from_config(cfg.model)
    with torch.no_grad():  # spread the random logits so that several classes get predicted
        model.head.conv_seg.weight.mul_(50.0)
    run_dir = tmp / "work_dirs" / "local-basic" / "261126_1200_tiny"
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "tiny.json")
    ckpt = {"format": "dida", "config": config_to_dict(cfg), "iteration": 1}
    torch.save({**ckpt, "student": model.state_dict()}, run_dir / "latest.pth")
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"))


def test_dida_test_run_dir_writes_results_and_colour_predictions(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    show = tmp_path / "show"
    out = tmp_path / "res.json"
    args = ["test", str(run_dir), "--show-dir", str(show), "--opacity", "1", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "per class results:" in text and "| aAcc" in text and "| road" in text
    results = json.loads(out.read_text())
    assert 0.0 <= results["mIoU"] <= 1.0 and results["num_images"] == 3
    assert set(results["IoU"]) == set(CLASSES)
    files = sorted(show.rglob("*.png"))
    # mirrors the dataset's relative folders (city) and names
    names = [f"frankfurt/frankfurt_000000_00000{k}_leftImg8bit.png" for k in range(3)]
    assert [f.relative_to(show).as_posix() for f in files] == names
    colour = cv2.imread(str(files[1])).astype(float)
    assert colour.shape == (64, 128, 3)  # original resolution, not the (128, 64) test scale

    # trailing slash accepted; default results path; default opacity 0.5 blends image and colours
    blend_dir = tmp_path / "blend"
    assert main(["test", str(run_dir) + "/", "--show-dir", str(blend_dir), "--no-progress"]) == 0
    assert json.loads((run_dir / "preds" / "results.json").read_text())["mIoU"] == results["mIoU"]
    data_root = Path(json.loads((run_dir / "tiny.json").read_text())["data"]["val"]["root"])
    image = cv2.imread(str(data_root / "leftImg8bit" / "val" / names[1])).astype(float)
    blend = cv2.imread(str(blend_dir / names[1])).astype(float)
    assert np.abs(blend - (0.5 * image + 0.5 * colour)).max() <= 1.0
    assert np.abs(blend - colour).max() > 10


def test_slide_mode(run_dir: Path, tmp_path: Path) -> None:
    outs = [tmp_path / "whole.json", tmp_path / "slide.json"]
    assert main(["test", str(run_dir), "--out", str(outs[0]), "--no-progress"]) == 0
    # one window covering the whole 128x64 image: sliding-window logits equal whole-image logits
    slide = ["--inference", "slide", "--set", "eval.crop_size=[64,128]"]
    assert main(["test", str(run_dir), *slide, "--out", str(outs[1]), "--no-progress"]) == 0
    whole, results = (json.loads(p.read_text()) for p in outs)
    assert whole["mode"] == "whole" and results["mode"] == "slide"
    assert results["checkpoint"].endswith("latest.pth")
    assert results["mIoU"] == pytest.approx(whole["mIoU"])


def _official_eval(preds: list[Path], gts: list[Path], monkeypatch: pytest.MonkeyPatch) -> dict:
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval

    monkeypatch.setattr(cs_eval.args, "evalInstLevelScore", False)  # np.in1d is gone in numpy 2.4
    monkeypatch.setattr(cs_eval.args, "evalPixelAccuracy", False)
    monkeypatch.setattr(cs_eval.args, "JSONOutput", False)
    monkeypatch.setattr(cs_eval.args, "quiet", True)
    return cs_eval.evaluateImgLists([str(p) for p in preds], [str(g) for g in gts], cs_eval.args)


def test_metrics_agree_with_cityscapesscripts_on_crafted_predictions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    gts = make_cityscapes(tmp_path / "cs", 3, size=(48, 80), splits=("val",), seed=3)
    table = lookup_table(CITYSCAPES_ID_TO_TRAINID, 256)
    evaluator = SegEvaluator(19, class_names=CLASSES)
    preds = []
    for gt in gts:
        label = table[cv2.imread(str(gt), cv2.IMREAD_UNCHANGED)].astype(np.int64)
        noise = rng.integers(0, 19, label.shape)
        pred = np.where(rng.random(label.shape) < 0.7, np.where(label == 255, 0, label), noise)
        evaluator.process(torch.from_numpy(pred), torch.from_numpy(label))
        preds.append(tmp_path / "pred" / gt.name.replace("_gtFine", ""))
        preds[-1].parent.mkdir(exist_ok=True)
        cv2.imwrite(str(preds[-1]), trainid_to_labelid(pred))
    ours = evaluator.compute()
    official = _official_eval(preds, gts, monkeypatch)
    assert ours["mIoU"] > 0.15
    assert ours["mIoU"] == pytest.approx(official["averageScoreClasses"], abs=1e-9)


def test_format_only_agrees_with_cityscapesscripts(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fmt = tmp_path / "fmt"
    out = tmp_path / "r.json"
    # the CONFIG CHECKPOINT form
    config, ckpt = str(run_dir / "tiny.json"), str(run_dir / "latest.pth")
    assert main(["test", config, ckpt, "--format-only", "--out-dir", str(fmt), "--device", "cpu",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    ours = json.loads(out.read_text())
    preds = sorted(fmt.rglob("*_labelIds.png"))
    cfg = json.loads((run_dir / "tiny.json").read_text())
    gts = sorted(Path(cfg["data"]["val"]["root"]).rglob("*_gtFine_labelIds.png"))
    assert len(preds) == len(gts) == 3
    assert [p.name for p in preds] == [g.name.replace("_gtFine", "") for g in gts]
    official = _official_eval(preds, gts, monkeypatch)
    assert ours["mIoU"] == pytest.approx(official["averageScoreClasses"], abs=0.01)
    assert ours["mIoU"] == pytest.approx(official["averageScoreClasses"], abs=1e-9)  # exact
    assert len({v for v in ours["IoU"].values() if v is not None}) > 1  # a non-trivial prediction
    for name, value in ours["IoU"].items():
        ref = official["classScores"][name]
        assert (value is None and np.isnan(ref)) or value == pytest.approx(ref)


def test_trainid_to_labelid() -> None:
    pred = np.array([[0, 18, 255], [10, 13, 5]], dtype=np.int64)
    assert trainid_to_labelid(pred).tolist() == [[7, 33, 0], [23, 26, 17]]


def test_errors_are_one_line_with_nonzero_exit(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = make_run(tmp_path / "other", variant="mit_b1")
    cases = [
        # checkpoint of another model (mit_b1 weights, mit_b0 config)
        ["test", str(run_dir / "tiny.json"), str(other / "latest.pth")],
        ["test", str(run_dir), str(tmp_path / "missing.pth")],
        ["test", str(tmp_path / "nope")],
        ["test", str(run_dir / "tiny.json")],
        ["test", str(run_dir), "--set", "data.val.root=/does/not/exist"],
        ["test", str(run_dir), "--format-only"],
        ["test", str(run_dir), "--set", "eval.mode=tta"],
        ["test", str(run_dir), "--test-set"],  # the synthetic data has no test split
        ["test", str(run_dir), "--set", "model.nope=1"],
    ]
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    cases.append(["test", str(run_dir / "tiny.json"), str(corrupt)])
    errors = []
    for argv in cases:
        assert main([*argv, "--no-progress"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("dida test: error:") and "\n" not in err, err
        errors.append(err)
    assert "mit_b1" in errors[0] and "missing.pth" in errors[1] and "corrupt.pth" in errors[-1]


def test_test_sh_under_posix_sh(run_dir: Path, tmp_path: Path) -> None:
    sh = shutil.which("dash") or "sh"
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("preds"))
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([sh, str(REPO / "test.sh"), f"{run}/"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    log = (run / "preds" / "pre_log.out").read_text()
    assert "per class results:" in log and "Summary:" in log
    summary = proc.stdout.split("Summary:\n", 1)[1].splitlines()  # the whole table, both borders
    assert len(summary) == 5 and summary[0] == summary[2] == summary[4] and summary[0][0] == "+"
    assert summary[1].startswith("| aAcc")
    assert (run / "preds" / "results.json").is_file()
    assert len(list((run / "preds" / "frankfurt").glob("*_leftImg8bit.png"))) == 3
    bad = subprocess.run([sh, str(REPO / "test.sh"), str(tmp_path / "missing")], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode != 0 and "missing" in bad.stderr
