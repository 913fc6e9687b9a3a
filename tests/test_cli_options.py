"""Options every `dida` command shares: --threads (and the OpenMP wait policy), --cfg-options."""

from __future__ import annotations

import os

import pytest
import torch

from dida.cli.main import build_parser, configure_threads, main


def test_cfg_options_is_an_alias_of_set() -> None:
    parser = build_parser()
    for argv in (["train", "--exp", "7"], ["test", "RUN"], ["quickstart"]):
        args = parser.parse_args([*argv, "--set", "a.b=1", "--cfg-options", "c.d=2", "e.f=3"])
        assert args.overrides == ["a.b=1", "c.d=2", "e.f=3"]


def test_threads_option(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))
    try:
        assert main(["experiments", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert "OMP_WAIT_POLICY" not in os.environ  # the user chose: OpenMP's own policy
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["experiments", "--threads", "0"])
    assert "--threads: 0: expected 1 or more" in capsys.readouterr().err


def test_wait_policy_of_the_user_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    configure_threads(None)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "")  # empty: the OpenMP runtime's own policy
    configure_threads(None)
    assert "OMP_WAIT_POLICY" not in os.environ


def test_busy_cpus_counts_other_work() -> None:
    """A spinning child process on one of our cores shows up as about one busy core."""
    import subprocess
    import sys

    from dida.cli.main import busy_cpus

    cpus = sorted(os.sched_getaffinity(0))
    idle = busy_cpus(cpus, interval=0.2)
    assert idle is not None and 0.0 <= idle <= len(cpus)
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        busy = busy_cpus(cpus, interval=0.5)
    finally:
        spin.kill()
    assert busy is not None and busy >= 0.8


@pytest.mark.parametrize(("busy", "threads", "policy"), [(0.1, None, None), (1.2, "1", "PASSIVE")])
def test_threads_adapt_to_other_work(
    monkeypatch: pytest.MonkeyPatch, busy: float, threads: str | None, policy: str | None
) -> None:
    """In a fresh process (torch not yet loaded) on 2 cores: idle cores keep PyTorch's thread
    count and OpenMP's own wait policy; cores busy with other work give one thread per free core
    that sleeps while it waits, and a note."""
    import sys

    import dida.cli.main as cli

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(cli, "busy_cpus", lambda cpus: busy)
    monkeypatch.delitem(sys.modules, "torch")  # as before the first import
    note = cli.configure_threads(None)
    assert os.environ.get("OMP_NUM_THREADS") == threads
    assert os.environ.get("OMP_WAIT_POLICY") == policy
    assert (note is not None) == (threads is not None)
    if note:
        assert "1.2 of 2 CPU cores busy" in note and "--threads" in note


def test_library_warnings_go_to_the_log_not_the_console(
    tmp_path, capsys: pytest.CaptureFixture  # noqa: ANN001
) -> None:
    import logging
    import warnings

    from dida.cli.main import quiet_library_warnings
    from dida.engine.logging import setup_logging, teardown_logging

    logging.captureWarnings(False)  # as in a fresh process (an earlier test ran the CLI)
    quiet_library_warnings()
    try:
        setup_logging(tmp_path / "train.log")
        warnings.warn("a library complains", UserWarning, stacklevel=1)
        teardown_logging()
        warnings.warn("after the run", UserWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
    assert "a library complains" not in capsys.readouterr().err
    log = (tmp_path / "train.log").read_text()
    assert "a library complains" in log and "after the run" not in log


def test_load_report_is_one_readable_line() -> None:
    from dida.models.weights import LoadReport

    report = LoadReport("w.pth", "nvlabs", ["a", "b", "c", "d"], [], ["head.x"])
    expected = "nvlabs layout, 4 missing (a, b, c, ...), 0 unexpected, 1 ignored (head.x)"
    assert str(report) == expected
