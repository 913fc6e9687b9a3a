"""benchmarks/gpu_check.sh, the prepared GPU check, as its CPU dry run (a tiny model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_the_environment_and_the_eager_table(tmp_path: Path) -> None:
    """With DEVICE=cpu the script runs the speed table's 8 eager rows (each row logged as it
    finishes, then the table) and stops its compiled rows when TOTAL_S is spent, leaving no
    compile cache behind."""
    from dida.engine.train import cpu_has_fast_bf16

    # 6 of the 8 rows are bf16: on a CPU without native bf16 (PyTorch's slow fallback, whose
    # profiles hold ~10^5 events) 7 rows took 300 s (AMD EPYC, AVX2); elsewhere seconds each
    eager_s = 300 if cpu_has_fast_bf16() else 900
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = os.environ | {
        "OUT": str(tmp_path), "DEVICE": "cpu", "VARIANT": "mit_tiny", "CROP": "32",
        "PYTHON": sys.executable, "EAGER_S": str(eager_s), "TOTAL_S": "1", "TMPDIR": str(tmp),
    }  # fmt: skip
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=eager_s + 100)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "torch" in (tmp_path / "env.txt").read_text()
    eager = (tmp_path / "eager.txt").read_text()
    assert eager.count("done: ") == 8
    rows = [line for line in eager.splitlines() if line.startswith("| d")]
    assert len(rows) == 8 and all(line.rstrip().endswith("| 0 |") for line in rows)  # no syncs
    # the eager rows spent TOTAL_S: the compiled part got its 1 s minimum
    assert "(compiled: stopped at its 1 s limit" in (tmp_path / "compiled.txt").read_text()
    assert not list(tmp.glob("dida-compile-cache-*"))  # removed on the limit's SIGTERM
