"""`dida quickstart`, shortened: the whole pipeline runs and writes what it promises (slow: CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dida.cli.main import main


@pytest.mark.slow
def test_quickstart_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, work = tmp_path / "data", tmp_path / "wd"
    args = ["quickstart", "--iters", "4", "--data-root", str(data), "--work-dir", str(work),
            "--set", "train.debug_interval=0"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "gain over source-only" in out and "| source_only |" in out
    methods = ("source_only", "daformer", "dida", "dida_intended")
    for method in methods:
        run = work / "seed0" / method
        assert (run / "latest.pth").is_file() and (run / "synthetic_quickstart.json").is_file()
        results = json.loads((run / "preds" / "results.json").read_text())
        assert 0.0 <= results["mIoU"] <= 1.0
        assert len(list((run / "preds").rglob("*_leftImg8bit.png"))) == 100  # the val images
    summary = json.loads((work / "summary.json").read_text())
    assert set(summary) == set(methods)
    resolved = {m: json.loads((work / "seed0" / m / "synthetic_quickstart.json").read_text())
                for m in ("dida", "dida_intended")}  # fmt: skip
    assert resolved["dida"]["method"]["instance"]["calibrate_source"] == "student_mixed_logits"
    assert resolved["dida"]["method"]["bank"]["update_rule"] == "reference"
    assert resolved["dida_intended"]["method"]["instance"]["calibrate_source"] == "teacher_probs"
    assert resolved["dida_intended"]["method"]["instance"]["resolution"] == "feature"
    assert json.loads((data / "benchmark.json").read_text())["params"]["n_val"] == 100
    # a second run reuses the generated data
    assert main(args[:1] + ["--methods", "source_only"] + args[1:]) == 0
    assert "reused" in capsys.readouterr().out
