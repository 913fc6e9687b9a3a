"""dida.io_safety: refusals before work, atomic writes, one-line errors for failed writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from io_helpers import fill_disk, mounted_tmpfs

from dida.io_safety import WriteError, atomic_write, check_output, check_writable_dir


def test_check_output_refusals(tmp_path: Path) -> None:
    src = tmp_path / "in.pt"
    src.write_bytes(b"x")
    with pytest.raises(WriteError, match="exists; pass --overwrite"):
        check_output(src)
    with pytest.raises(WriteError, match="is the input"):
        check_output(tmp_path / "." / "in.pt", inputs=[src], overwrite=True)
    with pytest.raises(WriteError, match=r"must end in \.pt or \.safetensors"):
        check_output(tmp_path / "out.npz", suffixes=(".pt", ".safetensors"))
    with pytest.raises(WriteError, match="is a folder"):
        check_output(tmp_path)
    with pytest.raises(WriteError, match="is a file, not a folder"):
        check_output(src / "sub" / "out.pt")
    assert check_output(src, overwrite=True) == src
    assert check_output(tmp_path / "new" / "out.pt") == tmp_path / "new" / "out.pt"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert src.read_bytes() == b"x"


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.txt"
    atomic_write(path, "one")
    atomic_write(path, b"two")
    atomic_write(path, lambda f: f.write(b"three"))
    assert path.read_text() == "three"
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.txt"]


def test_simulated_full_disk_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckpt.pth"
    atomic_write(path, lambda f: torch.save({"w": torch.ones(2)}, f))
    before = path.read_bytes()
    fill_disk(monkeypatch)
    for data in (b"x" * 1000, lambda f: torch.save({"w": torch.zeros(10_000)}, f)):
        with pytest.raises(WriteError) as info:
            atomic_write(path, data, what="checkpoint")
        assert str(info.value) == f"{path}: cannot write checkpoint: no space left on device"
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_real_full_and_read_only_file_systems(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "small", "size=64k") as small:
        with pytest.raises(WriteError, match="no space left on device"):
            atomic_write(small / "big.bin", b"x" * 200_000)
        assert list(small.iterdir()) == []
    with mounted_tmpfs(tmp_path / "ro", "ro") as ro:
        with pytest.raises(WriteError, match="read-only file system"):
            check_output(ro / "out.pt")
        with pytest.raises(WriteError, match="read-only file system"):
            check_writable_dir(ro / "preds")
