"""`dida quickstart`: the built-in synthetic benchmark, end to end on a laptop CPU.

Generates (once) a GTA-like source and a Cityscapes-like target with a real domain gap, prepares
them with the real converters, trains source-only, DAFormer and DIDA (as released, and with our
fixes) with a small MiT from random initialisation, evaluates each through the `dida test` path
and prints a comparison table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from dida.errors import Interrupted, UserError

if TYPE_CHECKING:
    from dida.config import ExperimentConfig

NAME = "quickstart"
HELP = "synthetic source->target benchmark: generate, train 4 methods, evaluate, compare (CPU)"
ORDER = 1
DESCRIPTION = """\
The README's first command. Without real datasets or pretrained weights it shows the whole system
working, and adaptation helping, in minutes on a CPU:

  1. generate (cached under --data-root) a GTA-like source and a Cityscapes-like target whose
     scenes share their layout statistics but differ in colour, texture, lighting, blur, noise;
  2. train source-only, DAFormer, DIDA as released (`dida`, the arithmetic of experiments 7
     and 8) and DIDA with our fixes (`dida_intended`, as `7-intended`), with the config
     `quickstart` (see `dida experiments`);
  3. evaluate each on the target val split with `dida test` and print a comparison table.

No pretrained weights exist offline, so the encoder starts from random initialisation and the
ImageNet feature distance is switched off. `--methods mic dida_mic` trains MIC (masked image
consistency, 8-px blocks on the 128-px crops) on DAFormer and on DIDA as released; they are not
part of the default run.

Runs train side by side, each in its own process with its share of the CPU threads (--jobs; on
2 cores: 2 runs with 1 thread each, about 1.25x the throughput of one run with 2 threads,
measured). A run's numbers depend on its thread count, so --jobs and --threads are part of a
result. So that the jobs finish together, a run may be split between two jobs: one trains its
first iterations and checkpoints, the other continues it later, exactly (the same numbers as a
run trained in one go).

Finished runs are reused: running the same command again (e.g. after Ctrl-C, which stops the
whole quickstart with exit code 130) continues where it stopped. A run folder holding a run with
other settings is refused; choose another --work-dir.
"""

# quickstart method id -> (method.name, the experiment whose DIDA preset it takes)
METHODS = {
    "source_only": ("source_only", None),
    "daformer": ("daformer", None),
    "dida": ("dida", "7"),  # the released code's arithmetic (experiments 7 and 8)
    "dida_intended": ("dida", "7-intended"),  # our fixes of its accidents
    "mic": ("daformer", None),  # MIC(DAFormer), opt-in
    "dida_mic": ("dida", "7"),  # DIDA as released + MIC (a new composition), opt-in
}
# the methods a plain `dida quickstart` trains (its time budget); the others are opt-in
DEFAULT_METHODS = ("source_only", "daformer", "dida", "dida_intended")
# relative training time of a run (one thread, two runs at a time; the quickstart: source-only
# 1:22, DIDA 3:38, DAFormer 3:13, DIDA with our fixes 1:19 + 1:57 split; MIC 1.4x DAFormer,
# DIDA+MIC 1.5x DAFormer before DIDA's instance loss got 0.34 faster): with --jobs > 1
# `plan_jobs` spreads the runs so that the jobs finish together
COST = {"source_only": 1.0, "daformer": 2.35, "dida": 2.66, "dida_intended": 2.39, "mic": 3.3,
        "dida_mic": 3.16}  # fmt: skip
# a split run's parts are multiples of this many iterations (~4 s of a DIDA run here): fine
# enough to end the jobs together, coarse enough that no part is only a few iterations long
SPLIT_STEP = 10

# MIC at the quickstart's scale: 8-px blocks on the 128-px crop keep the published 16×16 grid
# of blocks (64 px on HRDA's 1024 crops, 32 px on DAFormer's 512 crops); ratio 0.7, λ 1
MIC_OVERRIDES = ["method.mic.enabled=true", "method.mic.block_size=8"]
# the DIDA preset fields a quickstart run takes from an experiment (the bank is filled online
# here: the shipped banks are 256-d, the quickstart model's embedding is smaller)
PRESET_FIELDS = {
    "bank": ("update_rule", "update_mode"),
    "instance": ("calibrate", "calibrate_source", "resolution", "safe_normaliser", "normalisation",
                 "target_pixels_only", "a_smooth"),
    "teacher": ("bn",),
}  # fmt: skip


def preset_overrides(method: str) -> list[str]:
    """`--set` items that give the quickstart run `method`'s configuration."""
    from dida.experiments import find_experiment

    name, exp = METHODS[method]
    overrides = [f"method.name={name}", *(MIC_OVERRIDES if method.endswith("mic") else [])]
    if exp is not None:
        preset = find_experiment(exp).config.method
        for group, fields in PRESET_FIELDS.items():
            for key in fields:
                value = getattr(getattr(preset, group), key)
                overrides.append(f"method.{group}.{key}={str(value).lower()}")
    return overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=1,
                        help="train every method with seeds 0..N-1 (default 1)")  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        choices=list(METHODS),
                        help=f"methods to train (default: {' '.join(DEFAULT_METHODS)}; mic and "
                        "dida_mic add MIC's masked-target loss, 8-px blocks)")  # fmt: skip
    parser.add_argument("--iters", type=int, help="training iterations (default: the config's)")
    parser.add_argument("--data-root", type=Path,
                        help="benchmark folder (default: data/synthetic in the project "
                        "folder)")  # fmt: skip
    parser.add_argument("--work-dir", type=Path,
                        help="run directories (default: work_dirs/quickstart in the project "
                        "folder)")  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override for every run")  # fmt: skip
    parser.add_argument("--nproc", type=int, default=2,
                        help="processes for data generation (default 2)")  # fmt: skip
    parser.add_argument("--jobs", type=int,
                        help="runs trained at once, each in its own process with an equal share "
                        "of the threads that --threads gives the quickstart (default: one run "
                        "per thread, at most one per run; 1: one after another in this process "
                        "with every thread)")  # fmt: skip


