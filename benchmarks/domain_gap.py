"""Measure the synthetic benchmark's domain gap with a tiny CNN: source-only vs. self-training.

Renders scenes in memory with `dida.data.scenes.render_scene`, trains a small plain-PyTorch
segmentation CNN on source crops, evaluates mIoU (over `SCENE_CLASSES`) on source val and target
val, then trains the same model with a DACS-like loop (EMA teacher, confidence-weighted
pseudo-labels, ClassMix, colour jitter + blur) and evaluates it on target val.

    python benchmarks/domain_gap.py --steps 300 --seed 0
"""

from __future__ import annotations

import argparse
import copy
import time

import kornia.augmentation as K
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dida.data.scenes import SCENE_CLASSES, render_scene

MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1) / 255
STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1) / 255


def make_set(n: int, size: tuple[int, int], domain: str, seed: int):
    rng = np.random.default_rng(seed)
    h, w = size
    imgs = np.empty((n, h, w, 3), np.uint8)
    labs = np.empty((n, h, w), np.uint8)
    for i in range(n):
        imgs[i], labs[i] = render_scene(rng, h, w, domain)
    lut = np.full(256, 255, np.int64)
    lut[list(SCENE_CLASSES)] = np.arange(len(SCENE_CLASSES))
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255  # [N,3,H,W] in [0,1]
    y = torch.from_numpy(lut[labs])
    return x, y


