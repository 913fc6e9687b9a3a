"""Reading and writing instance-bank files: the original `embedding_cache` npz pair
(`f_buffer_s.npz` / `l_buffer_s.npz`, one array `arr_0` each) and our own (.pt / .safetensors).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dida.errors import DataError

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).resolve().parents[1] / "data" / "banks"


def builtin_banks() -> list[str]:
    """Names of the banks shipped with the package (`data/banks/<name>/`)."""
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "f_buffer_s.npz").is_file())


def resolve_bank_path(path: str | Path) -> Path:
    """`builtin:<name>` -> the shipped `embedding_cache` folder; any other path unchanged."""
    text = str(path)
    if not text.startswith(BUILTIN_PREFIX):
        return Path(path)
    name = text[len(BUILTIN_PREFIX) :]
    if name not in builtin_banks():
        raise DataError(f"{text}: no such shipped bank (known: {', '.join(builtin_banks())})")
    return BUILTIN_DIR / name


def _read_npz_array(path: Path) -> torch.Tensor:
    import numpy as np

    if not path.is_file():
        raise DataError(f"{path}: bank file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.keys())
            if "arr_0" not in keys and len(keys) != 1:
                raise DataError(f"{path}: expected one array 'arr_0', found {keys}")
            return torch.from_numpy(data["arr_0" if "arr_0" in keys else keys[0]].copy())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read npz: {str(err).splitlines()[0]}") from None


def _read_pair(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The original `embedding_cache` layout: f_buffer_s.npz and l_buffer_s.npz side by side."""
    if path.is_dir():
        f_path, l_path = path / "f_buffer_s.npz", path / "l_buffer_s.npz"
        if not f_path.is_file():  # a folder of bank folders, as the original embedding_cache/
            below = sorted(p.parent.name for p in path.glob("*/f_buffer_s.npz"))
            if below:
                raise DataError(
                    f"{path}: no f_buffer_s.npz here; bank folders below it: {', '.join(below)}"
                )
    elif path.name.startswith("f_buffer"):
        f_path, l_path = path, path.with_name(path.name.replace("f_buffer", "l_buffer", 1))
    elif path.name.startswith("l_buffer"):
        f_path, l_path = path.with_name(path.name.replace("l_buffer", "f_buffer", 1)), path
    else:
        raise DataError(f"{path}: expected an f_buffer*.npz / l_buffer*.npz pair")
    return _read_npz_array(f_path), _read_npz_array(l_path)


def _read_tensors(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Our own format: a torch file or safetensors file with `feats` and `labels`, or the bank
    inside a DIDA training checkpoint (`method.bank`, the filled entries)."""
    from dida.models.weights import check_weights_file

    if not path.is_file():
        raise DataError(f"{path}: bank file not found")
    check_weights_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:  # mmap: a training checkpoint is large, only its bank is read
            with open(path, "rb") as f:
                is_zip = f.read(4) == b"PK\x03\x04"  # mmap needs the zip format
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as err:  # pickle/safetensors errors have no common base class
        raise DataError(f"{path}: cannot read bank file: {str(err).splitlines()[0]}") from None
    if isinstance(data, dict) and data.get("format") == "dida":  # a training checkpoint
        bank = (data.get("method") or {}).get("bank")
        if not isinstance(bank, dict) or not {"feats", "labels"} <= set(bank):
            method = (data.get("config") or {}).get("method", {}).get("name", "?")
            raise DataError(f"{path}: a training checkpoint without an instance bank ({method})")
        count = int(bank["count"]) if "count" in bank else bank["feats"].shape[0]
        return bank["feats"][:count].clone(), bank["labels"][:count].clone()
    if not isinstance(data, dict) or not {"feats", "labels"} <= set(data):
        raise DataError(f"{path}: expected a dict with 'feats' and 'labels'")
    return data["feats"], data["labels"]


def bank_input_files(path: str | Path) -> list[Path]:
    """The files `read_bank_file(path)` reads (to refuse writing over one of them)."""
    path = Path(path)
    if path.is_dir():
        return [path / "f_buffer_s.npz", path / "l_buffer_s.npz"]
    for a, b in (("f_buffer", "l_buffer"), ("l_buffer", "f_buffer")):
        if path.name.startswith(a):
            return [path, path.with_name(path.name.replace(a, b, 1))]
    return [path]


def read_bank_file(
    path: str | Path,
    *,
    size: int | None = None,
    dim: int | None = None,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a bank: an `embedding_cache` folder or npz, a torch `.pt`, a `.safetensors` file, or
    a shipped bank `builtin:<name>`.

    Raises `DataError` naming the file when it is missing, malformed or of another size.

    Shapes:
        -> feats [K, D] float32, labels [K] int64
    """
    path = resolve_bank_path(path)
    if path.is_dir() or path.suffix == ".npz":
        feats, labels = _read_pair(path)
    else:
        feats, labels = _read_tensors(path)
    if feats.dim() != 2 or labels.dim() != 1 or labels.shape[0] != feats.shape[0]:
        raise DataError(
            f"{path}: bank features {tuple(feats.shape)} and labels {tuple(labels.shape)}: "
            "expected [K, D] and [K]"
        )
    if feats.is_complex() or not feats.is_floating_point() or labels.is_floating_point():
        raise DataError(f"{path}: expected float features and integer labels")
    if size is not None and feats.shape[0] != size:
        raise DataError(f"{path}: bank has K={feats.shape[0]} entries, config expects {size}")
    if dim is not None and feats.shape[1] != dim:
        raise DataError(f"{path}: bank has D={feats.shape[1]} channels, config expects {dim}")
    labels = labels.long()
    top = num_classes if num_classes is not None else 255
    if labels.numel() and bool(((labels < 0) | (labels >= top)).any()):
        raise DataError(f"{path}: bank labels must lie in [0, {top})")
    return feats.float().contiguous(), labels.contiguous()


BANK_SUFFIXES = (".pt", ".pth", ".safetensors")


def save_bank_file(path: str | Path, feats: torch.Tensor, labels: torch.Tensor) -> None:
    """Write a bank as a torch file (`{"feats", "labels"}`) or, for `.safetensors`, safetensors;
    atomically (a failed write leaves an existing file unchanged, as a one-line `WriteError`)."""
    from dida.io_safety import atomic_write

    tensors = {"feats": feats.detach().float().cpu().contiguous(), "labels": labels.long().cpu()}
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save

        atomic_write(path, save(tensors), what="bank file")
    else:
        atomic_write(path, lambda f: torch.save(tensors, f), what="bank file")