def _config(args: argparse.Namespace, method: str, seed: int, gen: dict):  # noqa: ANN202
    from dida.config import load_config
    from dida.experiments import find_experiment

    overrides = [
        *preset_overrides(method),
        f"train.seed={seed}",
        f"data.source.root={gen['gta_root']}",
        f"data.target.root={gen['cityscapes_root']}",
        f"data.val.root={gen['cityscapes_root']}",
        *([f"train.max_iters={args.iters}"] if args.iters is not None else []),
        *args.overrides,
    ]
    return load_config(find_experiment("quickstart").path, overrides)


def _check_args(args: argparse.Namespace) -> None:
    """One-line errors for arguments that cannot run; defaults in the project folder."""
    from dida.config import project_root
    from dida.io_safety import check_writable_dir

    for name in ("seeds", "iters", "nproc", "jobs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} {value}: expected 1 or more")
    args.data_root = args.data_root or project_root() / "data" / "synthetic"
    args.work_dir = args.work_dir or project_root() / "work_dirs" / "quickstart"
    check_writable_dir(args.data_root, what="--data-root folder")
    check_writable_dir(args.work_dir, what="--work-dir folder")


def _existing_run(cfg, run_dir: Path) -> str | None:  # noqa: ANN001
    """`auto` to continue (or reuse) a run of the same settings in `run_dir`; None if empty.

    Raises `UserError` when `run_dir` holds a run with other settings (nothing is overwritten).
    """
    from dida.config import config_to_dict, resolve_paths
    from dida.engine.run_dir import holds_run

    if not holds_run(run_dir):
        return None
    wanted = json.loads(json.dumps(config_to_dict(resolve_paths(cfg, Path.cwd()))))
    saved_file = run_dir / f"{cfg.name}.json"
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
    if saved != wanted:
        diff = _first_difference(saved, wanted) or "its config file is missing"
        raise UserError(
            f"{run_dir}: holds a run with other settings ({diff}); use another --work-dir, or "
            "remove that folder"
        )
    return "auto"


def _first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found = _first_difference(x, y, f"{prefix}{key}.")
            if found:
                return found
        elif x != y:
            return f"{prefix}{key}: {json.dumps(x)} there, {json.dumps(y)} now"
    return None


