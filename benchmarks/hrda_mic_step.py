"""Peak memory and time of one training step of an HRDA/MIC experiment (default DIDA+MIC(HRDA)).

One iteration of the method module as `dida train` runs it, on random tensors at the experiment's
sizes (default `dida-mic-gta`: MiT-B5, batch 2, 1024² context crops, 512² detail crops, MIC, the
instance loss at 512² with the shipped 300-entry bank, ImageNet feature distance): teacher
update, source forward/backward (+ FD), teacher pseudo-labels with sliding detail windows,
ClassMix, mixed forward/backward with L_in, MIC forward/backward, AdamW step. Run once per
`model.checkpoint_encoder` setting, each in a fresh subprocess. Reported: the process's peak
resident set (CPU, VmHWM) or CUDA `max_memory_allocated`, after building (model, teacher,
ImageNet encoder, optimizer) and after the step, and the step time. Examples:

    python benchmarks/hrda_mic_step.py                                # CPU, both settings
    python benchmarks/hrda_mic_step.py --device cuda --precision bf16 fp32
    python benchmarks/hrda_mic_step.py --exp mic-gta --modes checkpoint
    python benchmarks/hrda_mic_step.py --variant mit_b0 --crop 256 --detail 128   # quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time

from _memory import peak_mb


def run_case(args: argparse.Namespace, checkpoint: bool, precision: str) -> dict:
    import torch

    from dida.config import load_config
    from dida.engine.build import build_method
    from dida.engine.optim import build_optimizer
    from dida.experiments import find_experiment

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    crop, detail = args.crop, args.detail
    cfg = load_config(find_experiment(args.exp).path, [
        "model.pretrained=null", f"model.variant={args.variant}",
        f"model.checkpoint_encoder={checkpoint}", f"data.batch_size={args.batch}",
        f"data.crop_size=[{crop},{crop}]", f"model.hrda.detail_crop=[{detail},{detail}]",
        *args.overrides,
    ])  # fmt: skip
    torch.manual_seed(0)
    method = build_method(cfg, None, device)
    if cfg.method.feat_dist.enabled:  # the ImageNet encoder of a run with pretrained weights
        method.imnet = copy.deepcopy(method.student.encoder).requires_grad_(False).eval()
    optimizer = build_optimizer(method.student, cfg.optim)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    b, c = args.batch, cfg.model.num_classes
    g = torch.Generator().manual_seed(0)
    cells = torch.randint(0, c, (b, crop // 64, crop // 64), generator=g)
    valid = torch.ones(b, crop, crop)
    valid[:, :30], valid[:, -240:] = 0, 0
    batch = {
        "src_img": torch.randn(b, 3, crop, crop, generator=g),
        "src_label": cells.repeat_interleave(64, 1).repeat_interleave(64, 2),
        "tgt_img": torch.randn(b, 3, crop, crop, generator=g),
        "valid_pseudo_mask": valid,
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    built = peak_mb(device)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    method.update_teacher(0)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        step = method.forward_backward(batch, 0, lambda loss: loss.backward(), False)
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    losses = {k: round(float(v), 4) for k, v in step.losses.items()}
    return {
        "exp": args.exp,
        "checkpoint_encoder": checkpoint,
        "precision": precision,
        "peak_mb_built": round(built, 1),
        "peak_mb_step": round(peak_mb(device), 1),
        "seconds": round(seconds, 1),
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--exp", default="dida-mic-gta", help="experiment id (dida experiments)")
    parser.add_argument("--variant", default="mit_b5")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, default=1024, help="context crop (full resolution)")
    parser.add_argument("--detail", type=int, default=512, help="detail crop")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--precision", nargs="+", default=["fp32"],
                        choices=["fp32", "bf16", "fp16"])  # fmt: skip
    parser.add_argument("--modes", nargs="+", default=["checkpoint", "plain"],
                        choices=["plain", "checkpoint"])  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override")  # fmt: skip
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        mode, precision = args.case.split(":")
        print(json.dumps(run_case(args, mode == "checkpoint", precision)))
        return
    base = [f"--{k}={getattr(args, k)}" for k in
            ("exp", "variant", "batch", "crop", "detail", "device", "threads")]  # fmt: skip
    base += [a for o in args.overrides for a in ("--set", o)]
    print(f"one training step of {args.exp}: {args.variant}, batch {args.batch}, context "
          f"{args.crop}², detail {args.detail}², {args.device}")  # fmt: skip
    for precision in args.precision:
        for mode in args.modes:
            cmd = [sys.executable, __file__, *base, "--case", f"{mode}:{precision}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(f"{mode} {precision}: failed\n{proc.stderr[-2000:]}")
                continue
            print(proc.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
