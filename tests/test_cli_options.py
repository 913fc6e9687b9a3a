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
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # idle threads sleep by default
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
