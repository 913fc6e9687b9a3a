"""Time the instance bank update and the instance loss, and measure their peak extra memory.

Each case runs in its own subprocess. Peak extra memory = VmHWM − VmRSS, where the high-water mark
is reset (`echo 5 > /proc/self/clear_refs`) after the inputs are allocated, and the first (cold)
call is the one measured, in a process run with MALLOC_MMAP_THRESHOLD_ fixed; times are the
median and minimum of the calls after the first, in a process with the default allocator.

    python benchmarks/bank_ops.py            # all cases
    python benchmarks/bank_ops.py --reference  # also the reference-style materialised loss
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from _memory import status_kb

K, D, C, B = 300, 256, 19, 2

CASES = {
    "update class_mean 128": ("update", "class_mean", 128),
    "update boundary 128": ("update", "boundary", 128),
    "update class_mean 512": ("update", "class_mean", 512),
    "update boundary 512": ("update", "boundary", 512),
    "loss feature res (128)": ("loss", "feature", 128),
    "loss input res (512)": ("loss", "input", 128),
}
REFERENCE_CASES = {"loss input res, materialised ref": ("loss", "reference", 128)}


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _reference_loss(student, teacher, bank, labels, calib, size):
    """The reference's way: upsample embeddings, materialise every [B, K, H, W] tensor."""
    import torch
    import torch.nn.functional as F

    student = F.interpolate(student, size=size, mode="bilinear", align_corners=False)
    with torch.no_grad():
        teacher = F.interpolate(teacher, size=size, mode="bilinear", align_corners=False)
        calib = F.interpolate(calib, size=size, mode="bilinear", align_corners=False)
        weak = torch.einsum("bdhw,kd->bkhw", teacher, bank)
        target = weak * calib[:, labels]
        target = target / (target.sum(1, keepdim=True) + 1e-6)
    strong = torch.einsum("bdhw,kd->bkhw", student, bank)
    strong = strong / (strong.sum(1, keepdim=True) + 1e-6)
    return 0.5 * (-(target * torch.log(strong + 1e-10)).sum(1)).mean()


def _make_case(kind: str, mode: str, res: int, chunk_size: int) -> Callable[[], None]:
    import torch

    from dida.adapt.instance import instance_loss
    from dida.adapt.instance_bank import InstanceBank

    g = torch.Generator().manual_seed(0)
    if kind == "update":
        bank = InstanceBank(K, D, C, update_mode=mode)
        bank.init_random_(g)
        embed = torch.rand(B, D, res, res, generator=g)
        coarse = torch.randint(0, C, (B, 1, 16, 16), generator=g).float()
        labels = torch.nn.functional.interpolate(coarse, size=(res, res))[:, 0].long()
        labels[:, : res // 8] = 255
        return lambda: bank.update_(embed, labels)
    student = torch.rand(B, D, res, res, generator=g).requires_grad_()
    teacher = torch.rand(B, D, res, res, generator=g)
    bank_feats = torch.rand(K, D, generator=g)
    bank_labels = torch.arange(K) % C
    calib = torch.softmax(torch.randn(B, C, res, res, generator=g), dim=1)
    out_size = None if mode == "feature" else (4 * res, 4 * res)

    def run() -> None:
        if mode == "reference":
            loss = _reference_loss(student, teacher, bank_feats, bank_labels, calib, out_size)
        else:
            loss = instance_loss(
                student, teacher, bank_feats, bank_labels, calib, out_size=out_size,
                chunk_size=chunk_size,
            )  # fmt: skip
        loss.backward()
        student.grad = None

    return run


def run_case(name: str, repeats: int, chunk_size: int) -> dict[str, float]:
    kind, mode, res = {**CASES, **REFERENCE_CASES}[name]
    fn = _make_case(kind, mode, res, chunk_size)
    _reset_peak()
    base = status_kb("VmRSS")
    fn()
    peak_mb = (status_kb("VmHWM") - base) / 1024
    times = [float("nan")]
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times = times[1:] or times
    return {
        "ms": 1000 * statistics.median(times),
        "min_ms": 1000 * min(times),
        "peak_extra_mb": peak_mb,
    }


def _run(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=32, help="instance loss rows per chunk")
    parser.add_argument("--reference", action="store_true", help="include the materialised ref")
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.repeats, args.chunk_size)))
        return
    import torch

    names = list(CASES) + (list(REFERENCE_CASES) if args.reference else [])
    names = [n for n in names if args.only in n]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, K={K} D={D} C={C} B={B}")
    print(f"{'case':<36} {'median ms':>10} {'min ms':>10} {'peak extra MB':>14}")
    for name in names:
        repeats = "2" if "loss" in name and "feature" not in name else str(args.repeats)
        cmd = [sys.executable, __file__, "--case", name, "--repeats", repeats]
        cmd += ["--chunk-size", str(args.chunk_size)]
        res = _run(cmd, dict(os.environ))
        # memory in a second process with a fixed mmap threshold: glibc then returns every freed
        # tensor to the OS at once, so the RSS high-water mark tracks the live tensors rather
        # than the allocator's cached heap (it slows allocation, hence not used for timing)
        mem = _run(cmd[:-3] + ["0"] + cmd[-2:], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
        res["peak_extra_mb"] = mem["peak_extra_mb"]
        print(f"{name:<36} {res['ms']:>10.1f} {res['min_ms']:>10.1f} {res['peak_extra_mb']:>14.0f}")


if __name__ == "__main__":
    main()
