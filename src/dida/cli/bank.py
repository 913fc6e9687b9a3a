"""`dida bank`: convert the original `embedding_cache` npz pair to our bank file; inspect a bank."""

from __future__ import annotations

import argparse

NAME = "bank"
HELP = "build, import or inspect an instance bank file"
DESCRIPTION = """Instance bank files; train with one through
--set method.bank.init=file --set method.bank.init_path=FILE

  dida bank init CONFIG CHECKPOINT -o OUT.pt  class-balanced bank from source crops and a model
  dida bank import SRC_DIR_OR_NPZ -o OUT.pt   original f_buffer_s.npz / l_buffer_s.npz -> our format
  dida bank random -o OUT.pt                  unit random vectors, labels round-robin (placeholder)
  dida bank show FILE_OR_DIR_OR_CHECKPOINT    per-class counts, feature norms, missing classes

OUT is a new .pt/.pth (torch) or .safetensors file (--overwrite replaces an existing one).
"""
ORDER = 80


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bank_command", metavar="ACTION", required=True)
    init = sub.add_parser("init", help="build a class-balanced bank from source images")
    init.add_argument("config", help="config file (e.g. a run's .json) naming the source data")
    init.add_argument("checkpoint", help="segmentor checkpoint whose fused features fill the bank")
    init.add_argument("-o", "--output", required=True, help="new .pt or .safetensors file")
    init.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="config override (repeatable), e.g. method.bank.size=300")  # fmt: skip
    init.add_argument("--max-crops", type=int, default=2000, help="give up after this many crops")
    init.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto)")
    imp = sub.add_parser("import", help="convert an embedding_cache folder or npz pair")
    imp.add_argument("src", help="folder holding f_buffer_s.npz and l_buffer_s.npz, or one of them")
    imp.add_argument("-o", "--output", required=True, help="new .pt or .safetensors file")
    imp.add_argument("--size", type=int, default=None, help="expected number of entries K")
    rnd = sub.add_parser("random", help="a placeholder bank of unit random vectors")
    rnd.add_argument("-o", "--output", default="random_bank.pt",
                     help="new .pt or .safetensors file (default random_bank.pt)")  # fmt: skip
    rnd.add_argument("--size", type=int, default=300, help="entries K (default 300)")
    rnd.add_argument("--dim", type=int, default=256, help="feature channels D (default 256)")
    rnd.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    show = sub.add_parser("show", help="print per-class counts and feature norms")
    show.add_argument("path", help="bank file (.pt, .safetensors), embedding_cache folder/npz, "
                      "builtin:<name>, or a DIDA training checkpoint")  # fmt: skip
    for p in (imp, rnd, show):
        p.add_argument("--num-classes", "--classes", type=int, default=19,
                       help="number of classes (default 19)")  # fmt: skip
    for p in (init, imp, rnd):
        p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")


def _summary(feats, labels, num_classes: int) -> list[str]:
    import torch

    from dida.data.labels import CLASSES

    names = list(CLASSES) + [str(i) for i in range(len(CLASSES), num_classes)]
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    norms = feats.norm(dim=1)
    lines = [f"entries: {feats.shape[0]}  dim: {feats.shape[1]}"]
    lines.append(
        f"feature norms: min {norms.min():.3f}  mean {norms.mean():.3f}  max {norms.max():.3f}"
    )
    lines += [f"  {c:>2} {names[c]:<14} {counts[c]:>4}" for c in range(num_classes)]
    missing = [c for c in range(num_classes) if counts[c] == 0]
    if missing:
        lines.append("missing classes: " + ", ".join(f"{c} ({names[c]})" for c in missing))
    else:
        lines.append("missing classes: none")
    return lines


def run(args: argparse.Namespace) -> int:
    from dida.engine.bank_io import BANK_SUFFIXES, bank_input_files, read_bank_file
    from dida.io_safety import check_output

    if args.bank_command != "show":  # a bad output is refused before any work
        inputs = []
        if args.bank_command == "init":
            inputs = [args.config, args.checkpoint]
        elif args.bank_command == "import":
            inputs = bank_input_files(args.src)
        check_output(args.output, inputs=inputs, overwrite=args.overwrite,
                     suffixes=BANK_SUFFIXES, what="bank file")  # fmt: skip
    if args.bank_command == "init":
        feats, labels, args.num_classes = _init_bank(args)
        _save(args.output, feats, labels)
    elif args.bank_command == "import":
        feats, labels = read_bank_file(args.src, size=args.size, num_classes=args.num_classes)
        _save(args.output, feats, labels)
    elif args.bank_command == "random":
        feats, labels = _random_bank(args)
        _save(args.output, feats, labels)
    else:
        feats, labels = read_bank_file(args.path, num_classes=args.num_classes)
    for line in _summary(feats, labels, args.num_classes):
        print(line)
    return 0


def _save(path: str, feats, labels) -> None:  # noqa: ANN001
    from dida.engine.bank_io import save_bank_file

    save_bank_file(path, feats, labels)  # atomic; write errors are one-line WriteErrors
    print(f"wrote {path}")


def _random_bank(args: argparse.Namespace):  # noqa: ANN202
    """Unit-norm Gaussian vectors, labels round-robin over the classes (the bank's own rule)."""
    import torch

    from dida.adapt.instance_bank import InstanceBank
    from dida.errors import UserError

    for name in ("size", "dim", "num_classes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    bank = InstanceBank(args.size, args.dim, args.num_classes)
    bank.init_random_(torch.Generator().manual_seed(args.seed))
    return bank.feats.clone(), bank.labels.clone()


def _init_bank(args: argparse.Namespace):  # noqa: ANN202
    """Fill a bank with per-image source class means of the checkpoint's fused feature."""
    import torch
    from tqdm import tqdm

    from dida.adapt.dida import resize_labels
    from dida.adapt.instance_bank import InstanceBank
    from dida.config import load_config
    from dida.data.labels import IGNORE_INDEX
    from dida.data.uda import build_train_dataset
    from dida.errors import UserError
    from dida.eval.evaluate import load_segmentor, resolve_device

    cfg = load_config(args.config, args.overrides)
    device = resolve_device(args.device)
    model = load_segmentor(cfg.model, args.checkpoint, device)
    data = build_train_dataset(cfg.data, seed=cfg.train.seed)
    bank_cfg = cfg.method.bank
    bank = InstanceBank(
        bank_cfg.size, cfg.model.embed_dim, cfg.model.num_classes, ignore_index=IGNORE_INDEX
    ).to(device)
    bar = tqdm(range(args.max_crops), desc="bank", unit="crop")
    with torch.no_grad():
        for i in bar:
            item = data[i]
            img = item["src_img"][None].to(device)
            _, embed = model(img)  # [1, D, h, w]
            label = resize_labels(item["src_label"][None].to(device), embed.shape[-2:])
            if bank.fill_online_(embed.float(), label):
                break
            bar.set_postfix(filled=int(bank.count))
    if not bank.is_full:
        raise UserError(
            f"bank filled {int(bank.count)} of {bank.size} entries in {args.max_crops} crops; "
            "raise --max-crops or lower method.bank.size"
        )
    return bank.feats.cpu(), bank.labels.cpu(), cfg.model.num_classes
