"""The training engine end to end on tiny synthetic data: train → test, exact resume, stops, DDP."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, tiny_overrides

from dida.cli.main import main
from dida.config import load_config
from dida.engine.checkpoint import load_checkpoint
from dida.engine.train import TrainingDiverged, TrainingInterrupted, train
from dida.experiments import find_experiment


def _cfg(root: Path, method: str, iters: int, extra: list[str] | None = None):  # noqa: ANN202
    overrides = tiny_overrides(root, method, iters) + (extra or [])
    return load_config(find_experiment("7").path, overrides)


def _states(ckpt: dict) -> dict[str, torch.Tensor]:
    flat = {f"student.{k}": v for k, v in ckpt["student"].items()}
    flat |= {f"teacher.{k}": v for k, v in ckpt.get("teacher", {}).items()}
    flat |= {f"bank.{k}": v for k, v in ckpt.get("method", {}).get("bank", {}).items()}
    return flat


def test_train_then_test_end_to_end(tiny_uda_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["train", "--exp", "7", "--work-dir", str(run_dir)]
    for item in tiny_overrides(tiny_uda_root, "dida", 4) + ["train.eval_interval=4",
                                                               "train.debug_interval=2"]:
        args += ["--set", item]
    assert main(args) == 0
    cfg_file = run_dir / "gta2cs_dida_mitb5_s0.json"
    assert json.loads(cfg_file.read_text())["method"]["name"] == "dida"
    assert {"latest.pth", "iter_2.pth", "iter_4.pth", "metrics.jsonl", "train.log", "best.pth"} == {
        p.name for p in run_dir.iterdir()
    } - {"debug", cfg_file.name}  # the lock file is gone
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    val = [r for r in records if r["kind"] == "val"]
    assert len(val) == 1 and 0.0 <= val[0]["mIoU"] <= 1.0
    assert sorted(p.name for p in (run_dir / "debug").iterdir()) == [
        "000000_0.png", "000000_1.png", "000002_0.png", "000002_1.png"
    ]  # fmt: skip  (named by the iteration that drew them, 0-based)
    ckpt = load_checkpoint(run_dir / "latest.pth")
    assert ckpt["iteration"] == 4 and "bank" in ckpt["method"]
    assert main(["test", str(run_dir)]) == 0


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, stop_iteration: int) -> None:
    """Make the method send SIGINT (Ctrl-C) to this process during `stop_iteration`."""
    from dida.adapt.daformer import DAFormer

    original = DAFormer.forward_backward

    def interrupted(self, batch, iteration, backward, want_images):  # noqa: ANN001, ANN202
        if iteration == stop_iteration:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch, iteration, backward, want_images)

    monkeypatch.setattr(DAFormer, "forward_backward", interrupted)


def test_resume_is_exact(
    tiny_uda_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tiny_uda_root, "dida", 6, ["train.checkpoint_interval=100"])
    train(cfg, tmp_path / "full")
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 2)  # Ctrl-C during iteration 2: checkpoint after 3 iterations
        with pytest.raises(TrainingInterrupted, match="stopped at iteration 3/6"):
            train(cfg, tmp_path / "part")
    assert load_checkpoint(tmp_path / "part" / "latest.pth")["iteration"] == 3
    train(cfg, tmp_path / "part", resume="auto")
    full = _states(load_checkpoint(tmp_path / "full" / "latest.pth"))
    part = _states(load_checkpoint(tmp_path / "part" / "latest.pth"))
    assert full.keys() == part.keys() and any(k.startswith("bank.") for k in full)
    for key in full:
        assert torch.allclose(full[key].float(), part[key].float(), atol=1e-6, rtol=0), key


def _train_with_threads(threads: int, cfg, run_dir: Path) -> None:  # noqa: ANN001
    torch.set_num_threads(threads)
    train(cfg, run_dir, resume="auto")


def test_a_paused_run_continued_in_another_process_is_the_run_trained_in_one_go(
    tiny_uda_root: Path, tmp_path: Path
) -> None:
    """`stop_at` (the quickstart's split runs): checkpoint and return; resumed, the weights, the
    bank and the logged metrics are bit for bit those of the uninterrupted run, also when the
    pause falls between two log lines (the checkpoint carries the interval's metrics so far)."""
    cfg = _cfg(tiny_uda_root, "dida", 6, ["train.checkpoint_interval=100", "train.log_interval=3"])
    train(cfg, tmp_path / "full")
    assert train(cfg, tmp_path / "part", stop_at=4) == {}
    assert load_checkpoint(tmp_path / "part" / "latest.pth")["iteration"] == 4
    assert "paused at iteration 4/6" in (tmp_path / "part" / "train.log").read_text()
    ctx = mp.get_context("spawn")  # a fresh process, as the quickstart's other job
    args = (torch.get_num_threads(), cfg, tmp_path / "part")  # the numbers depend on threads
    proc = ctx.Process(target=_train_with_threads, args=args)
    proc.start()
    proc.join()
    assert proc.exitcode == 0
    full = _states(load_checkpoint(tmp_path / "full" / "latest.pth"))
    part = _states(load_checkpoint(tmp_path / "part" / "latest.pth"))
    assert full.keys() == part.keys() and any(k.startswith("bank.") for k in full)
    for key in full:
        assert torch.equal(full[key], part[key]), key

    def logged(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "it_per_s"} for line in lines]

    assert [r["iter"] for r in logged("part")] == [3, 6]
    assert logged("part") == logged("full")


def test_nan_loss_stops_and_keeps_last_checkpoint(
    tiny_uda_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dida.adapt.daformer import DAFormer

    original = DAFormer.forward_backward

    def poisoned(self, batch, iteration, backward, want_images):  # noqa: ANN001, ANN202
        step = original(self, batch, iteration, backward, want_images)
        if iteration == 2:
            step.losses["mix.loss_seg"] = float("nan")
        return step

    monkeypatch.setattr(DAFormer, "forward_backward", poisoned)
    with pytest.raises(TrainingDiverged, match="mix.loss_seg"):
        train(_cfg(tiny_uda_root, "daformer", 6), tmp_path)
    assert load_checkpoint(tmp_path / "latest.pth")["iteration"] == 2


def test_interrupt_writes_checkpoint_and_exits(
    tiny_uda_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _interrupt_at(monkeypatch, 1)
    with pytest.raises(TrainingInterrupted, match=f"dida train --resume {tmp_path}"):
        train(_cfg(tiny_uda_root, "daformer", 10, ["train.checkpoint_interval=100"]), tmp_path)
    assert load_checkpoint(tmp_path / "latest.pth")["iteration"] == 2
    assert not list(tmp_path.glob("iter_*.pth"))


def _ddp_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    cfg = _cfg(Path(root), "dida", 4)

    def dump(method: torch.nn.Module) -> None:
        torch.save({k: v.detach().cpu() for k, v in method.state_dict().items()},
                   Path(out) / f"rank{rank}.pt")  # fmt: skip

    train(cfg, Path(out) / "run", on_finish=dump)


def test_two_process_gloo_run_keeps_ranks_identical(tiny_uda_root: Path, tmp_path: Path) -> None:
    mp.start_processes(_ddp_worker, args=(2, free_port(), str(tiny_uda_root), str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")  # fmt: skip
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert any(k.startswith("bank.") for k in r0) and any(k.startswith("teacher.") for k in r0)
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    assert load_checkpoint(tmp_path / "run" / "latest.pth")["iteration"] == 4


def test_run_exp_sh_trains_an_experiment(tiny_uda_root: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    sets = [a for item in tiny_overrides(tiny_uda_root, "daformer", 2) for a in ("--set", item)]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["sh", str(repo / "run_exp.sh"), "7", "0", "--work-dir", str(tmp_path / "run"), *sets],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    log = (tmp_path / "run_exp_7.out").read_text()
    assert "iter 2/2" in log
    assert load_checkpoint(tmp_path / "run" / "latest.pth")["iteration"] == 2


@pytest.mark.parametrize("exp", ["7", "8-intended"])
def test_experiment_trains_with_the_shipped_bank(
    tiny_uda_root: Path, tmp_path: Path, exp: str
) -> None:
    """`dida train --exp 7 --set model.pretrained=null` needs no bank file: the preset's shipped
    bank is package data (tiny model and data, but the bank's real size K=300, D=256)."""
    run_dir = tmp_path / "run"
    args = ["train", "--exp", exp, "--work-dir", str(run_dir)]
    keep = ("method.bank.", "model.embed_dim")  # the preset's own bank settings stay
    overrides = [o for o in tiny_overrides(tiny_uda_root, "dida", 2) if not o.startswith(keep)]
    extra = ["model.embed_dim=256", "method.bank.update_interval=1", "data.source.kind=gta"]
    for item in overrides + extra:
        args += ["--set", item]
    assert main(args) == 0
    resolved = json.loads(next(run_dir.glob("*.json")).read_text())["method"]
    assert resolved["bank"]["init"] == "file"
    assert resolved["bank"]["init_path"] == "builtin:synthia_300"
    ckpt = load_checkpoint(run_dir / "latest.pth")
    labels = ckpt["method"]["bank"]["labels"]
    counts = torch.bincount(labels, minlength=19)
    assert int(ckpt["method"]["bank"]["count"]) == 300
    assert counts[[9, 14, 16]].sum() == 0 and int(counts[0]) == 20  # the SYNTHIA cache's labels
    records = (run_dir / "metrics.jsonl").read_text()
    assert "instance.loss_in" in records  # a full bank: L_in from the first iteration


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_tensorboard(
    tiny_uda_root: Path, tmp_path: Path, precision: str
) -> None:
    cfg = _cfg(tiny_uda_root, "dida", 2, [f"train.precision={precision}", "train.tensorboard=true"])
    train(cfg, tmp_path)
    ckpt = load_checkpoint(tmp_path / "latest.pth")
    assert ckpt["iteration"] == 2
    assert ("scale" in ckpt["scaler"]) == (precision == "fp16")  # a grad scaler only for fp16
    assert all(v.dtype == torch.float32 for v in ckpt["student"].values() if v.is_floating_point())
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_source_size_mismatch_is_logged_and_trains(tiny_uda_root: Path, tmp_path: Path) -> None:
    """A GTA label of another size than its image: resized (nearest), counted in the log."""
    import shutil

    import cv2

    root = tmp_path / "uda"
    shutil.copytree(tiny_uda_root, root)
    label = next((root / "gta" / "labels").glob("*_labelTrainIds.png"))
    small = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)[::2, ::2]
    cv2.imwrite(str(label), small)
    cfg = _cfg(root, "daformer", 1, ["data.rcs.enabled=false"])
    train(cfg, tmp_path / "run")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "1 of 6 source image/label pairs differ in size" in log
    assert load_checkpoint(tmp_path / "run" / "latest.pth")["iteration"] == 1


def test_precision_auto_follows_the_cpu_and_bf16_without_native_support_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`auto` trains in bf16 on a CPU only with native bf16; asking for bf16 on a CPU without it
    works but says that fp32 is faster there (bf16 convolutions take a slow fallback)."""
    import dida.engine.train as engine_train
    from dida.engine.train import resolve_precision
    from dida.errors import UserError

    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(engine_train, "cpu_has_fast_bf16", lambda native=native: native)
        caplog.clear()
        with caplog.at_level("WARNING", logger="dida.train"):
            assert resolve_precision("auto", cpu, training=True) == (
                torch.bfloat16 if native else torch.float32
            )
            assert resolve_precision("auto", cpu) == torch.float32  # inference: fp32
            assert resolve_precision("fp32", cpu, training=True) == torch.float32
            assert not caplog.records
            assert resolve_precision("bf16", cpu, training=True) == torch.bfloat16
        warned = [r.getMessage() for r in caplog.records]
        assert len(warned) == (0 if native else 1)
        if warned:
            assert "without native bf16" in warned[0] and "fp32" in warned[0]
    with pytest.raises(UserError, match="train.precision: 'fp8'"):
        resolve_precision("fp8", cpu)
