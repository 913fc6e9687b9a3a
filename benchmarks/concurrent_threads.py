"""Thread count and OpenMP wait policy under load: wall time of concurrent short trainings.

Runs `--jobs` copies of `dida train --exp quickstart` (a few iterations on the synthetic
benchmark, generated once under --data-root) at the same time, for every combination of thread
count and OMP_WAIT_POLICY, and prints the wall time of each job and the iterations per second.
This is the measurement behind `dida`'s default thread settings on shared CPUs.

    python benchmarks/concurrent_threads.py --iters 20 --jobs 2 --threads 1 2 \
        --policies passive default
    python benchmarks/concurrent_threads.py --threads 0 --policies auto   # dida's defaults
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run_jobs(args: argparse.Namespace, threads: int, policy: str, work: Path) -> list[float]:
    work = Path(tempfile.mkdtemp(dir=work))  # a fresh folder per measurement
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("OMP_WAIT_POLICY", None)
    if threads > 0:  # 0: dida's own choice (one thread per free core at start)
        env["OMP_NUM_THREADS"] = str(threads)
    # "default": the OpenMP runtime's own policy (spin, then sleep); dida reads an empty value so;
    # "auto": dida's own choice (OpenMP's policy on idle cores, PASSIVE on busy ones)
    if policy != "auto":
        env["OMP_WAIT_POLICY"] = "" if policy == "default" else policy.upper()
    data = args.data_root.resolve()
    cmd = [
        sys.executable, "-m", "dida", "train", "--exp", "quickstart",
        "--set", f"train.max_iters={args.iters}", "--set", "train.debug_interval=0",
        "--set", "train.checkpoint_interval=100000", "--set", f"data.source.root={data / 'gta'}",
        "--set", f"data.target.root={data / 'cityscapes'}",
        "--set", f"data.val.root={data / 'cityscapes'}",
    ]  # fmt: skip
    start = time.perf_counter()
    procs, ends = [], {}
    for j in range(args.jobs):
        run = work / f"t{threads}_{policy}_{j}"
        out = subprocess.DEVNULL
        procs.append(subprocess.Popen([*cmd, "--work-dir", str(run)], env=env, stdout=out,
                                      stderr=subprocess.PIPE))  # fmt: skip
    while len(ends) < len(procs):
        for j, proc in enumerate(procs):
            if j not in ends and proc.poll() is not None:
                ends[j] = time.perf_counter() - start
                if proc.returncode != 0:
                    sys.exit(f"job failed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    return [ends[j] for j in range(len(procs))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20, help="training iterations per job")
    parser.add_argument("--jobs", type=int, default=2, help="concurrent jobs")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="thread counts; 0: dida's own choice")  # fmt: skip
    parser.add_argument("--policies", nargs="+", default=["passive", "default"],
                        choices=["passive", "active", "default", "auto"])  # fmt: skip
    parser.add_argument("--data-root", type=Path, default=Path("data/synthetic"),
                        help="synthetic benchmark folder (generated if absent)")  # fmt: skip
    args = parser.parse_args()

    from dida.data.benchmark import make_synthetic_benchmark

    make_synthetic_benchmark(args.data_root, nproc=2)
    print(f"{args.jobs} concurrent `dida train --exp quickstart` jobs, {args.iters} iterations")
    print(f"{'threads':>7} {'OMP_WAIT_POLICY':>15} {'wall s (each job)':>24} {'it/s per job':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            for policy in args.policies:
                times = _run_jobs(args, threads, policy, Path(tmp))
                each = " ".join(f"{t:6.1f}" for t in times)
                rate = args.iters / max(times)
                print(f"{threads:>7} {policy:>15} {each:>24} {rate:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
