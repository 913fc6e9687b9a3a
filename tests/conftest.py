"""Shared pytest setup: `slow` tests run only with --runslow (CI passes it when time allows);
under pytest-xdist (`make test`) each test process computes with one thread."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The test processes of `pytest -n N` share the cores: with one thread each (and in the processes
# the tests start), `make test` took 2:09 on a 2-core CPU, 4:19 with PyTorch's default of one
# thread per core, and 3:29 in a single process. OMP_NUM_THREADS set by hand is kept.
if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("OMP_NUM_THREADS"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_uda_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GTA-format source and Cityscapes-format target (train + val), converted."""
    from dida.cli.main import main
    from dida.data.synthetic import make_cityscapes, make_gta

    root = tmp_path_factory.mktemp("uda")
    make_gta(root / "gta", 6, size=(72, 96), seed=1)
    make_cityscapes(root / "cityscapes", 4, size=(64, 128), seed=2)
    assert main(["convert", "gta", str(root / "gta"), "--nproc", "1"]) == 0
    assert main(["convert", "cityscapes", str(root / "cityscapes"), "--nproc", "1"]) == 0
    return root


def tiny_overrides(root: Path, method: str = "daformer", iters: int = 4) -> list[str]:
    """`--set` overrides that make any experiment run in seconds on the CPU."""
    return [
        f"method.name={method}",
        "model.variant=mit_tiny",
        "model.embed_dim=16",
        "model.pretrained=null",
        "model.dilations=[1,2]",
        f"data.source.root={root / 'gta'}",
        "data.source.scale=[96,72]",
        f"data.target.root={root / 'cityscapes'}",
        "data.target.scale=[128,64]",
        f"data.val.root={root / 'cityscapes'}",
        "data.val.scale=[128,64]",
        "data.crop_size=[48,48]",
        "data.num_workers=0",
        "data.rcs.min_pixels=100",
        "method.teacher.ignore_top=2",
        "method.teacher.ignore_bottom=4",
        "method.feat_dist.enabled=false",
        "method.bank.size=12",
        "method.bank.init=online",  # the shipped banks need embed_dim 256 (tests with them set it)
        "method.bank.update_interval=2",
        f"train.max_iters={iters}",
        "train.log_interval=1",
        "train.checkpoint_interval=2",
        "train.eval_interval=0",
        "train.debug_interval=0",
        "train.tensorboard=false",
        "train.device=cpu",
        "optim.warmup_iters=2",
        "eval.scale=[128,64]",
    ]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for gloo process groups)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """A worker's gloo process group on localhost, one thread; torn down with
    `dida.engine.distributed.cleanup()` (a bare `destroy_process_group` could deadlock on
    torch 2.3)."""
    import torch.distributed as dist

    from dida.engine.distributed import cleanup

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        cleanup()


def run_two_ranks(fn: Callable, out: object, timeout: float = 60.0) -> None:
    """Run `fn(rank, 2, port, out)` in 2 new processes; fail (not hang) after `timeout`.

    Spawned, not forked: a fork of a test process that runs threads (a progress bar's monitor,
    the profiler's) copies any lock held at that moment. The workers run in `gloo_group`:
    torch 2.3's gloo could deadlock in a bare `destroy_process_group` (a rank of two CI runs hung
    there; they take ~3 s)."""
    ctx = mp.start_processes(
        fn, args=(2, free_port(), out), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"DDP workers did not finish in {timeout} s")
