"""Forward and forward+backward speed and peak memory of our MiT encoder and segmentor.

With `--hf`, also times `transformers.SegformerModel` (eager and sdpa attention) holding the same
weights, so the encoder rows compare like for like. CPU peak memory is the rise of the process's
peak RSS (`VmHWM` in /proc/self/status, reset through /proc/self/clear_refs after a glibc
`malloc_trim` before each row);
CUDA peak memory is `torch.cuda.max_memory_allocated` above the memory in use before the row.

    python benchmarks/model_speed.py --variant mit_b5 --batch 2 --size 512 --repeats 3 --hf
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _memory import status_kb
from torch import nn

from dida.models import build_mit, build_segmentor
from dida.models.weights import hf_reference_encoder


def _trim_heap() -> None:
    """Return freed heap memory to the OS so that the next peak-RSS rise is the real need."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


class PeakMemory:
    """Peak memory (MiB) reached inside the `with` block, above what was in use at its start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _trim_heap()
            try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.base = status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = status_kb("VmHWM") * 1024
        self.peak_mib = (peak - self.base) / 2**20


def _time(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call of `fn` (CUDA work included)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _outputs(model: nn.Module, img: torch.Tensor) -> list[torch.Tensor]:
    if getattr(model, "main_input_name", None) == "pixel_values":  # transformers model
        return list(model(img, output_hidden_states=True).hidden_states)
    out = model(img)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _forward(model: nn.Module, img: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        _outputs(model, img)


def _forward_backward(model: nn.Module, img: torch.Tensor) -> None:
    model.train()
    sum(o.float().mean() for o in _outputs(model, img)).backward()
    model.zero_grad(set_to_none=True)


def measure(
    models: dict[str, nn.Module], img: torch.Tensor, warmup: int, repeats: int
) -> dict[str, dict[str, float]]:
    """Median and best forward (no_grad, eval) and forward+backward (train) times, peak memory.

    Models are timed round-robin, one call each per round, so that load from other processes on
    a shared machine affects all of them alike; the best time is the least disturbed one. Peak
    memory is taken on each model's first (warm-up) call.
    """
    device = img.device
    results: dict[str, dict[str, float]] = {name: {} for name in models}
    for key, step in (("fwd", _forward), ("fwd_bwd", _forward_backward)):
        for name, model in models.items():
            with PeakMemory(device) as mem:
                step(model, img)
            results[name][key + "_mem"] = mem.peak_mib
            for _ in range(warmup - 1):
                step(model, img)
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                times[name].append(_time(lambda m=model, f=step: f(m, img), device))
        for name in models:
            results[name][key] = statistics.median(times[name])
            results[name][key + "_min"] = min(times[name])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="mit_b0")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile our models")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help=">= 1; the first call gives memory")
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--hf", action="store_true", help="also time transformers SegformerModel")
    parser.add_argument("--no-segmentor", action="store_true", help="encoder rows only")
    args = parser.parse_args()
    args.warmup = max(args.warmup, 1)

    device = torch.device(args.device)
    torch.manual_seed(0)
    img = torch.randn(args.batch, 3, args.size, args.size, device=device)
    # drop path off in the encoder rows: transformers' copy gets the same (no) stochastic depth
    encoder = build_mit(args.variant, drop_path_rate=0.0)
    models: dict[str, nn.Module] = {}
    if args.hf:
        for impl in ("eager", "sdpa"):
            models[f"HF SegformerModel {impl}"] = hf_reference_encoder(encoder, impl)
    models["ours encoder"] = encoder
    if not args.no_segmentor:
        models["ours segmentor"] = build_segmentor(args.variant, num_classes=args.num_classes)
    for name, model in models.items():
        model.to(device)
        if args.compile and name.startswith("ours"):
            models[name] = torch.compile(model)
    rows = measure(models, img, args.warmup, args.repeats)

    mem_kind = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS rise (VmHWM)"
    threads = torch.get_num_threads()
    print(
        f"{args.variant}, batch {args.batch}, {args.size}x{args.size}, {device.type}"
        f" ({threads} threads), compile={args.compile}, median of {args.repeats}"
        f" after {args.warmup} warmup; memory = {mem_kind}"
    )
    print(
        f"| {'model':<26} | fwd s (median / best) | fwd+bwd s (median / best) |"
        " fwd MiB | fwd+bwd MiB |"
    )
    print(
        f"|{'-' * 28}|-----------------------|---------------------------|---------|-------------|"
    )
    for name, r in rows.items():
        print(
            f"| {name:<26} | {r['fwd']:9.3f} / {r['fwd_min']:9.3f} |"
            f" {r['fwd_bwd']:11.3f} / {r['fwd_bwd_min']:11.3f} |"
            f" {r['fwd_mem']:7.0f} | {r['fwd_bwd_mem']:11.0f} |"
        )


if __name__ == "__main__":
    main()
