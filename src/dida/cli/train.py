"""`dida train`: train a shipped experiment or a config file; resume a run."""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path

NAME = "train"
HELP = "train a model (source-only, DAFormer or DIDA) from an experiment id or a config file"
ORDER = 10
DESCRIPTION = """\
Train from a shipped experiment (`--exp 7`, see `dida experiments`) or a YAML/JSON config
(`--config FILE`), with `--set key=value` overrides. A run directory
work_dirs/local-<exp>/<yymmdd_HHMM>_<name>_<id>/ receives <name>.json, train.log, metrics.jsonl,
latest.pth, iter_<N>.pth, debug/ and tb/.

Multi-GPU: torchrun --nproc_per_node N -m dida train --exp 7
Resume:    dida train --resume RUN_DIR | CHECKPOINT     (config taken from the checkpoint)
           dida train --exp 7 --resume auto             (newest run of that experiment)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--exp", help="experiment id from `dida experiments` (e.g. 7, 8)")
    source.add_argument("--config", type=Path, help="YAML or JSON config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable)",
    )
    parser.add_argument(
        "--resume",
        metavar="CKPT|RUN_DIR|auto",
        help="continue a run exactly where its checkpoint left it",
    )
    parser.add_argument("--work-dir", type=Path, help="run directory (default: generated)")


def _new_run_dir(cfg) -> Path:  # noqa: ANN001
    stamp = time.strftime("%y%m%d_%H%M")
    return Path(cfg.work_root) / f"local-{cfg.exp}" / f"{stamp}_{cfg.name}_{uuid.uuid4().hex[:5]}"


def _newest_run(cfg) -> Path | None:  # noqa: ANN001
    from dida.engine.checkpoint import find_latest

    root = Path(cfg.work_root) / f"local-{cfg.exp}"
    runs = sorted(p for p in root.glob(f"*_{cfg.name}_*") if find_latest(p) is not None)
    return runs[-1] if runs else None


def _checkpoint_of(resume: str) -> Path:
    """The checkpoint a `--resume RUN_DIR|CHECKPOINT` argument names."""
    from dida.engine.checkpoint import find_latest
    from dida.errors import UserError

    path = Path(resume)
    ckpt_path = find_latest(path) if path.is_dir() else path
    if ckpt_path is None:
        raise UserError(f"{path}: no checkpoint (latest.pth or iter_<N>.pth) in this folder")
    return ckpt_path


def resolve_run(args: argparse.Namespace):  # noqa: ANN201
    """(config, run_dir, resume) from the arguments."""
    from dida.config import apply_overrides, config_from_dict, load_config
    from dida.engine.checkpoint import load_checkpoint
    from dida.errors import UserError
    from dida.experiments import find_experiment

    resume = args.resume
    if args.exp is None and args.config is None:
        if resume in (None, "auto"):
            raise UserError("give --exp ID or --config FILE (or --resume RUN_DIR|CHECKPOINT)")
        ckpt_path = _checkpoint_of(resume)
        config = load_checkpoint(ckpt_path, mmap=True)["config"]  # only the config is read
        cfg = apply_overrides(config_from_dict(config, str(ckpt_path)), args.overrides)
        return cfg, args.work_dir or ckpt_path.parent, str(ckpt_path)
    path = find_experiment(args.exp).path if args.exp is not None else args.config
    cfg = load_config(path, args.overrides)
    if resume == "auto":
        run_dir = args.work_dir or _newest_run(cfg)
        return cfg, run_dir or _new_run_dir(cfg), "auto"
    if resume is not None:
        ckpt_path = _checkpoint_of(resume)
        return cfg, args.work_dir or ckpt_path.parent, str(ckpt_path)
    return cfg, args.work_dir or _new_run_dir(cfg), None


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from dida.engine.distributed import init_distributed
    from dida.engine.train import resolve_device, train

    cfg, run_dir, resume = resolve_run(args)
    info = init_distributed(resolve_device(cfg.train.device).type)
    if info.enabled:  # every rank must use rank 0's run directory
        box = [str(run_dir)]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    result = train(cfg, Path(run_dir), resume=resume)
    if info.is_main:
        print(f"run directory: {run_dir}")
        if result:
            print(f"final mIoU: {100 * result.get('mIoU', float('nan')):.2f}")
    return 0
