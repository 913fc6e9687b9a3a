"""Training checkpoints: one dict per file, written atomically, read with `weights_only=True`.

Layout: format, version, config (dict), iteration (the next iteration to run), student, teacher,
method (DIDA: the instance bank), optimizer, scaler, rng (python, numpy, torch,
cuda, method generator). `latest.pth` is replaced atomically; `iter_<N>.pth` are periodic keeps.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dida.errors import CheckpointError
from dida.io_safety import atomic_output, atomic_write

FORMAT = "dida"
VERSION = 1


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`.

    Raises `WriteError` ("... cannot write checkpoint: no space left on device") on a failed
    write; `path` is then unchanged.
    """
    atomic_write(path, lambda f: torch.save(obj, f), what="checkpoint")


def atomic_link(src: str | Path, path: str | Path) -> None:
    """Make `path` a hard link to `src`, replacing it atomically (a copy where links fail)."""
    with atomic_output(path, what="checkpoint") as tmp:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(src, tmp)


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict:
    """Read one of our checkpoints; errors name the file and what was expected.

    `mmap=True` maps the tensors instead of reading them (cheap when only `config` is needed).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    from dida.models.weights import check_weights_file

    check_weights_file(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a dida training checkpoint (no format='dida' entry)")
    return ckpt


def rng_state(generator: torch.Generator | None = None) -> dict:
    np_state = np.random.get_state(legacy=False)
    py_version, py_state, _ = random.getstate()
    state = {
        "python": list(py_state),
        "python_version": py_version,
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), None))
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {
                "key": state["numpy"]["key"].numpy().astype(np.uint32),
                "pos": state["numpy"]["pos"],
            },
            "has_gauss": 0,
            "gauss": 0.0,
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def _periodic(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The run's `iter_<N>.pth` files, oldest first."""
    return sorted(
        (int(m.group(1)), p)
        for p in Path(run_dir).glob("iter_*.pth")
        if (m := re.fullmatch(r"iter_(\d+)\.pth", p.name))
    )


def find_latest(run_dir: str | Path) -> Path | None:
    """`latest.pth` if present, else the `iter_<N>.pth` with the largest N."""
    latest = Path(run_dir) / "latest.pth"
    if latest.is_file():
        return latest
    iters = _periodic(run_dir)
    return iters[-1][1] if iters else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` periodic `iter_<N>.pth` files."""
    iters = _periodic(run_dir)
    for _, path in iters[: max(0, len(iters) - keep)]:
        path.unlink(missing_ok=True)
