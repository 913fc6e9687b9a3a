"""`dida quickstart`, shortened: the whole pipeline runs and writes what it promises (slow: CI)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dida.cli.main import main


@pytest.mark.slow
def test_quickstart_smoke(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Two job processes (as on a 2-core machine): every run trained, evaluated, tabled."""
    data, work = tmp_path / "data", tmp_path / "wd"
    args = ["quickstart", "--iters", "4", "--data-root", str(data), "--work-dir", str(work),
            "--set", "train.debug_interval=0", "--jobs", "2"]  # fmt: skip
    assert main(args) == 0
    out, err = capfd.readouterr()
    assert "gain over source-only" in out and re.search(r"^\| source_only +\| ", out, re.M)
    assert "4 runs, 2 at a time with " in out
    for method in ("source_only", "daformer", "dida", "dida_intended"):  # one line per job's log
        assert re.search(rf"^[0-9:]+ \[{method} seed 0\] INFO finished in ", err, re.M), method
        assert re.search(rf"^      {method} \(seed 0\): mIoU [0-9.]+$", out, re.M), method
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
    assert "reused" in capfd.readouterr().out


def _runs(methods: list[str], seeds: int = 1, iters: int = 500, log_interval: int = 50) -> list:
    from dida.cli.quickstart import _Run
    from dida.config import load_config
    from dida.experiments import find_experiment

    overrides = [f"train.max_iters={iters}", f"train.log_interval={log_interval}"]
    cfg = load_config(find_experiment("quickstart").path, overrides)
    return [_Run(i + 1, s, m, cfg, Path(f"s{s}/{m}"))
            for i, (s, m) in enumerate((s, m) for s in range(seeds) for m in methods)]  # fmt: skip


def _times(plan: list, iters: int) -> list[list[tuple[int, float, float]]]:
    """(run n, estimated start, end) of every part, job by job."""
    from dida.cli.quickstart import COST

    out = []
    for parts in plan:
        t, job = 0.0, []
        for p in parts:
            length = COST[p.run.method] * ((p.stop or iters) - p.start)
            job.append((p.run.n, t, t + length))
            t += length
        out.append(job)
    return out


@pytest.mark.parametrize(
    ("methods", "seeds", "jobs", "iters"),
    [
        (["source_only", "daformer", "dida", "dida_intended"], 1, 2, 500),
        (["source_only", "daformer", "dida", "dida_intended"], 3, 2, 500),
        (["source_only", "daformer", "dida", "dida_intended", "mic", "dida_mic"], 1, 3, 500),
        (["source_only", "daformer", "dida"], 1, 2, 120),
    ],
)
def test_jobs_finish_together_and_split_runs_keep_their_order(
    methods: list[str], seeds: int, jobs: int, iters: int
) -> None:
    from dida.cli.quickstart import COST, SPLIT_STEP, plan_jobs

    runs = _runs(methods, seeds, iters)
    plan = plan_jobs(runs, jobs)
    assert len(plan) == jobs
    # every run: all its iterations once, as [0, k) then [k, end) when split, k a multiple of
    # SPLIT_STEP (not of the log interval: a resume logs the interval's means as in one go)
    parts = {r.n: sorted((p.start, p.stop or iters) for job in plan for p in job if p.run is r)
             for r in runs}  # fmt: skip
    for n, spans in parts.items():
        assert spans[0][0] == 0 and spans[-1][1] == iters and len(spans) <= 2, (n, spans)
        if len(spans) == 2:
            assert spans[0][1] == spans[1][0] and spans[0][1] % SPLIT_STEP == 0
    assert sum(len(s) == 2 for s in parts.values()) >= 1
    times = _times(plan, iters)
    # a split run: its first part opens a job, its last part closes the job before, later
    for i, job in enumerate(plan):
        for k, p in enumerate(job):
            if p.stop is not None:
                assert k == 0 and i > 0 and plan[i - 1][-1].run is p.run and plan[i - 1][-1].start
                assert times[i][0][2] <= times[i - 1][-1][1]
    ends = [job[-1][2] for job in times]
    slack = max(COST[m] for m in methods) * SPLIT_STEP  # one split step of the costliest run
    assert max(ends) - min(ends) <= slack, ends
    assert max(ends) <= max(sum(COST[r.method] * iters for r in runs) / jobs,
                            max(COST[r.method] * iters for r in runs)) + slack  # fmt: skip