def block(cin: int, cout: int, stride: int = 1, dil: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dil, dilation=dil, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinySeg(nn.Module):
    def __init__(self, nc: int, w: int = 32) -> None:
        super().__init__()
        self.s1 = nn.Sequential(block(3, w // 2, 2), block(w // 2, w))  # /2
        self.s2 = nn.Sequential(block(w, w * 2, 2), block(w * 2, w * 2))  # /4
        self.s3 = nn.Sequential(
            block(w * 2, w * 4, 2), block(w * 4, w * 4, dil=2), block(w * 4, w * 4, dil=4)
        )  # /8
        self.fuse = block(w * 4 + w * 2, w * 2)
        self.cls = nn.Conv2d(w * 2, nc, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - MEAN) / STD
        f2 = self.s2(self.s1(x))
        f3 = self.s3(f2)
        f3 = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)
        out = self.cls(self.fuse(torch.cat([f3, f2], 1)))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def crops(x, y, n, size, gen):
    idx = torch.randint(0, x.shape[0], (n,), generator=gen)
    h, w = x.shape[-2:]
    xs, ys = [], []
    for i in idx.tolist():
        t = int(torch.randint(0, h - size + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - size + 1, (1,), generator=gen))
        xi, yi = x[i, :, t : t + size, left : left + size], y[i, t : t + size, left : left + size]
        if torch.rand(1, generator=gen) < 0.5:
            xi, yi = xi.flip(-1), yi.flip(-1)
        xs.append(xi)
        ys.append(yi)
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def miou(model, x, y, nc):
    model.eval()
    conf = torch.zeros(nc, nc, dtype=torch.long)
    for i in range(0, x.shape[0], 16):
        pred = model(x[i : i + 16]).argmax(1)
        t = y[i : i + 16]
        m = t != 255
        conf += torch.bincount(t[m] * nc + pred[m], minlength=nc * nc).view(nc, nc)
    model.train()
    inter = conf.diag().float()
    union = conf.sum(0) + conf.sum(1) - conf.diag()
    iou = inter / union.clamp(min=1)
    valid = union > 0
    return float(iou[valid].mean() * 100), (iou * 100).round().tolist()


def class_mix(src_x, src_y, tgt_x, tgt_y, tgt_w, gen):
    mixed_x, mixed_y, mixed_w = [], [], []
    for b in range(src_x.shape[0]):
        classes = torch.unique(src_y[b])
        classes = classes[classes != 255]
        n = (len(classes) + 1) // 2
        chosen = classes[torch.randperm(len(classes), generator=gen)[:n]]
        m = torch.isin(src_y[b], chosen)
        mixed_x.append(torch.where(m, src_x[b], tgt_x[b]))
        mixed_y.append(torch.where(m, src_y[b], tgt_y[b]))
        mixed_w.append(torch.where(m, torch.ones_like(tgt_w[b]), tgt_w[b]))
    return torch.stack(mixed_x), torch.stack(mixed_y), torch.stack(mixed_w)


def train(model, data, args, adapt: bool, steps: int, gen):
    sx, sy, tx, _ = data
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    teacher = copy.deepcopy(model) if adapt else None
    jitter = K.ColorJiggle(0.2, 0.2, 0.2, 0.2, p=0.8)
    blur = K.RandomGaussianBlur((5, 5), (0.15, 1.15), p=0.5)
    for step in range(steps):
        xb, yb = crops(sx, sy, args.batch, args.crop, gen)
        loss = F.cross_entropy(model(xb), yb, ignore_index=255)
        if adapt:
            tb, _ = crops(
                tx, torch.zeros_like(tx[:, 0], dtype=torch.long), args.batch, args.crop, gen
            )
            with torch.no_grad():
                teacher.eval()
                prob = teacher(tb).softmax(1)
                conf, pl = prob.max(1)
                q = (conf > args.thr).float().mean()
                w = torch.full_like(conf, float(q))
            mx, my, mw = class_mix(xb, yb, tb, pl, w, gen)
            mx = blur(jitter(mx))
            ce = F.cross_entropy(model(mx), my, ignore_index=255, reduction="none")
            loss = loss + (ce * mw).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if adapt:
            alpha = min(1 - 1 / (step + 1), args.ema)
            with torch.no_grad():
                for pt, ps in zip(teacher.parameters(), model.parameters(), strict=True):
                    pt.mul_(alpha).add_(ps, alpha=1 - alpha)
                for bt, bs in zip(teacher.buffers(), model.buffers(), strict=True):
                    bt.copy_(bs)
    return steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--adapt-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--thr", type=float, default=0.968)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--warm-start", action="store_true", help="adapt from the source-only model")
    p.add_argument("--src-size", type=int, nargs=2, default=[176, 320])
    p.add_argument("--tgt-size", type=int, nargs=2, default=[128, 256])
    args = p.parse_args()
    torch.manual_seed(args.seed)
    t = time.time()
    s = args.seed * 1000
    sx, sy = make_set(args.n_train, tuple(args.src_size), "source", s + 1)
    tx, ty = make_set(args.n_train, tuple(args.tgt_size), "target", s + 2)
    svx, svy = make_set(args.n_val, tuple(args.src_size), "source", s + 3)
    tvx, tvy = make_set(args.n_val, tuple(args.tgt_size), "target", s + 4)
    print(f"generated {2 * (args.n_train + args.n_val)} scenes in {time.time() - t:.1f}s")
    nc = len(SCENE_CLASSES)
    data = (sx, sy, tx, ty)
    source_state: dict = {}
    for adapt in (False, True):
        torch.manual_seed(args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        model = TinySeg(nc, args.width)
        if adapt and args.warm_start:
            model.load_state_dict(source_state)
        steps = args.adapt_steps if adapt and args.adapt_steps else args.steps
        t0 = time.time()
        train(model, data, args, adapt, steps, gen)
        secs = time.time() - t0
        src_m, _ = miou(model, svx, svy, nc)
        tgt_m, per = miou(model, tvx, tvy, nc)
        if not adapt:
            source_state = copy.deepcopy(model.state_dict())
        name = "self-train" if adapt else "source-only"
        print(
            f"{name}: {steps} steps in {secs:.0f}s  source val mIoU {src_m:.1f}  "
            f"target val mIoU {tgt_m:.1f}  per-class {per}"
        )


if __name__ == "__main__":
    main()
