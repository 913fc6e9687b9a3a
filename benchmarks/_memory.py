"""Memory readings shared by the benchmark scripts (imported as `_memory`: the scripts run from
this folder)."""

from __future__ import annotations


def status_kb(field: str) -> int:
    """A `/proc/self/status` field in kB (`VmRSS`, `VmHWM`: peak resident set); 0 if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_mb(device) -> float:  # noqa: ANN001
    """Peak memory of this process so far in MB: CUDA `max_memory_allocated` on a GPU, else the
    peak resident set (VmHWM)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return status_kb("VmHWM") / 1024
