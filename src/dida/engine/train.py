"""The training loop: setup, precision, DDP, schedule, step, checkpoints, evaluation, logging.

`train(cfg, run_dir)` is the only entry point. The method module (`adapt/`) owns the step's content;
this loop owns everything around it: devices, I/O, optimizer, LR, checkpoints and resume.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from dida.config import ExperimentConfig, config_to_dict, resolve_paths, save_config
from dida.engine import checkpoint as ckpt_io
from dida.engine.build import build_method, check_inputs
from dida.engine.distributed import (
    DistInfo,
    barrier,
    broadcast_buffers_,
    cleanup,
    init_distributed,
)
from dida.engine.logging import (
    MetricWriter,
    Progress,
    format_duration,
    setup_logging,
    teardown_logging,
)
from dida.engine.optim import build_optimizer, set_lr
from dida.engine.run_dir import claim_run_dir
from dida.engine.speed import (
    LossWindow,
    StepBackward,
    compiled_graphs,
    prepare_method,
    reuse_freed_memory,
    window_mean,
)
from dida.errors import Interrupted, UserError

log = logging.getLogger("dida.train")


class TrainingDiverged(UserError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(Interrupted):
    """Ctrl-C stopped the training after writing `latest.pth`; the message says how to resume."""


class StreamSampler(Sampler[int]):
    """Yields the global sample indices of one rank: `(start + n) * world + rank`, n = 0, 1, ...

    With `UDADataset.__getitem__(i)` a pure function of (seed, i), this makes the data stream exact
    under resume and independent of the number of loader workers.
    """

    def __init__(self, start: int, rank: int, world_size: int) -> None:
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self) -> Iterator[int]:
        n = self.start
        while True:
            yield n * self.world_size + self.rank
            n += 1

    def __len__(self) -> int:  # DataLoader asks; the stream is endless
        return 2**62


def resolve_device(name: str, dist_info: DistInfo | None = None) -> torch.device:
    """`eval.evaluate.resolve_device`, then the local GPU of this rank under torchrun."""
    from dida.eval.evaluate import resolve_device as resolve

    device = resolve(name)
    if device.type == "cuda" and dist_info is not None and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls and convolutions natively (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(name: str, device: torch.device, training: bool = False) -> torch.dtype:
    """`auto`: bf16 on GPUs that support it; for training also on CPUs with native bf16 (there
    the MiT-B0 512x512 DAFormer step took 9.3 s against 18.2 s in fp32 and the quickstart step
    ran 1.2x faster, at the same quickstart mIoU); else fp32."""
    if name == "auto":
        if device.type == "cuda":
            use_bf16 = torch.cuda.is_bf16_supported()
        else:
            use_bf16 = training and device.type == "cpu" and cpu_has_fast_bf16()
        return torch.bfloat16 if use_bf16 else torch.float32
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise UserError(f"train.precision: '{name}' is not one of auto, fp32, bf16, fp16")
    if name == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        log.warning(  # measured on an AMD EPYC (Zen 3, AVX2, no AVX-512), one thread
            "precision bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): PyTorch computes "
            "bf16 convolutions on a slow fallback here (a 3x3 conv of 2x1024x64x64 to 256 "
            "channels took 161 s in bf16, 0.47 s in fp32); fp32 (or auto) is faster"
        )
    return table[name]


class _StopRequest:
    """First Ctrl-C: finish the current iteration, checkpoint, exit. Second: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        self._pid = os.getpid()
        self._announcer: threading.Thread | None = None

    def __enter__(self) -> _StopRequest:
        with contextlib.suppress(ValueError):  # not in the main thread
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        if os.getpid() != self._pid:  # a data-loader worker forked from the trainer: the
            return  # trainer alone decides (and warns once)
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        # The handler runs in the main thread between two bytecodes, perhaps in the middle of
        # its write to stderr, where a second write raises "reentrant call" and the message is
        # lost; another thread writes it once the main thread's write is done.
        message = "interrupt: finishing this iteration, then writing a checkpoint (again to abort)"
        self._announcer = threading.Thread(target=log.warning, args=(message,), daemon=True)
        self._announcer.start()

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self._announcer is not None:  # the message before whatever is logged next
            self._announcer.join(timeout=5)  # bounded: a second Ctrl-C may unwind at any point


