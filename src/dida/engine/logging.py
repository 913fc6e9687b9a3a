"""Logging setup (console + file on rank 0), a JSONL metric writer and optional TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

LOGGER_NAME = "dida"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each record (tools and tests swap it),
    above a progress bar when one is shown."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if not Progress.active:
            super().emit(record)
            return
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001  (as logging.Handler.emit)
            self.handleError(record)

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


# this process's name on a console that other processes share (`dida quickstart --jobs N`): its
# log lines carry it, and it draws no progress bar (its iteration log lines show the progress)
_console_tag = ""


def set_console_tag(tag: str) -> None:
    global _console_tag
    _console_tag = tag


def setup_logging(log_file: Path | None, is_main: bool = True) -> logging.Logger:
    """Configure the `dida` logger: INFO to stderr and `log_file` on rank 0, WARNING elsewhere."""
    teardown_logging()
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    line = "%(asctime)s {}%(levelname)s %(message)s"  # {}: the console tag (the file has none)
    fmt = logging.Formatter(line.format(""), datefmt="%H:%M:%S")
    console = _StderrHandler()
    tag = f"{_console_tag} " if _console_tag else ""
    console.setFormatter(logging.Formatter(line.format(tag), datefmt="%H:%M:%S"))
    logger.addHandler(console)
    if is_main and log_file is not None:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
        # library warnings captured by the CLI (`py.warnings`) go into the log, not the console
        warnings_logger = logging.getLogger("py.warnings")
        warnings_logger.addHandler(file_handler)
    return logger


class MetricWriter:
    """Appends one JSON object per line to `metrics.jsonl`; mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))
            except ImportError:  # tensorboard is optional at run time
                logging.getLogger(__name__).warning(
                    "tensorboard not installed; scalars only in JSONL"
                )

    def write(self, iteration: int, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"iter": iteration, "kind": kind, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, iteration)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _json_default(obj: Any) -> Any:
    """Tensors and arrays as lists, anything else as its string."""
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


def teardown_logging() -> None:
    """Remove the handlers `setup_logging` installed (closing the log file)."""
    logger = logging.getLogger(LOGGER_NAME)
    warnings_logger = logging.getLogger("py.warnings")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        if handler in warnings_logger.handlers:
            warnings_logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


PLAIN_PROGRESS_SECONDS = 30.0


class Progress:
    """Iteration progress on stderr: a tqdm bar on a terminal, else a plain line every
    `PLAIN_PROGRESS_SECONDS` (so that a log file or CI shows that a slow run is alive)."""

    active = 0  # bars on screen: log records then go through tqdm.write

    def __init__(
        self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"
    ) -> None:
        self.total, self.done, self.desc = total, initial, desc
        self.enabled = enabled and total > initial and not _console_tag
        self._bar = None
        self._start = self._last = time.perf_counter()
        self._initial = initial
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="it",
                             dynamic_ncols=True, leave=False, file=sys.stderr)  # fmt: skip
            Progress.active += 1

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        step, self.done = done - self.done, done
        if self._bar is not None:
            self._bar.update(step)
            return
        now = time.perf_counter()
        if now - self._last >= PLAIN_PROGRESS_SECONDS and done < self.total:
            self._last = now
            rate = (done - self._initial) / max(now - self._start, 1e-9)
            eta = format_duration((self.total - done) / max(rate, 1e-9))
            pct = 100 * done / self.total
            sys.stderr.write(
                f"{self.desc} {done}/{self.total} ({pct:.0f}%) {rate:.2f} it/s eta {eta}\n"
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            Progress.active -= 1


def track(iterable: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """`iterable` with a `Progress` (a bar on a terminal, else a plain line every 30 s)."""
    progress = Progress(total, desc=desc)
    try:
        for done, item in enumerate(iterable, 1):
            yield item
            progress.update(done)
    finally:
        progress.close()
