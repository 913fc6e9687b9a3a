"""Logging setup (console + file on rank 0), a JSONL metric writer and optional TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

LOGGER_NAME = "dida"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each record (tools and tests swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def setup_logging(log_file: Path | None, is_main: bool = True) -> logging.Logger:
    """Configure the `dida` logger: INFO to stderr and `log_file` on rank 0, WARNING elsewhere."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    console = _StderrHandler()
    console.setFormatter(fmt)
    logger.addHandler(console)
    if is_main and log_file is not None:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
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
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