def _save(run_dir: Path, state: dict, iteration: int, keep: int, periodic: bool) -> Path:
    """Write `iter_<N>.pth` (periodic) and point `latest.pth` at it; serialised once."""
    if not periodic:
        ckpt_io.atomic_save(state, run_dir / "latest.pth")
        return run_dir / "latest.pth"
    path = run_dir / f"iter_{iteration}.pth"
    ckpt_io.atomic_save(state, path)
    ckpt_io.atomic_link(path, run_dir / "latest.pth")
    ckpt_io.prune_checkpoints(run_dir, keep)
    return path


def train(
    cfg: ExperimentConfig,
    run_dir: Path,
    resume: str | None = None,
    on_finish: Callable[[torch.nn.Module], None] | None = None,
    stop_at: int | None = None,
) -> dict:
    """Train `cfg` into `run_dir`; returns the last evaluation's numbers (empty if none ran).

    `on_finish(method)` runs on every rank before the process group closes (tests use it).
    `stop_at` < `train.max_iters`: pause after that iteration with `latest.pth` written, to be
    continued with `resume` (in any process: the resumed run is the run trained in one go, its
    logged metrics included).

    Raises:
        RunDirError: `run_dir` holds a run and `resume` is None, or another process trains in it.
        TrainingInterrupted: Ctrl-C stopped the run after `latest.pth` was written.
    """
    locks: list = []
    try:
        return _train(cfg, run_dir, resume, on_finish, locks, stop_at)
    finally:
        for lock in locks:
            lock.release()
        teardown_logging()