def test_a_run_too_short_to_split_is_placed_whole() -> None:
    from dida.cli.quickstart import plan_jobs

    runs = _runs(["source_only", "daformer", "dida", "dida_intended"], iters=4)  # < SPLIT_STEP
    plan = plan_jobs(runs, 2)
    assert sorted(p.run.n for job in plan for p in job) == [1, 2, 3, 4]
    assert all(p.start == 0 and p.stop is None for job in plan for p in job)
    assert [len(job) for job in plan] == [2, 2]
    assert plan_jobs(runs[:1], 2) == [[plan_jobs(runs[:1], 1)[0][0]]]  # one run: one job


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seeds", "0"], "--seeds 0: expected 1 or more"),
        (["--seeds", "-1"], "--seeds -1: expected 1 or more"),
        (["--iters", "0"], "--iters 0: expected 1 or more"),
        (["--iters", "-5"], "--iters -5: expected 1 or more"),
        (["--data-root", "FILE"], "--data-root folder is a file, not a folder"),
        (["--work-dir", "FILE"], "--work-dir folder is a file, not a folder"),
    ],
)
def test_bad_arguments_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    (tmp_path / "FILE").write_text("mine")
    extra = [str(tmp_path / "FILE") if e == "FILE" else e for e in extra]
    defaults = ["--data-root", str(tmp_path / "d"), "--work-dir", str(tmp_path / "w")]
    assert main(["quickstart", *defaults, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert (tmp_path / "FILE").read_text() == "mine" and not (tmp_path / "d" / "gta").exists()


def test_a_run_with_other_settings_is_refused(tmp_path: Path) -> None:
    from dida.cli.quickstart import _existing_run
    from dida.config import load_config, save_config
    from dida.errors import UserError
    from dida.experiments import find_experiment

    cfg = load_config(find_experiment("quickstart").path)
    assert _existing_run(cfg, tmp_path / "empty") is None
    save_config(cfg, tmp_path / f"{cfg.name}.json")
    assert _existing_run(cfg, tmp_path) == "auto"  # same settings: continue or reuse
    other = load_config(find_experiment("quickstart").path, ["train.max_iters=200"])
    with pytest.raises(UserError, match=r"other settings \(train.max_iters: 500 there, 200 now\)"):
        _existing_run(other, tmp_path)


def test_cached_benchmark_is_found_from_another_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dida.data.benchmark import make_synthetic_benchmark

    small = dict(n_source=2, n_target_train=2, n_val=1, source_size=(32, 48), target_size=(32, 64))
    monkeypatch.chdir(tmp_path)
    first = make_synthetic_benchmark("bench", **small)
    assert Path(first["gta_root"]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = make_synthetic_benchmark(tmp_path / "bench", **small)
    assert again["cached"] and again["gta_root"] == first["gta_root"]
    assert Path(again["cityscapes_root"], "leftImg8bit").is_dir()


@pytest.mark.slow
def test_ctrl_c_stops_the_whole_quickstart_and_a_rerun_continues(
    tiny_uda_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import os
    import signal

    from conftest import tiny_overrides

    import dida.data.benchmark
    from dida.adapt.daformer import DAFormer

    roots = {"gta_root": str(tiny_uda_root / "gta"),
             "cityscapes_root": str(tiny_uda_root / "cityscapes"), "cached": True}  # fmt: skip
    monkeypatch.setattr(dida.data.benchmark, "make_synthetic_benchmark", lambda *a, **k: roots)
    work = tmp_path / "wd"
    args = ["quickstart", "--iters", "3", "--methods", "source_only", "daformer", "--jobs", "1",
            "--work-dir", str(work), "--data-root", str(tmp_path / "data")]  # fmt: skip
    for item in tiny_overrides(tiny_uda_root):
        if not item.startswith(("method.name=", "train.max_iters=")):
            args += ["--set", item]
    original = DAFormer.forward_backward
    calls = []

    def interrupted(self, batch, iteration, backward, want_images):  # noqa: ANN001, ANN202
        calls.append(iteration)
        if iteration == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch, iteration, backward, want_images)

    with monkeypatch.context() as patch:
        patch.setattr(DAFormer, "forward_backward", interrupted)  # daformer, the 2nd run
        assert main(args) == 130
    captured = capsys.readouterr()
    assert "quickstart stopped at run 2/2 (daformer, seed 0)" in captured.err
    assert "| source_only |" not in captured.out and not (work / "summary.json").exists()
    assert (work / "seed0" / "source_only" / "preds" / "results.json").is_file()
    assert not (work / "seed0" / "daformer" / "preds").exists()  # nothing partial is scored
    # the same command again: source_only is reused, daformer continues from iteration 2
    assert main(args) == 0
    out = capsys.readouterr()
    assert "finished earlier: reusing its results" in out.out
    assert "resumed from" in out.err and re.search(r"^\| daformer +\| ", out.out, re.M)
    summary = json.loads((work / "summary.json").read_text())
    assert set(summary) == {"source_only", "daformer"}


@pytest.mark.slow
def test_ctrl_c_stops_every_job_once_and_keeps_their_checkpoints(
    tiny_uda_root: Path, tmp_path: Path
) -> None:
    """Ctrl-C on a terminal reaches the quickstart's process group; the jobs live in their own,
    so each gets one SIGINT from the quickstart: it finishes its iteration and checkpoints. A
    queued run does not start."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import tiny_overrides

    work = tmp_path / "wd"
    args = [sys.executable, "-m", "dida.cli.main", "quickstart", "--iters", "100000", "--jobs",
            "2", "--methods", "source_only", "daformer", "dida", "--work-dir", str(work),
            "--data-root", str(tmp_path / "data")]  # fmt: skip
    for item in tiny_overrides(tiny_uda_root):
        if not item.startswith(("method.name=", "train.max_iters=", "train.checkpoint_")):
            args += ["--set", item]
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731  (as a shell)
    proc = subprocess.Popen(args, start_new_session=True, preexec_fn=restore, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    started = [work / "seed0" / m / "metrics.jsonl" for m in ("daformer", "dida")]  # longest first
    deadline = time.monotonic() + 120
    while not all(p.is_file() for p in started) and proc.poll() is None:
        assert time.monotonic() < deadline, "the jobs did not start"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "quickstart stopped at run 1/3 (source_only, seed 0)" in out
    assert out.count("writing a checkpoint (again to abort)") == 2  # once per job, no abort
    for method in ("daformer", "dida"):
        run = work / "seed0" / method
        assert (run / "latest.pth").is_file() and not (run / "preds").exists()
    assert not (work / "seed0" / "source_only").exists()  # queued, never started
    assert not (work / "summary.json").exists()


@pytest.mark.slow
def test_a_run_split_between_two_jobs_is_the_run_trained_in_one_go(
    tiny_uda_root: Path, tmp_path: Path
) -> None:
    """Two jobs of one thread, one run split between them (its first iterations in one job, the
    rest in the other): every run's weights and mIoU equal those of the same quickstart trained
    in one process with one thread."""
    import os
    import subprocess
    import sys

    import torch
    from conftest import tiny_overrides

    from dida.cli.quickstart import SPLIT_STEP, plan_jobs
    from dida.engine.checkpoint import load_checkpoint

    methods = ["source_only", "daformer", "dida", "dida_intended"]
    iters = 2 * SPLIT_STEP  # a split needs a run of two split steps or more
    split = [p for job in plan_jobs(_runs(methods, iters=iters, log_interval=1), 2) for p in job
             if p.stop is not None]  # fmt: skip
    assert len(split) == 1
    name, head = split[0].run.method, split[0].stop

    def quickstart(work: Path, jobs: int, threads: int) -> str:
        args = [sys.executable, "-m", "dida.cli.main", "quickstart", "--iters", str(iters),
                "--jobs", str(jobs), "--methods", *methods, "--work-dir", str(work),
                "--data-root", str(tmp_path / "data")]  # fmt: skip
        for item in tiny_overrides(tiny_uda_root):  # train.log_interval=1
            if not item.startswith(("method.name=", "train.max_iters=")):
                args += ["--set", item]
        env = os.environ | {"OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(args, env=env, text=True, capture_output=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    out = quickstart(tmp_path / "split", jobs=2, threads=2)
    assert f"{name} (iterations 0-{head}/{iters})" in out
    assert f"{name} (iterations {head}-{iters}/{iters})" in out
    assert f"paused at iteration {head}/{iters}" in out and "resumed from" in out
    quickstart(tmp_path / "whole", jobs=1, threads=1)
    for method in methods:
        split = load_checkpoint(tmp_path / "split" / "seed0" / method / "latest.pth")
        whole = load_checkpoint(tmp_path / "whole" / "seed0" / method / "latest.pth")
        assert split["iteration"] == whole["iteration"] == iters
        for key, value in whole["student"].items():
            assert torch.equal(split["student"][key], value), (method, key)
        results = [json.loads((tmp_path / w / "seed0" / method / "preds" / "results.json")
                              .read_text())["mIoU"] for w in ("split", "whole")]  # fmt: skip
        assert results[0] == results[1], method


@pytest.mark.parametrize("job", [True, False])
def test_a_job_evaluates_without_loader_processes(
    tiny_uda_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, job: bool
) -> None:
    """In a job process the other jobs keep the other cores busy, so its evaluation loads the
    val images itself (data-loading processes only took time from the jobs: 8-9 against 4-5 s
    per quickstart evaluation); a run trained alone keeps `eval.num_workers`."""
    from conftest import tiny_overrides

    import dida.eval.evaluate
    from dida.cli.quickstart import _train_and_test
    from dida.config import load_config
    from dida.experiments import find_experiment

    cfg = load_config(find_experiment("quickstart").path, tiny_overrides(tiny_uda_root, iters=2))
    assert cfg.eval.num_workers == 2
    evaluate, seen = dida.eval.evaluate.evaluate, []

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(kwargs["num_workers"])
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(dida.eval.evaluate, "evaluate", spy)
    results = _train_and_test(cfg, tmp_path / "run", job=job)
    assert seen == [0 if job else 2] and 0.0 <= results["mIoU"] <= 1.0
