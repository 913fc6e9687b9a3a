"""Tests for `dida bank init`, `dida bank import` and `dida bank show`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dida.cli.main import main
from dida.engine.bank_io import read_bank_file

CACHE = Path(__file__).resolve().parents[2] / "shared" / "data" / "embedding_cache"


def _write_pair(folder: Path, k: int = 6, labels: np.ndarray | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    feats = np.arange(k * 4, dtype=np.float32).reshape(k, 4)
    np.savez(folder / "f_buffer_s.npz", feats)
    np.savez(folder / "l_buffer_s.npz", np.arange(k) % 3 if labels is None else labels)


def test_import_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_pair(tmp_path / "cache")
    out = tmp_path / "bank.pt"
    assert main(["bank", "import", str(tmp_path / "cache"), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "entries: 6  dim: 4" in text and " 0 road              2" in text
    feats, labels = read_bank_file(out)
    assert torch.equal(labels, torch.arange(6) % 3) and feats.shape == (6, 4)
    assert main(["bank", "show", str(out), "--num-classes", "4"]) == 0
    text = capsys.readouterr().out
    assert "missing classes: 3 (wall)" in text
    norms = np.linalg.norm(np.arange(24, dtype=np.float32).reshape(6, 4), axis=1)
    assert f"min {norms.min():.3f}" in text and f"max {norms.max():.3f}" in text


def test_import_safetensors(tmp_path: Path) -> None:
    _write_pair(tmp_path)
    out = tmp_path / "bank.safetensors"
    assert main(["bank", "import", str(tmp_path / "f_buffer_s.npz"), "-o", str(out)]) == 0
    assert read_bank_file(out)[0].shape == (6, 4)


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bank", "show", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.pt: bank file not found" in err
    _write_pair(tmp_path / "bad", labels=np.arange(5))
    assert main(["bank", "import", str(tmp_path / "bad"), "-o", str(tmp_path / "x.pt")]) == 2
    assert "bad: bank features (6, 4) and labels (5,)" in capsys.readouterr().err
    _write_pair(tmp_path / "ok")
    args = ["bank", "import", str(tmp_path / "ok"), "-o", str(tmp_path / "x.pt"), "--size", "300"]
    assert main(args) == 2
    assert "K=6 entries, config expects 300" in capsys.readouterr().err
    _write_pair(tmp_path / "big", labels=np.array([0, 1, 2, 3, 4, 30]))
    assert main(["bank", "show", str(tmp_path / "big")]) == 2
    assert "labels must lie in [0, 19)" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
    # the folder above bank folders (the original's embedding_cache/) names them
    assert main(["bank", "show", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no f_buffer_s.npz here; bank folders below it: bad, big, ok" in err


@pytest.mark.skipif(not CACHE.is_dir(), reason="shared embedding_cache not available")
def test_show_synthia_cache(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bank", "show", str(CACHE / "synthia_300")]) == 0
    text = capsys.readouterr().out
    assert "entries: 300  dim: 256" in text
    assert "missing classes: 9 (terrain), 14 (truck), 16 (train)" in text


def test_bank_init_from_a_checkpoint(tiny_uda_root: Path, tmp_path: Path) -> None:
    from conftest import tiny_overrides

    from dida.config import config_to_dict, load_config
    from dida.experiments import find_experiment
    from dida.models import segmentor_from_config

    cfg = load_config(find_experiment("7").path, tiny_overrides(tiny_uda_root, "dida"))
    model = segmentor_from_config(cfg.model)
    ckpt = tmp_path / "model.pth"
    torch.save({"format": "dida", "config": config_to_dict(cfg), "student": model.state_dict()},
               ckpt)  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(config_to_dict(cfg)))
    out = tmp_path / "bank.pt"
    args = ["bank", "init", str(tmp_path / "cfg.json"), str(ckpt), "-o", str(out),
            "--set", "method.bank.size=8", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    feats, labels = read_bank_file(out)
    assert feats.shape == (8, cfg.model.embed_dim)
    counts = torch.bincount(labels, minlength=19)
    assert counts.max() - counts[counts > 0].min() <= 1  # class-balanced
    assert bool((feats >= 0).all())  # class means of post-ReLU features
