"""What the instance loss does in a DIDA run: L_in over training and its gradient against L_mix.

For each DIDA run directory (e.g. `work_dirs/quickstart/seed0/dida`), prints

* L_in at every logged iteration (from `metrics.jsonl`), and
* at the requested iterations (checkpoints `iter_<N>.pth` must exist: train with
  `--set train.checkpoint_interval=100 --set train.keep_checkpoints=100`), the norm of the
  gradients of L_mix and of L_in with respect to the student's fused feature of the mixed image
  (the DAFormer head's 256-d, here 64-d, post-ReLU feature at 1/4 resolution), and their ratio.

The step is replayed from the checkpoint: the same batch (the data stream is a pure function of the
seed and the sample index), the same RNG state, the bank and teacher as saved; the method's own
pieces (source step with the bank update, teacher pseudo-labels, ClassMix, mixed forward, L_in).

    python benchmarks/quickstart_diagnostics.py work_dirs/quickstart/seed0/dida \\
        work_dirs/quickstart/seed0/dida_intended --iters 100 500
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def _loss_in_curve(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["iter"], r["instance.loss_in"]) for r in records
            if r.get("kind") == "train" and "instance.loss_in" in r]  # fmt: skip


def _replay(run_dir: Path, iteration: int) -> dict[str, float]:
    from dida.adapt.losses import pixel_weighted_ce
    from dida.config import config_from_dict
    from dida.data.uda import build_train_dataset
    from dida.engine.build import build_method
    from dida.engine.checkpoint import load_checkpoint, set_rng_state
    from dida.eval.inference import resize

    ckpt = load_checkpoint(run_dir / f"iter_{iteration}.pth", map_location="cpu")
    cfg = config_from_dict(ckpt["config"])
    cfg.model.pretrained = None  # the checkpoint holds every weight
    dataset = build_train_dataset(cfg.data, seed=cfg.train.seed)
    method = build_method(cfg, dataset, torch.device("cpu"))
    method.load_training_state(ckpt)
    set_rng_state(ckpt["rng"], method.generator)
    n = cfg.data.batch_size
    items = [dataset[iteration * n + i] for i in range(n)]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    method.train()
    method.update_teacher(iteration)
    src_img, src_label, tgt_img = batch["src_img"], batch["src_label"], batch["tgt_img"]
    src = method.source_step(src_img, src_label, backward=lambda loss: None)
    method.after_source_step(src, src_label, iteration)
    teacher = method.pseudo_labels(tgt_img)
    masks, mixed_img, mixed_label, mixed_weight = method.class_mix(
        src_img, src_label, tgt_img, teacher
    )
    mixed_logits, mixed_embed = method.student(mixed_img)
    logits_up = resize(mixed_logits, mixed_label.shape[-2:])
    loss_mix = pixel_weighted_ce(logits_up, mixed_label, mixed_weight, method.ignore_index)
    loss_in, _ = method.target_extra_loss(mixed_logits, mixed_embed, teacher, masks)
    (g_mix,) = torch.autograd.grad(loss_mix, mixed_embed, retain_graph=True)
    (g_in,) = torch.autograd.grad(loss_in, mixed_embed)
    return {
        "loss_mix": loss_mix.item(),
        "loss_in": loss_in.item(),
        "grad_mix": g_mix.norm().item(),
        "grad_in": g_in.norm().item(),
        "ratio": (g_in.norm() / g_mix.norm().clamp_min(1e-30)).item(),
        "pseudo_weight": teacher.weight.amax().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="DIDA run directories")
    parser.add_argument("--iters", nargs="+", type=int, default=[100, 500],
                        help="iterations to replay (iter_<N>.pth must exist)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for run_dir in args.run_dirs:
        print(f"== {run_dir}")
        curve = _loss_in_curve(run_dir)
        print("L_in over training: " + ", ".join(f"{i}: {v:.3f}" for i, v in curve))
        print("| iteration | L_mix | L_in | ‖∇F L_mix‖ | ‖∇F L_in‖ | ratio in/mix | pseudo w. |")
        print("|---|---|---|---|---|---|---|")
        for it in args.iters:
            if not (run_dir / f"iter_{it}.pth").is_file():
                print(f"| {it} | (no iter_{it}.pth) |")
                continue
            r = _replay(run_dir, it)
            cells = [f"{r['loss_mix']:.4f}", f"{r['loss_in']:.4f}", f"{r['grad_mix']:.3e}",
                     f"{r['grad_in']:.3e}", f"{r['ratio']:.3f}", f"{r['pseudo_weight']:.3f}"]
            print(f"| {it} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
