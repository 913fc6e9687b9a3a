"""Peak memory of one HRDA student forward + backward, with and without `model.checkpoint_encoder`.

The student forward of HRDA/MIC(HRDA) training at the published sizes: a 1024²
context crop (its 512² context view and a 512² detail box through MiT-B5), the fused + detail loss,
backward. Every training-step forward (source, mixed, masked) is one of these and is backpropagated
before the next starts, so its activations are the per-forward part of a step's peak. Examples:

    python benchmarks/hrda_memory.py                       # MiT-B5, batch 2, 1024 / 512, CPU
    python benchmarks/hrda_memory.py --device cuda         # CUDA max_memory_allocated
    python benchmarks/hrda_memory.py --variant mit_b0 --crop 512 --detail 256   # quick look

Each case runs in a fresh subprocess. Reported per case: the process's peak resident set (CPU,
VmHWM) or CUDA `max_memory_allocated`, both before (model built) and after the step; the bytes of
tensors saved for backward (counted once per storage by a saved-tensors hook; with checkpointing
the inputs of the recomputed blocks are added, since they stay alive); the step time. Also the
static memory of an HRDA training step from parameter counts (student, gradients, AdamW states,
EMA teacher, frozen ImageNet encoder).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _memory import peak_mb


def run_case(args: argparse.Namespace, checkpoint: bool) -> dict:
    import torch

    from dida.adapt.hrda import hrda_seg_loss
    from dida.config import load_config
    from dida.models import segmentor_from_config
    from dida.models.mit import Block

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(None, [
        f"model.variant={args.variant}", "model.pretrained=null", "model.hrda.enabled=true",
        f"model.num_classes={args.classes}", f"data.crop_size=[{args.crop},{args.crop}]",
        f"model.hrda.detail_crop=[{args.detail},{args.detail}]",
        f"model.checkpoint_encoder={checkpoint}",
    ])  # fmt: skip
    torch.manual_seed(0)
    model = segmentor_from_config(cfg.model).to(device).train()
    img = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
    label = torch.randint(0, args.classes, (args.batch, args.crop, args.crop), device=device)
    box = model.sample_box((args.crop, args.crop), torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_mb(device)

    storages: dict[int, int] = {}
    block_inputs: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    def remember_input(module, inputs) -> None:  # noqa: ANN001
        if checkpoint and torch.is_grad_enabled():
            x = inputs[0]
            block_inputs[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()

    hooks = [m.register_forward_pre_hook(remember_input) for m in model.modules()
             if isinstance(m, Block)]  # fmt: skip
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(img, detail_box=box)
        loss = sum(hrda_seg_loss(out, label, None).values())
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    for h in hooks:
        h.remove()
    saved = sum(storages.values()) + sum(
        n for ptr, n in block_inputs.items() if ptr not in storages
    )
    params = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for p in model.encoder.parameters())
    return {
        "checkpoint_encoder": checkpoint,
        "peak_mb_model_built": round(before, 1),
        "peak_mb_step": round(peak_mb(device), 1),
        "saved_for_backward_mb": round(saved / 2**20, 1),
        "seconds": round(seconds, 2),
        "params": params,
        # fp32 student + grads + 2 AdamW moments, EMA teacher, frozen ImageNet encoder
        "static_mb_training": round((4 * params + params + encoder) * 4 / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="mit_b5")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, default=1024, help="context crop (full resolution)")
    parser.add_argument("--detail", type=int, default=512, help="detail crop")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: robust on a "
                        "shared machine)")  # fmt: skip
    parser.add_argument("--modes", nargs="+", default=["plain", "checkpoint"],
                        choices=["plain", "checkpoint"])  # fmt: skip
    parser.add_argument("--case", choices=["plain", "checkpoint"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args, args.case == "checkpoint")))
        return
    base = [f"--{k}={getattr(args, k)}" for k in
            ("variant", "batch", "crop", "detail", "classes", "device", "threads")]  # fmt: skip
    print(f"HRDA student fwd+bwd: {args.variant}, batch {args.batch}, context {args.crop}², "
          f"detail {args.detail}², {args.classes} classes, {args.device}")  # fmt: skip
    results = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, *base, "--case", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{mode}: failed\n{proc.stderr[-2000:]}")
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(result)
        print(json.dumps(result))
    if len(results) == 2:
        plain, ckpt = results
        step = lambda r: r["peak_mb_step"] - r["peak_mb_model_built"]  # noqa: E731
        print(f"activation peak over the built model: plain {step(plain):.0f} MB, checkpointed "
              f"{step(ckpt):.0f} MB; saved for backward {plain['saved_for_backward_mb']:.0f} -> "
              f"{ckpt['saved_for_backward_mb']:.0f} MB; time {plain['seconds']:.1f} -> "
              f"{ckpt['seconds']:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