def _train_and_test(
    cfg, run_dir: Path, job: bool = False, stop_at: int | None = None  # noqa: ANN001
) -> dict | None:
    """Train (or continue, or reuse) the run in `run_dir` and evaluate it; its results.json.

    `job`: in a job process, whose console other jobs share (the evaluation stays quiet).
    `stop_at`: train up to that iteration only (a split run's first part), no evaluation; None.
    """
    from dida.cli.main import main
    from dida.engine.checkpoint import find_latest
    from dida.engine.train import train

    resume = _existing_run(cfg, run_dir)
    results = run_dir / "preds" / "results.json"
    latest = find_latest(run_dir) if resume else None
    done = _iteration(latest) if latest is not None else 0
    if stop_at is not None:
        if done < stop_at:
            train(cfg, run_dir, resume=resume, stop_at=stop_at)
        return None
    finished = done >= cfg.train.max_iters
    if finished and results.is_file() and results.stat().st_mtime >= latest.stat().st_mtime:
        print("      finished earlier: reusing its results", flush=True)
        return json.loads(results.read_text())
    train(cfg, run_dir, resume=resume)
    test = ["test", str(run_dir), "--show-dir", str(run_dir / "preds"), "--quiet"]
    if job:  # the other jobs keep the other cores busy: data-loading processes would only
        test += ["--set", "eval.num_workers=0"]  # take time from them (the same results)
    with contextlib.redirect_stdout(io.StringIO()) if job else contextlib.nullcontext():
        code = main(test)
    if code == 130:
        raise KeyboardInterrupt
    if code != 0:
        raise UserError(f"evaluation of {run_dir} failed (exit code {code})")
    return json.loads(results.read_text())


def _iteration(checkpoint: Path) -> int:
    from dida.engine.checkpoint import load_checkpoint

    return int(load_checkpoint(checkpoint, mmap=True)["iteration"])


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _table(results: dict[str, list[dict]]) -> str:
    """Method × (mIoU, per-class IoU over the classes present in the val labels), seed means."""
    first = next(iter(results.values()))[0]
    classes = [c for c, acc in first["Acc"].items() if acc is not None]
    short = {c: c.replace("traffic ", "t.")[:8] for c in classes}
    header = ["method", "mIoU"] + [short[c] for c in classes]
    rows = []
    for method, runs in results.items():
        row = [method, f"{100 * _mean([r['mIoU'] for r in runs]):.2f}"]
        row += [f"{100 * _mean([r['IoU'][c] for r in runs]):.1f}" for c in classes]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(  # method names left, numbers right
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
    ) + " |"  # fmt: skip
    line = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), line, *[fmt(r) for r in rows]])


def _say(line: str) -> None:
    """Print `line` in one write, so that job processes sharing the console do not split it."""
    print(line + "\n", end="", flush=True)


class _Run(NamedTuple):
    n: int  # 1-based, in the order seed-major, then --methods
    seed: int
    method: str
    cfg: ExperimentConfig
    run_dir: Path

    def announce(self, total: int, part: tuple[int, int] | None = None) -> None:
        iters = self.cfg.train.max_iters
        what = f"{iters} iterations" if part is None else f"iterations {part[0]}-{part[1]}/{iters}"
        _say(f"[2/3] run {self.n}/{total}, seed {self.seed}: {self.method} ({what}) -> "
             f"{self.run_dir}")  # fmt: skip

    def stopped(self, total: int) -> Interrupted:
        return Interrupted(
            f"quickstart stopped at run {self.n}/{total} ({self.method}, seed {self.seed}); "
            "nothing partial is scored, finished runs are kept: run the same command again to "
            "continue"
        )


def _cpu_threads() -> int:
    """The threads this quickstart may use: --threads or OMP_NUM_THREADS (the CLI sets it when
    other work keeps cores busy), else one per CPU it may run on."""
    from dida.cli.main import cpu_ids

    with contextlib.suppress(ValueError):
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    return len(cpu_ids()) or os.cpu_count() or 1


class _Part(NamedTuple):
    """Iterations `start` to `stop` (None: to the end, then the evaluation) of a run, trained by
    one job; `start` > 0 continues the part another job trains first."""

    run: _Run
    start: int
    stop: int | None


