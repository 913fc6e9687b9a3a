"""The seed's remaining commands as thin wrappers: `sh run_config.sh GPUID [CONFIG] [--set ...]`
and `python create_buffer.py [-o PATH] [--size K] [--dim D] [--classes C]`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from dida.config import load_config, save_config
from dida.engine.bank_io import read_bank_file
from dida.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def _sh(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(REPO / "run_config.sh"), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_run_config_sh_trains_a_config_file(tiny_uda_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "my.json"
    save_config(load_config(None, tiny_overrides(tiny_uda_root, "daformer", 2)), config)
    out = _sh(["0", str(config), "--work-dir", str(tmp_path / "run"), "--set",
               "train.max_iters=3"], tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"training {config} on GPU 0" in out.stdout
    ckpt = load_checkpoint(tmp_path / "run" / "latest.pth")
    assert ckpt["iteration"] == 3 and ckpt["config"]["method"]["name"] == "daformer"


def test_run_config_sh_defaults_to_experiment_7(tiny_uda_root: Path, tmp_path: Path) -> None:
    sets = [a for item in tiny_overrides(tiny_uda_root, "daformer", 2) for a in ("--set", item)]
    out = _sh(["0", "--work-dir", str(tmp_path / "run"), *sets], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "training experiment 7 on GPU 0" in out.stdout
    assert load_checkpoint(tmp_path / "run" / "latest.pth")["config"]["exp"] == "7"


def test_run_config_sh_errors(tmp_path: Path) -> None:
    out = _sh([], tmp_path)
    assert out.returncode == 2 and "usage: sh run_config.sh GPUID [CONFIG]" in out.stderr
    out = _sh(["0", str(tmp_path / "missing.yaml")], tmp_path)
    assert out.returncode == 2 and "missing.yaml: config file not found" in out.stderr


def test_create_buffer_py(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "create_buffer.py"), *args],
                              cwd=tmp_path, env=ENV, capture_output=True, text=True,
                              timeout=120)  # fmt: skip

    out = run()
    assert out.returncode == 0, out.stderr
    feats, labels = read_bank_file(tmp_path / "random_bank.pt")
    assert feats.shape == (300, 256) and torch.allclose(feats.norm(dim=1), torch.ones(300))
    assert torch.equal(labels, torch.arange(300) % 19)
    out = run("-o", "b.safetensors", "--size", "12", "--dim", "8", "--classes", "5")
    assert out.returncode == 0, out.stderr
    feats, labels = read_bank_file(tmp_path / "b.safetensors")
    assert feats.shape == (12, 8) and labels.max() == 4
    again = run("-o", "b.safetensors")
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
    assert run("-o", "b.safetensors", "--overwrite", "--size", "3").returncode == 0
    assert read_bank_file(tmp_path / "b.safetensors")[0].shape == (3, 256)


def test_image_demo_runs_from_any_folder(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "image_demo", "--help"], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "usage: python -m image_demo" in out.stdout, out.stderr


def test_shipped_experiments_resolve_paths_in_the_project_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dida.config import project_root
    from dida.experiments import find_experiment

    monkeypatch.chdir(tmp_path)
    assert project_root() == REPO  # a source checkout
    cfg = load_config(find_experiment("quickstart").path)
    assert cfg.data.source.root == str(REPO / "data" / "synthetic" / "gta")
    assert cfg.work_root == str(REPO / "work_dirs")
    cfg = load_config(find_experiment("7").path, ["model.pretrained=nvidia/mit-b5"])
    assert cfg.model.pretrained == "nvidia/mit-b5"  # a hub id stays a hub id
    # the user's own paths stay relative to the working folder, and become absolute in a run
    own = load_config(None, ["data.val.root=mydata", "method.bank.init_path=builtin:synthia_300"])
    assert own.data.val.root == "mydata"
    from dida.config import resolve_paths

    resolved = resolve_paths(own, Path.cwd())  # what `dida train` saves in the run's config
    assert resolved.data.val.root == str(tmp_path / "mydata")
    assert resolved.method.bank.init_path == "builtin:synthia_300"