def _train(cfg, run_dir, resume, on_finish, locks, stop_at) -> dict:  # noqa: ANN001
    cfg = resolve_paths(cfg, Path.cwd())  # the run's config and checkpoints hold absolute paths
    tcfg = cfg.train
    dist_info = init_distributed(resolve_device(tcfg.device).type)
    device = resolve_device(tcfg.device, dist_info)
    if device.type == "cpu":
        reuse_freed_memory()  # the step's tensors keep their pages from one step to the next
    setup_logging(None, dist_info.is_main)
    dtype = resolve_precision(tcfg.precision, device, training=True)
    check_inputs(cfg)  # user mistakes surface before anything is written
    train_set, val_set = _build_data(cfg)
    if dist_info.is_main:
        locks.append(claim_run_dir(run_dir, resume))  # one writer; no restart over a run
        save_config(cfg, run_dir / f"{cfg.name}.json")
    barrier()
    setup_logging(run_dir / "train.log", dist_info.is_main)
    if dist_info.is_main:
        _log_size_mismatches(train_set.source)
    torch.manual_seed(tcfg.seed + dist_info.rank)
    method = build_method(cfg, train_set, device, rank=dist_info.rank)
    student = method.student
    if dist_info.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
        method.set_student_forward(ddp)
    prepare_method(method, tcfg.compile, dtype, dist_info.enabled, tcfg.compile_mode)
    optimizer = build_optimizer(student, cfg.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start, best, unlogged = _maybe_resume(resume, run_dir, method, optimizer, scaler, device)
    writer = MetricWriter(run_dir, tcfg.tensorboard, enabled=dist_info.is_main)
    end = tcfg.max_iters if stop_at is None else max(start, min(stop_at, tcfg.max_iters))
    log.info(
        "training %s (%s) on %s, %s, %d process(es), iterations %d -> %d%s, run dir %s",
        cfg.name, cfg.method.name, device, str(dtype).removeprefix("torch."),
        dist_info.world_size, start, end,
        f" (then a pause; of {tcfg.max_iters})" if end < tcfg.max_iters else "", run_dir,
    )  # fmt: skip
    loader = _train_loader(cfg, train_set, start, dist_info)
    result: dict = {}

    backward = StepBackward(student.parameters(), scaler.scale, foreach=not dist_info.enabled)

    def state(iteration: int) -> dict:
        # the metrics read since the last log line travel along: a run resumed between two log
        # lines logs the means of the whole interval, as the run trained in one go
        return {**_checkpoint_state(cfg, iteration, method, optimizer, scaler), "best": best,
                "unlogged": unlogged}  # fmt: skip

    t_start, t_window, n_window = time.perf_counter(), time.perf_counter(), 0
    window = LossWindow()  # the step's metrics stay on the device until read
    graphs = compiled_graphs() if tcfg.compile != "false" else 0
    progress = Progress(tcfg.max_iters, start, enabled=dist_info.is_main)
    stopped_at = None
    with _StopRequest() as stop:
        for iteration, batch in zip(range(start, end), loader, strict=False):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            lr = set_lr(optimizer, iteration, cfg.optim, tcfg.max_iters)
            optimizer.zero_grad(set_to_none=True)
            method.update_teacher(iteration)
            want_images = tcfg.debug_interval > 0 and iteration % tcfg.debug_interval == 0
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                step = method.forward_backward(batch, iteration, backward, want_images)
            window.add(iteration, step.losses)
            scaler.step(optimizer)
            scaler.update()
            done = iteration + 1
            n_window += 1
            progress.update(done)
            # BN statistics of rank 0 everywhere, before the teacher, evaluation or a checkpoint
            # reads them (a no-op without DDP)
            broadcast_buffers_(student)
            is_last = done == tcfg.max_iters
            pause = done == end and not is_last  # `stop_at`: checkpoint, continue elsewhere
            log_now = done % tcfg.log_interval == 0 or is_last
            eval_now = tcfg.eval_interval > 0 and (is_last or done % tcfg.eval_interval == 0)
            if (log_now or eval_now or done % tcfg.checkpoint_interval == 0 or stop.requested
                    or pause):  # fmt: skip
                # the only host read of the metrics: no other step waits for the device
                steps = window.read()
                _check_finite(steps)
                unlogged = unlogged + steps  # the interval's steps read so far
            if log_now and tcfg.compile != "false" and compiled_graphs() != graphs:
                log.info("torch.compile: %d graphs (+%d since the last log)",
                         compiled_graphs(), compiled_graphs() - graphs)  # fmt: skip
                graphs = compiled_graphs()
            if dist_info.is_main and log_now:
                speed = n_window / (time.perf_counter() - t_window)
                eta = (tcfg.max_iters - done) / max(speed, 1e-9)
                mean = window_mean(unlogged)
                losses = " ".join(f"{k} {v:.4f}" for k, v in mean.items())
                log.info(
                    "iter %d/%d  %.2f it/s  eta %s  lr %.3g  %s",
                    done,
                    tcfg.max_iters,
                    speed,
                    format_duration(eta),
                    lr,
                    losses,
                )
                writer.write(done, "train", {"lr": lr, "it_per_s": speed, **mean})
                t_window, n_window = time.perf_counter(), 0
            if log_now:
                unlogged = []
            if dist_info.is_main and step.images:
                _write_debug(run_dir, iteration, step.images)
            new_best = False
            # evaluation before the checkpoint, so that the checkpoint knows the best so far
            if eval_now:
                result = _evaluate(cfg, method, val_set, device, done, writer, dist_info)
                miou = result.get("mIoU")
                if miou is not None and math.isfinite(miou) and miou > best.get("mIoU", -1.0):
                    best, new_best = {"mIoU": float(miou), "iteration": done}, tcfg.save_best
            saved = None
            if dist_info.is_main and (is_last or done % tcfg.checkpoint_interval == 0):
                saved = _save(run_dir, state(done), done, tcfg.keep_checkpoints, periodic=True)
            if (stop.requested or pause) and dist_info.is_main and saved is None:
                saved = _save(run_dir, state(done), done, tcfg.keep_checkpoints, periodic=False)
            if new_best and dist_info.is_main:
                _save_best(run_dir, saved, state(done) if saved is None else None, best)
            if stop.requested:
                stopped_at = done
                break
    progress.close()
    if end < tcfg.max_iters and stopped_at is None:
        log.info("paused at iteration %d/%d, checkpoint %s/latest.pth written", end,
                 tcfg.max_iters, run_dir)  # fmt: skip
    log.info("finished in %s", format_duration(time.perf_counter() - t_start))
    writer.close()
    if on_finish is not None:
        on_finish(method)
    cleanup()  # after a barrier
    if stopped_at is not None and stopped_at < tcfg.max_iters:
        raise TrainingInterrupted(
            f"stopped at iteration {stopped_at}/{tcfg.max_iters}, checkpoint {run_dir}/latest.pth "
            f"written; continue with: dida train --resume {run_dir}"
        )
    return result


def _save_best(run_dir: Path, saved: Path | None, state: dict | None, best: dict) -> None:
    """`best.pth`: a link to this iteration's checkpoint, or its own file if none was written."""
    if saved is not None:
        ckpt_io.atomic_link(saved, run_dir / "best.pth")
    else:
        ckpt_io.atomic_save(state, run_dir / "best.pth")
    log.info("best.pth: mIoU %.2f at iteration %d", 100 * best["mIoU"], best["iteration"])


def _log_size_mismatches(source) -> None:  # noqa: ANN001
    """GTA5 has image/label pairs of different sizes: say how many (the loader resizes them)."""
    mismatched = source.size_mismatches()
    if mismatched:
        log.warning(
            "%d of %d source image/label pairs differ in size; their labels are resized to the "
            "image (nearest), e.g. %s", len(mismatched), len(source), mismatched[0],
        )  # fmt: skip


def _build_data(cfg: ExperimentConfig) -> tuple:
    from dida.data.uda import build_train_dataset, build_val_dataset

    train_set = build_train_dataset(cfg.data, seed=cfg.train.seed)
    val_set = None
    if cfg.train.eval_interval > 0:
        val_set = build_val_dataset(cfg.data.val, cfg.eval.scale)
    return train_set, val_set


def _train_loader(cfg: ExperimentConfig, dataset, start: int, dist_info: DistInfo) -> DataLoader:
    batch = cfg.data.batch_size
    sampler = StreamSampler(start * batch, dist_info.rank, dist_info.world_size)
    workers = cfg.data.num_workers
    # the loader's own generator keeps iterator creation from drawing on the global torch RNG,
    # which a resumed run restores before the loader starts
    generator = torch.Generator().manual_seed(cfg.train.seed)
    return DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None, generator=generator,
    )  # fmt: skip