def plan_jobs(runs: list[_Run], jobs: int) -> list[list[_Part]]:
    """What each of `jobs` processes trains, in order, so that they finish together.

    McNaughton's wrap-around rule on the runs' estimated times (`COST` x iterations): the jobs are
    filled one after another up to T = max(longest run, total / jobs); the run that crosses T is
    split at a multiple of `SPLIT_STEP` iterations: its first iterations open the next job, its
    last ones close this job (their times never overlap, as no run is longer than T; the job
    waits if they would). Exact resume (the logged interval means included, whatever the split)
    makes a split run the run trained in one go.
    """
    cost = {r.n: COST.get(r.method, 1.0) * r.cfg.train.max_iters for r in runs}
    limit = max(max(cost.values()), sum(cost.values()) / jobs)
    plan: list[list[_Part]] = [[] for _ in range(jobs)]
    job, load = 0, 0.0
    for run in sorted(runs, key=lambda r: (-cost[r.n], r.n)):
        iters = run.cfg.train.max_iters
        if job < jobs - 1 and load + cost[run.n] > limit:
            # the first `head` iterations go to the next job
            step = max(1, min(SPLIT_STEP, iters))
            head = round((1.0 - (limit - load) / cost[run.n]) * iters / step) * step
            if head >= iters:  # (nearly) nothing fits here: the whole run opens the next job
                job, load = job + 1, 0.0
            elif head > 0:
                plan[job].append(_Part(run, head, None))
                job, load = job + 1, cost[run.n] * head / iters
                plan[job].append(_Part(run, 0, head))
                continue
        plan[job].append(_Part(run, 0, None))
        load += cost[run.n]
        if job < jobs - 1 and load >= limit:
            job, load = job + 1, 0.0
    return [parts for parts in plan if parts]


_stop = None  # in a job process: the quickstart's "stop" event (Ctrl-C)
_ready = None  # in a job process: {run n: event set when the first part of a split run is done}


def _init_job(threads: int, stop, ready) -> None:  # noqa: ANN001
    """A job process: its own process group, so that Ctrl-C on the terminal reaches the
    quickstart alone, which then stops each job once (a second Ctrl-C: at once)."""
    global _stop, _ready
    _stop, _ready = stop, ready
    if hasattr(os, "setpgrp"):  # POSIX
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a training installs its own handler
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from dida.cli.main import quiet_library_warnings

    quiet_library_warnings()
    import torch

    torch.set_num_threads(threads)


def _job(part: _Part, total: int) -> tuple[int, str, dict | None]:
    """One part of a run in a job process: (n, "done", results), (n, "paused", None) after a
    split run's first part, or (n, "stopped", None) when Ctrl-C stopped it."""
    from dida.engine.logging import set_console_tag

    run = part.run
    if part.start > 0:  # the other job trains the first iterations
        while not _ready[run.n].wait(0.5):
            if _stop is not None and _stop.is_set():
                return run.n, "stopped", None
    if _stop is not None and _stop.is_set():  # queued before Ctrl-C: not started
        return run.n, "stopped", None
    set_console_tag(f"[{run.method} seed {run.seed}]")
    whole = part.start == 0 and part.stop is None
    run.announce(total, None if whole else (part.start, part.stop or run.cfg.train.max_iters))
    try:
        result = _train_and_test(run.cfg, run.run_dir, job=True, stop_at=part.stop)
    except KeyboardInterrupt:  # TrainingInterrupted: the checkpoint is written
        return run.n, "stopped", None
    return (run.n, "paused", None) if part.stop is not None else (run.n, "done", result)


def _stop_jobs(futures: list, stop) -> None:  # noqa: ANN001
    """Ctrl-C: cancel the runs not started and stop the running ones once (they finish their
    iteration and write a checkpoint); another Ctrl-C while waiting stops them at once."""
    import multiprocessing
    from concurrent.futures import wait

    stop.set()
    for future in futures:
        future.cancel()
    while True:
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGINT)
        try:
            wait(futures)
            return
        except KeyboardInterrupt:
            continue


