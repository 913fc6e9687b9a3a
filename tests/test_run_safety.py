"""Nothing a user has is lost by `dida train`: existing runs, concurrent writers, Ctrl-C, full
disks, checkpoint retention and best.pth, one-line errors from loader workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides
from io_helpers import fill_disk

from dida.cli.main import main
from dida.engine.checkpoint import load_checkpoint
from dida.engine.run_dir import LOCK_NAME, RunLock

REPO = Path(__file__).resolve().parents[1]


def _train_args(root: Path, run_dir: Path, iters: int = 2, extra: tuple[str, ...] = ()) -> list:
    args = ["train", "--exp", "7-daformer", "--work-dir", str(run_dir)]
    for item in [*tiny_overrides(root, "daformer", iters), *extra]:
        args += ["--set", item]
    return args


def _last_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1, err
    return err[0]


def test_existing_run_is_refused_without_resume(
    tiny_uda_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    assert main(_train_args(tiny_uda_root, run_dir)) == 0
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(_train_args(tiny_uda_root, run_dir, iters=3, extra=("optim.lr=1e-3",))) == 2
    err = _last_error(capsys)
    assert "already holds a training run" in err and f"--resume {run_dir}" in err
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert after == before  # config, checkpoints, logs untouched; no lock left behind
    # with --resume the same folder continues
    assert main([*_train_args(tiny_uda_root, run_dir, iters=3), "--resume", str(run_dir)]) == 0
    assert load_checkpoint(run_dir / "latest.pth")["iteration"] == 3


def test_work_dir_that_is_a_file(
    tiny_uda_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "file"
    target.write_text("mine")
    assert main(_train_args(tiny_uda_root, target)) == 2
    assert "is a file, not a folder" in _last_error(capsys) and target.read_text() == "mine"


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from dida.engine.run_dir import RunLock
lock = RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_second_writer_is_refused_and_stale_lock_taken_over(
    tiny_uda_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run_dir)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_train_args(tiny_uda_root, run_dir)) == 2
        err = _last_error(capsys)
        assert f"process {holder.pid}" in err and "is writing this run" in err
        assert not (run_dir / "latest.pth").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock file is stale
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == holder.pid
    assert main(_train_args(tiny_uda_root, run_dir)) == 0
    assert "stale lock" in capsys.readouterr().err
    assert not (run_dir / LOCK_NAME).exists()


def test_lock_is_exclusive_within_one_process(tmp_path: Path) -> None:
    first = RunLock(tmp_path).acquire()
    with pytest.raises(Exception, match="is writing this run"):
        RunLock(tmp_path).acquire()
    first.release()
    RunLock(tmp_path).acquire().release()


def _interrupt_during(monkeypatch: pytest.MonkeyPatch, iteration: int) -> None:
    from dida.adapt.daformer import DAFormer

    original = DAFormer.forward_backward

    def interrupted(self, batch, it, backward, want_images):  # noqa: ANN001, ANN202
        if it == iteration:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch, it, backward, want_images)

    monkeypatch.setattr(DAFormer, "forward_backward", interrupted)


def test_ctrl_c_exits_130_with_checkpoint_and_resume_command(
    tiny_uda_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    run_dir = tmp_path / "run"
    _interrupt_during(monkeypatch, 0)
    assert main(_train_args(tiny_uda_root, run_dir, iters=6)) == 130
    err = capsys.readouterr().err
    assert "interrupted: stopped at iteration 1/6" in err
    assert f"dida train --resume {run_dir}" in err
    assert err.count("interrupt: finishing this iteration") == 1
    assert load_checkpoint(run_dir / "latest.pth")["iteration"] == 1


def test_ctrl_c_warning_is_ignored_in_loader_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from dida.engine.train import _StopRequest

    stop = _StopRequest()
    monkeypatch.setattr(stop, "_pid", os.getpid() + 1)  # as seen from a forked worker
    stop._handle(signal.SIGINT, None)
    assert not stop.requested


def test_ctrl_c_warning_survives_a_signal_in_the_middle_of_a_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C arriving while the trainer writes a log line to stderr: the handler's message is
    written too (writing it from the handler itself raised "reentrant call" and lost it)."""
    import io

    from dida.engine.logging import setup_logging, teardown_logging
    from dida.engine.train import _StopRequest

    class Terminal(io.RawIOBase):
        def __init__(self) -> None:
            self.data, self.signal_arrives = b"", None

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:  # noqa: ANN001
            if self.signal_arrives is not None:
                handler, self.signal_arrives = self.signal_arrives, None
                handler()  # as Python runs a signal handler: in the thread that is writing
            self.data += bytes(b)
            return len(b)

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(io.BufferedWriter(terminal),
                                                        line_buffering=True))  # fmt: skip
    log = setup_logging(None)
    try:
        with _StopRequest() as stop:
            terminal.signal_arrives = lambda: stop._handle(signal.SIGINT, None)
            log.info("iter 7/100")
        sys.stderr.flush()
    finally:
        teardown_logging()
    out = terminal.data.decode()
    assert stop.requested and "Logging error" not in out and "iter 7/100" in out
    assert out.count("interrupt: finishing this iteration, then writing a checkpoint") == 1