def _maybe_resume(
    resume, run_dir, method, optimizer, scaler, device  # noqa: ANN001
) -> tuple[int, dict, list]:
    """(first iteration, best evaluation so far, the metrics of the steps since the last log line)
    of a resumed run; (0, {}, []) for a new one."""
    if resume is None:
        return 0, {}, []
    path = ckpt_io.find_latest(run_dir) if resume == "auto" else Path(resume)
    if path is None:
        log.info("--resume auto: no checkpoint in %s, starting from scratch", run_dir)
        return 0, {}, []
    ckpt = ckpt_io.load_checkpoint(path, map_location=device)
    method.load_training_state(ckpt)
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    ckpt_io.set_rng_state(ckpt["rng"], method.generator)
    log.info("resumed from %s at iteration %d", path, ckpt["iteration"])
    # (older checkpoints carry none: a resume between log lines then logs the rest's means)
    unlogged = [(int(it), dict(metrics)) for it, metrics in ckpt.get("unlogged") or []]
    return int(ckpt["iteration"]), dict(ckpt.get("best") or {}), unlogged


def _checkpoint_state(cfg, iteration, method, optimizer, scaler) -> dict:  # noqa: ANN001
    return {
        "format": ckpt_io.FORMAT,
        "version": ckpt_io.VERSION,
        "config": config_to_dict(cfg),
        "iteration": iteration,
        **method.training_state(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": ckpt_io.rng_state(method.generator),
    }


def _check_finite(steps: list[tuple[int, dict[str, float]]]) -> None:
    """Stop at the first non-finite metric of the steps read (before any checkpoint is written)."""
    for iteration, losses in steps:
        for name, value in losses.items():
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"loss '{name}' is {value} at iteration {iteration}; stopped, the last good "
                    "checkpoint is kept (try a lower optim.lr or train.precision=fp32)"
                )


def _evaluate(cfg, method, val_set, device, iteration, writer, dist_info) -> dict:  # noqa: ANN001
    from dida.eval.evaluate import evaluate
    from dida.eval.metrics import format_results, to_jsonable

    if val_set is None:
        return {}
    ecfg = cfg.eval
    result = evaluate(
        method.student, val_set, num_classes=cfg.model.num_classes, mode=ecfg.mode,
        crop_size=ecfg.crop_size, stride=ecfg.stride, batched_slide=ecfg.batched_slide,
        device=device, subsets=ecfg.subsets or None, progress=dist_info.is_main,
    )  # fmt: skip
    if dist_info.is_main:
        log.info("evaluation at iteration %d\n%s", iteration, format_results(result))
        writer.write(iteration, "val", to_jsonable(result))
    return result


def _write_debug(run_dir: Path, iteration: int, images: dict) -> None:
    from dida.engine.debug_vis import write_debug_panel

    write_debug_panel(run_dir / "debug", iteration, images)