def _run_jobs(runs: list[_Run], jobs: int, threads: int) -> dict[int, dict]:
    """Train and evaluate `runs` in `jobs` processes as `plan_jobs` spreads them; {n: results}.
    Raises `Interrupted` naming the first run that Ctrl-C left unfinished."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    plan = plan_jobs(runs, jobs)
    results: dict[int, dict] = {}
    context = multiprocessing.get_context("spawn")  # no forked copy of this process's threads
    stop = context.Event()
    ready = {p.run.n: context.Event() for parts in plan for p in parts if p.stop is not None}
    with contextlib.ExitStack() as pools:
        futures = []
        for parts in plan:  # one single-process pool per job: its parts run in order
            pool = pools.enter_context(ProcessPoolExecutor(
                1, mp_context=context, initializer=_init_job, initargs=(threads, stop, ready)
            ))  # fmt: skip
            futures += [pool.submit(_job, part, len(runs)) for part in parts]
        try:
            for future in as_completed(futures):
                n, status, result = future.result()
                if status == "stopped":  # this job was stopped: stop the others too
                    raise KeyboardInterrupt
                if status == "paused":
                    ready[n].set()
                    continue
                results[n] = result
                run = runs[n - 1]
                _say(f"      {run.method} (seed {run.seed}): mIoU {100 * result['mIoU']:.2f}")
        except KeyboardInterrupt:
            _stop_jobs(futures, stop)
            for future in futures:  # runs that finished while the others stopped count
                if not future.cancelled() and future.exception() is None:
                    n, status, result = future.result()
                    if status == "done":
                        results[n] = result
            first = min(run.n for run in runs if run.n not in results)
            raise runs[first - 1].stopped(len(runs)) from None
        except BrokenProcessPool:
            _stop_jobs(futures, stop)
            raise UserError(
                "a quickstart job process died (out of memory?); try again with --jobs 1"
            ) from None
        except BaseException:
            _stop_jobs(futures, stop)
            raise
    return results


def run(args: argparse.Namespace) -> int:
    from dida.data.benchmark import make_synthetic_benchmark
    from dida.engine.logging import format_duration
    from dida.io_safety import atomic_write

    _check_args(args)
    start = time.perf_counter()
    print(f"[1/3] synthetic benchmark in {args.data_root} ...", flush=True)
    gen = make_synthetic_benchmark(args.data_root, nproc=args.nproc)
    how = "reused" if gen["cached"] else f"generated in {gen['seconds']:.0f} s"
    print(f"      {how}: source {gen['gta_root']}, target {gen['cityscapes_root']}")
    print("      note: no pretrained weights offline: random init, ImageNet feature distance off")
    runs = []
    for seed in range(args.seeds):
        for method in args.methods:
            run = _Run(len(runs) + 1, seed, method, _config(args, method, seed, gen),
                       args.work_dir / f"seed{seed}" / method)  # fmt: skip
            _existing_run(run.cfg, run.run_dir)  # a run of other settings: refused up front
            runs.append(run)
    cpu_threads = _cpu_threads()
    jobs = min(args.jobs or cpu_threads, len(runs))
    if jobs > 1:
        threads = max(1, cpu_threads // jobs)
        print(f"      {len(runs)} runs, {jobs} at a time with {threads} thread(s) each "
              "(--jobs 1: one after another)", flush=True)  # fmt: skip
        by_run = _run_jobs(runs, jobs, threads)
    else:
        by_run = {}
        for run in runs:
            run.announce(len(runs))
            try:
                by_run[run.n] = _train_and_test(run.cfg, run.run_dir)
            except KeyboardInterrupt:  # also TrainingInterrupted: the checkpoint is written
                raise run.stopped(len(runs)) from None
            print(f"      {run.method}: mIoU {100 * by_run[run.n]['mIoU']:.2f}", flush=True)
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for run in runs:
        results[run.method].append(by_run[run.n])
    print(f"[3/3] target val mIoU (mean over {args.seeds} seed(s)), per-class IoU:\n")
    print(_table(results))
    if "source_only" in results:
        base = _mean([r["mIoU"] for r in results["source_only"]])
        gains = [f"{m} {100 * (_mean([r['mIoU'] for r in rs]) - base):+.2f}"
                 for m, rs in results.items() if m != "source_only"]  # fmt: skip
        if gains:
            print("\ngain over source-only: " + ", ".join(gains))
    summary = {m: [r["mIoU"] for r in rs] for m, rs in results.items()}
    atomic_write(args.work_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"\nprediction images: {args.work_dir}/seed*/<method>/preds/   "
          f"summary: {args.work_dir / 'summary.json'}")  # fmt: skip
    print(f"total time {format_duration(time.perf_counter() - start)}")
    return 0
