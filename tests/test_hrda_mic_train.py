"""HRDA and MIC in the training loop: the shipped experiments (published settings, `dida
experiments`, `sh run_exp.sh ID`), DIDA+MIC(HRDA) trained on tiny crops with the periodic batched
sliding-window evaluation and `dida test`, exact resume with HRDA and MIC on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from dida.cli.main import main
from dida.config import load_config
from dida.engine.checkpoint import load_checkpoint
from dida.engine.train import TrainingInterrupted, train
from dida.experiments import find_experiment, list_experiments

HRDA_EXPERIMENTS = ("hrda-gta", "hrda-syn", "mic-gta", "mic-syn", "dida-hrda-gta",
                    "dida-hrda-syn", "dida-mic-gta", "dida-mic-syn")  # fmt: skip


def hrda_tiny_overrides(root: Path, method: str, iters: int) -> list[str]:
    """`tiny_overrides` for an HRDA experiment: 64² crops, 32² detail crops, 2-4 px margins,
    pseudo-label threshold 0 (weight 1: the random model's MIC loss is not 0)."""
    ignore_rows = ("method.teacher.ignore_top", "method.teacher.ignore_bottom")
    base = [o for o in tiny_overrides(root, method, iters) if not o.startswith(ignore_rows)]
    return [*base, "data.source.kind=gta", "data.crop_size=[64,64]",
            "model.hrda.detail_crop=[32,32]", "model.hrda.attention_embed_dim=8",
            "data.target_pseudo_margins=[2,4,2,2]", "method.mic.block_size=8",
            "eval.crop_size=[64,64]", "eval.stride=[32,32]",
            "method.teacher.pseudo_threshold=0.0"]  # fmt: skip


@pytest.fixture(scope="module")
def shipped() -> dict:
    return {e.exp: e.config for e in list_experiments()}


@pytest.mark.parametrize("exp", HRDA_EXPERIMENTS)
def test_hrda_experiments_have_the_published_settings(exp: str, shipped: dict) -> None:
    cfg = shipped[exp]
    syn = exp.endswith("syn")
    assert cfg.model.variant == "mit_b5" and cfg.model.hrda.enabled
    hrda = cfg.model.hrda
    assert (hrda.lr_scale, hrda.detail_crop, hrda.detail_loss_weight) == (0.5, [512, 512], 0.1)
    assert (hrda.attention, hrda.fd_scale, hrda.full_offset_range) == ("classwise", "lr", False)
    assert cfg.data.source.scale == ([2560, 1520] if syn else [2560, 1440])
    assert cfg.data.source.kind == ("synthia" if syn else "gta")
    assert cfg.data.target.scale == cfg.data.val.scale == [2048, 1024]
    assert cfg.data.crop_size == [1024, 1024] and cfg.data.rcs.min_crop_ratio == 2.0
    assert cfg.data.target_pseudo_margins == [30, 240, 30, 30]
    assert (cfg.method.teacher.ignore_top, cfg.method.teacher.ignore_bottom) == (0, 0)
    assert cfg.eval.mode == "slide" and cfg.eval.batched_slide and cfg.eval.scale == [2048, 1024]
    assert (cfg.eval.crop_size, cfg.eval.stride) == ([1024, 1024], [512, 512])
    assert cfg.train.max_iters == 40000 and cfg.train.eval_interval == 4000
    mic = cfg.method.mic
    assert mic.enabled == ("mic" in exp)
    if mic.enabled:
        assert (mic.mode, mic.ratio, mic.weight, mic.teacher) == ("target_aug", 0.7, 1.0, "shared")
        assert mic.block_size is None  # derived: 64 at full resolution
    assert cfg.method.name == ("dida" if exp.startswith("dida") else "daformer")
    if exp.startswith("dida"):  # the reference preset of experiments 7 / 8, context branch
        ref = shipped["8" if syn else "7"].method
        for group in ("bank", "instance"):
            assert getattr(cfg.method, group) == getattr(ref, group), group
        assert cfg.method.compose.hrda_scale == "lr" and cfg.method.compose.mic_view == "none"
    assert ("16" in cfg.eval.subsets) == syn


def test_mic_daformer_experiment(shipped: dict) -> None:
    cfg, daformer = shipped["mic-daformer-gta"], shipped["7-daformer"]
    assert not cfg.model.hrda.enabled and cfg.method.mic.enabled
    assert cfg.data == daformer.data and cfg.eval == daformer.eval
    assert cfg.method.teacher == daformer.method.teacher


def test_experiments_list_the_new_ids(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiments"]) == 0
    out = capsys.readouterr().out
    for exp in (*HRDA_EXPERIMENTS, "mic-daformer-gta"):
        assert f"\n{exp} " in out


@pytest.mark.slow
def test_dida_mic_hrda_trains_through_run_exp_sh_and_tests(
    tiny_uda_root: Path, tmp_path: Path
) -> None:
    """`sh run_exp.sh dida-mic-gta 0` on tiny crops: the full DIDA+MIC(HRDA) step, the periodic
    batched sliding-window evaluation, then `dida test` of the run."""
    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    overrides = [*hrda_tiny_overrides(tiny_uda_root, "dida", 3), "train.eval_interval=3",
                 "train.debug_interval=2"]  # fmt: skip
    sets = [a for item in overrides for a in ("--set", item)]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["sh", str(repo / "run_exp.sh"), "dida-mic-gta", "0", "--work-dir", str(run), *sets],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "iter 3/3" in (tmp_path / "run_exp_dida-mic-gta.out").read_text()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rec = [r for r in records if r["kind"] == "train"]
    for key in ("src.hr.loss_seg", "mix.hr.loss_seg", "masked.loss_seg", "masked.hr.loss_seg"):
        assert all(key in r for r in train_rec), key
    assert any("instance.loss_in" in r for r in train_rec)  # bank filled online, then L_in
    assert any(r["masked.loss_seg"] > 0 for r in train_rec)
    val = [r for r in records if r["kind"] == "val"]
    assert len(val) == 1 and 0.0 <= val[0]["mIoU"] <= 1.0
    assert len(list((run / "debug").glob("*.png"))) == 4
    ckpt = load_checkpoint(run / "latest.pth")
    assert any(k.startswith("attention_head.") for k in ckpt["student"])
    saved = json.loads((run / "gta2cs_dida_mic_hrda_mitb5_s2.json").read_text())
    assert saved["model"]["checkpoint_encoder"] and saved["method"]["mic"]["enabled"]
    assert main(["test", str(run), "--out", str(tmp_path / "res.json"), "--no-progress"]) == 0
    result = json.loads((tmp_path / "res.json").read_text())
    assert result["mode"] == "slide" and result["mIoU"] == pytest.approx(val[0]["mIoU"])


@pytest.mark.slow
def test_mic_with_daformer_trains(tiny_uda_root: Path, tmp_path: Path) -> None:
    overrides = [*tiny_overrides(tiny_uda_root, "daformer", 2), "method.mic.block_size=8",
                 "method.teacher.pseudo_threshold=0.0"]  # fmt: skip
    cfg = load_config(find_experiment("mic-daformer-gta").path, overrides)
    train(cfg, tmp_path / "run")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "masked.loss_seg" in log and "masked.hr.loss_seg" not in log
    assert load_checkpoint(tmp_path / "run" / "latest.pth")["iteration"] == 2


def _states(ckpt: dict) -> dict[str, torch.Tensor]:
    flat = {f"student.{k}": v for k, v in ckpt["student"].items()}
    flat |= {f"teacher.{k}": v for k, v in ckpt["teacher"].items()}
    flat |= {f"bank.{k}": v for k, v in ckpt["method"]["bank"].items()}
    return flat


@pytest.mark.slow
def test_resume_is_exact_with_hrda_and_mic(
    tiny_uda_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Detail boxes, MIC masks and augmentation are drawn from the checkpointed method RNG."""
    import signal

    from dida.adapt.daformer import DAFormer

    overrides = [*hrda_tiny_overrides(tiny_uda_root, "dida", 6), "train.checkpoint_interval=100"]
    cfg = load_config(find_experiment("dida-mic-gta").path, overrides)
    train(cfg, tmp_path / "full")
    original = DAFormer.forward_backward

    def interrupted(self, batch, iteration, backward, want_images):  # noqa: ANN001, ANN202
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch, iteration, backward, want_images)

    with monkeypatch.context() as patch:
        patch.setattr(DAFormer, "forward_backward", interrupted)
        with pytest.raises(TrainingInterrupted, match="stopped at iteration 3/6"):
            train(cfg, tmp_path / "part")
    train(cfg, tmp_path / "part", resume="auto")
    full = _states(load_checkpoint(tmp_path / "full" / "latest.pth"))
    part = _states(load_checkpoint(tmp_path / "part" / "latest.pth"))
    assert full.keys() == part.keys() and any(".attention_head." in k for k in full)
    for key in full:
        assert torch.allclose(full[key].float(), part[key].float(), atol=1e-6, rtol=0), key


def test_quickstart_accepts_mic_methods_and_keeps_its_default_four() -> None:
    import argparse

    from dida.cli import quickstart
    from dida.config import mic_block_size

    parser = argparse.ArgumentParser()
    quickstart.add_arguments(parser)
    assert parser.parse_args([]).methods == ["source_only", "daformer", "dida", "dida_intended"]
    assert parser.parse_args(["--methods", "mic", "dida_mic"]).methods == ["mic", "dida_mic"]
    from dida.experiments import CONFIG_DIR

    overrides = {m: quickstart.preset_overrides(m) for m in ("mic", "dida_mic", "dida")}
    assert set(overrides["dida_mic"]) == set(overrides["dida"]) | set(quickstart.MIC_OVERRIDES)
    for method in ("mic", "dida_mic"):  # experiment 7's DIDA preset for dida_mic
        cfg = load_config(CONFIG_DIR / "quickstart.yaml", overrides[method])
        assert cfg.method.name == ("daformer" if method == "mic" else "dida")
        assert cfg.method.mic.enabled and not cfg.model.hrda.enabled
        assert cfg.data.crop_size[0] // mic_block_size(cfg) == 16  # the published 16×16 grid


def test_mic_needs_a_teacher() -> None:
    from dida.engine.build import check_inputs
    from dida.errors import UserError

    cfg = load_config(None, ["method.name=source_only", "method.mic.enabled=true",
                             "model.pretrained=null"])  # fmt: skip
    with pytest.raises(UserError, match="method.mic.enabled needs"):
        check_inputs(cfg)