def test_full_disk_during_checkpoint_keeps_the_last_one(
    tiny_uda_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    run_dir = tmp_path / "run"
    assert main(_train_args(tiny_uda_root, run_dir, iters=2)) == 0
    good = (run_dir / "latest.pth").read_bytes()
    capsys.readouterr()
    fill_disk(monkeypatch, room=20_000)  # the config JSON fits, a checkpoint does not
    args = [*_train_args(tiny_uda_root, run_dir, iters=4), "--resume", str(run_dir)]
    assert main(args) == 2
    err = _last_error(capsys)
    assert err.endswith("cannot write checkpoint: no space left on device"), err
    assert "iter_4.pth" in err
    assert (run_dir / "latest.pth").read_bytes() == good
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]


def test_retention_keeps_the_newest_and_the_best(tiny_uda_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    extra = ("train.checkpoint_interval=1", "train.keep_checkpoints=1", "train.eval_interval=2")
    assert main(_train_args(tiny_uda_root, run_dir, iters=4, extra=extra)) == 0
    assert sorted(p.name for p in run_dir.glob("*.pth")) == ["best.pth", "iter_4.pth",
                                                             "latest.pth"]  # fmt: skip
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = {r["iter"]: r["mIoU"] for r in records if r["kind"] == "val"}
    assert sorted(val) == [2, 4]
    best_iter = max(val, key=lambda i: (val[i], -i))  # the first of equal values
    best = load_checkpoint(run_dir / "best.pth")
    assert best["iteration"] == best_iter and best["best"]["iteration"] == best_iter
    assert best["best"]["mIoU"] == pytest.approx(val[best_iter])
    # off: no best.pth
    other = tmp_path / "nobest"
    extra = (*extra, "train.save_best=false")
    assert main(_train_args(tiny_uda_root, other, iters=2, extra=extra)) == 0
    assert not (other / "best.pth").exists()


def test_data_error_in_a_loader_worker_is_one_line(
    tiny_uda_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_uda_root, root)
    for image in (root / "gta" / "images").glob("*.png"):
        image.write_bytes(image.read_bytes()[:64])  # a valid header, truncated pixel data
    args = _train_args(root, tmp_path / "run", extra=("data.num_workers=1",))
    assert main(args) == 2
    err = _last_error(capsys)
    assert "Caught" not in err and "Traceback" not in err
    assert "gta/images/" in err and "cannot decode image" in err


def test_worker_message_is_unwrapped() -> None:
    from dida.errors import DataError, one_line

    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        'last):\n  File "x.py", line 1, in f\n    raise DataError(...)\n'
        "dida.errors.DataError: data/a.png: cannot decode image\n"
    )
    assert one_line(wrapped) == "data/a.png: cannot decode image"
    assert one_line(DataError("x.png: bad")) == "x.png: bad"


def test_debug_panel_captions_fit_their_tiles() -> None:
    from dida.viz import make_panel

    # 16 px: too narrow even at the smallest scale (cut); OpenCV 5 draws text sizes in steps
    for width, caption in [(60, "a_very_long_caption_name"), (16, "long_caption" * 4)]:
        tiles = [np.zeros((40, width, 3), np.uint8), np.zeros((40, width, 3), np.uint8)]
        panel = make_panel(tiles, [caption, ""])
        title_h = panel.shape[0] - 40
        assert panel[:title_h, :width].any()  # the caption is drawn...
        assert not panel[:title_h, width:].any()  # ...and does not run into the next tile


def test_plain_progress_lines_when_not_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dida.engine import logging as dlog

    monkeypatch.setattr(dlog, "PLAIN_PROGRESS_SECONDS", 0.0)
    progress = dlog.Progress(10, 2)
    time.sleep(0.01)
    progress.update(5)
    progress.close()
    err = capsys.readouterr().err
    assert err.startswith("train 5/10 (50%)") and "eta" in err and "\r" not in err


def test_track_prints_plain_progress_lines_off_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`dida convert`'s progress: every item passes through, plain lines go to stderr."""
    import dida.engine.logging as dlog

    monkeypatch.setattr(dlog, "PLAIN_PROGRESS_SECONDS", 0.0)
    assert list(dlog.track(iter(range(5)), 5, "convert gta")) == [0, 1, 2, 3, 4]
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("convert gta ") for line in lines)
    assert "4/5 (80%)" in lines[-1]
