"""Seconds per iteration and peak memory of one training step (source-only, DAFormer or DIDA).

Runs the real method module (`dida.adapt`) with the engine's optimizer on random tensors of the
given crop, so it measures the step itself, not data loading. Examples:

    python benchmarks/train_step.py --method daformer dida --variant mit_b0 --crop 512 --batch 2
    python benchmarks/train_step.py --device cuda --variant mit_b5 --precision bf16 fp32 \
        --method daformer dida

Peak memory: CUDA `max_memory_allocated`; CPU the process's peak resident set (VmHWM), measured
in a fresh subprocess per case so that cases do not inherit each other's peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_case(args: argparse.Namespace) -> dict:
    import torch

    from dida.adapt.daformer import DAFormer, SourceOnly
    from dida.adapt.dida import DIDA
    from dida.config import ExperimentConfig
    from dida.engine.optim import build_optimizer
    from dida.engine.train import resolve_precision
    from dida.models import segmentor_from_config

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = ExperimentConfig()
    cfg.model.variant, cfg.model.pretrained = args.variant, None
    cfg.method.instance.resolution = args.resolution
    cfg.method.feat_dist.enabled = args.feat_dist
    dtype = resolve_precision(args.precision, device)
    student = segmentor_from_config(cfg.model)
    imnet = None
    if args.feat_dist:
        import copy

        imnet = copy.deepcopy(student.encoder)
    kwargs = dict(num_classes=cfg.model.num_classes, imnet_encoder=imnet,
                  generator=torch.Generator(device=device).manual_seed(0))  # fmt: skip
    classes = {"source_only": SourceOnly, "daformer": DAFormer}
    if args.method == "dida":
        method = DIDA(student, cfg.method, embed_dim=cfg.model.embed_dim, **kwargs)
        method.bank.init_random_(torch.Generator().manual_seed(0))
    else:
        method = classes[args.method](student, cfg.method, **kwargs)
    method = method.to(device).train()
    if args.compile:
        method.set_student_forward(torch.compile(student))
    optimizer = build_optimizer(student, cfg.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    b, s, c = args.batch, args.crop, cfg.model.num_classes
    gen = torch.Generator().manual_seed(1)
    src_label = torch.randint(0, c, (b, s // 32, s // 32), generator=gen)
    src_label = src_label.repeat_interleave(32, 1).repeat_interleave(32, 2)
    batch = {
        "src_img": torch.randn(b, 3, s, s, generator=gen).to(device),
        "src_label": src_label.to(device),
        "tgt_img": torch.randn(b, 3, s, s, generator=gen).to(device),
    }

    def step(i: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        method.update_teacher(i)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            method.forward_backward(batch, i, lambda loss: scaler.scale(loss).backward(), False)
        scaler.step(optimizer)
        scaler.update()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(args.warmup):
        step(i)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup, args.warmup + args.repeats):
        t0 = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else _vm_hwm_mb())  # fmt: skip
    return {"s_per_it": statistics.median(times), "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", nargs="+", default=["daformer", "dida"],
                        choices=["source_only", "daformer", "dida"])  # fmt: skip
    parser.add_argument("--variant", default="mit_b0")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32"],
                        choices=["fp32", "bf16", "fp16"])  # fmt: skip
    parser.add_argument(
        "--resolution", nargs="+", default=["feature"], choices=["feature", "input"],
        help="DIDA instance-loss resolution",
    )  # fmt: skip
    parser.add_argument(
        "--feat-dist", action="store_true", help="with the ImageNet feature distance"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the student")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # one measurement, in this (fresh) process
        case = argparse.Namespace(**{**vars(args), **json.loads(args.case)})
        print(json.dumps(run_case(case)))
        return
    rows = []
    for precision in args.precision:
        for method in args.method:
            for resolution in args.resolution if method == "dida" else ["-"]:
                case = {"method": method, "precision": precision,
                        "resolution": resolution if resolution != "-" else "feature"}  # fmt: skip
                out = subprocess.run(
                    [sys.executable, __file__, "--case", json.dumps(case),
                     *sys.argv[1:]], capture_output=True, text=True,
                )  # fmt: skip
                if out.returncode != 0:
                    print(out.stderr, file=sys.stderr)
                    raise SystemExit(f"case {case} failed")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append((method, resolution, precision, result))
    mem = "peak CUDA MB" if args.device.startswith("cuda") else "peak RSS MB"
    extras = (", compiled" if args.compile else "") + (
        ", feature distance on" if args.feat_dist else ", feature distance off"
    )
    print(f"\n{args.variant}, crop {args.crop}, batch {args.batch}, {args.device}{extras}")
    print(f"| method | instance resolution | precision | s/it | {mem} |")
    print("|---|---|---|---|---|")
    for method, resolution, precision, r in rows:
        print(
            f"| {method} | {resolution} | {precision} | {r['s_per_it']:.3f} | {r['peak_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
