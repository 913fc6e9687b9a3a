"""Tests for dida.eval.evaluate with an oracle model: modes, callback, eval/no_grad, DDP shards."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import gloo_group, run_two_ranks
from torch import nn
from torch.utils.data import Dataset

from dida.eval.evaluate import evaluate

NUM_CLASSES = 3


class OracleModel(nn.Module):
    """Logits = the one-hot 'image' pooled to 1/4 resolution; records its mode and grad state."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append((self.training, torch.is_grad_enabled()))
        logits = F.avg_pool2d(img, 4) * self.scale  # [B, C, H/4, W/4]
        return logits, logits


class BlockDataset(Dataset):
    """Vertical label stripes 8 px wide (some ignored); the image is the label's one-hot encoding.

    Stripes keep the bilinear upsampling of the 1/4-resolution oracle logits exact (1-D blending,
    the nearer cell always weighs >= 0.625).
    """

    classes = ("a", "b", "c")

    def __init__(self, n: int = 5, size: int = 32) -> None:
        gen = torch.Generator().manual_seed(0)
        cells = torch.randint(0, NUM_CLASSES + 1, (n, 1, size // 8), generator=gen)
        cells[cells == NUM_CLASSES] = 255
        self.labels = cells.repeat_interleave(8, 2).expand(n, size, size).clone()  # [n, H, W]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        label = self.labels[index]
        img = F.one_hot(label.clamp(max=NUM_CLASSES - 1), NUM_CLASSES).permute(2, 0, 1).float()
        return {"img": img, "label": label, "img_path": f"img{index}.png", "label_path": "-"}


def test_whole_inference_oracle_scores_one_and_calls_back() -> None:
    model, dataset = OracleModel().train(), BlockDataset()
    seen: list[tuple[str, torch.Tensor]] = []
    res = evaluate(
        model, dataset, num_classes=NUM_CLASSES, progress=False,
        on_prediction=lambda pred, item: seen.append((item["img_path"], pred)),
    )  # fmt: skip
    assert res["mIoU"] == pytest.approx(1.0) and res["aAcc"] == pytest.approx(1.0)
    assert list(res["IoU"]) == ["a", "b", "c"]  # class names taken from the dataset
    assert [p for p, _ in seen] == [f"img{i}.png" for i in range(5)]
    for (_, pred), label in zip(seen, dataset.labels, strict=True):
        assert pred.shape == (32, 32) and pred.dtype == torch.int64 and pred.device.type == "cpu"
        valid = label != 255
        assert torch.equal(pred[valid], label[valid])
    assert model.calls and all(c == (False, False) for c in model.calls)  # eval mode, no grad
    assert model.training  # previous mode restored


def test_slide_inference_and_subsets() -> None:
    model, dataset = OracleModel().eval(), BlockDataset(n=2)
    res = evaluate(
        model, dataset, num_classes=NUM_CLASSES, mode="slide", crop_size=(16, 16),
        stride=(8, 8), subsets={"ab": [0, 1]}, progress=False,
    )  # fmt: skip
    assert res["mIoU"] == pytest.approx(1.0) and res["mIoUab"] == pytest.approx(1.0)
    assert len(model.calls) == 2 * 9  # 3x3 windows per image
    assert not model.training
    with pytest.raises(ValueError, match="unknown inference mode"):
        evaluate(model, dataset, num_classes=NUM_CLASSES, mode="tta", progress=False)


def test_wrong_prediction_lowers_score() -> None:
    class Shifted(OracleModel):
        def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = super().forward(img)[0].roll(1, dims=1)  # class c -> c + 1
            return logits, logits

    res = evaluate(Shifted(), BlockDataset(), num_classes=NUM_CLASSES, progress=False)
    assert res["mIoU"] == 0.0 and res["aAcc"] == 0.0


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    with gloo_group(rank, world, port):
        seen: list[str] = []

        class Half(OracleModel):  # wrong on odd images, so the ranks' shards differ in score
            def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                logits = super().forward(img)[0]
                return (logits.roll(1, dims=1) if len(seen) % 2 else logits), logits

        res = evaluate(
            Half(), BlockDataset(), num_classes=NUM_CLASSES, progress=False,
            on_prediction=lambda pred, item: seen.append(item["img_path"]),
        )  # fmt: skip
        out[rank] = (seen, res["mIoU"], res["num_pixels"])


def test_ddp_shards_without_duplicates_and_reduces() -> None:
    out = mp.Manager().dict()
    run_two_ranks(_worker, out)
    (seen0, miou0, pix0), (seen1, miou1, pix1) = out[0], out[1]
    assert seen0 == ["img0.png", "img2.png", "img4.png"] and seen1 == ["img1.png", "img3.png"]
    assert miou0 == miou1 and pix0 == pix1  # every rank reports the global numbers
    dataset = BlockDataset()
    assert pix0 == int(sum((label != 255).sum() for label in dataset.labels))


def test_load_segmentor_restores_every_weight(tmp_path) -> None:
    from dida.config import ModelConfig
    from dida.errors import CheckpointError
    from dida.eval.evaluate import load_segmentor
    from dida.models import segmentor_from_config

    model_cfg = ModelConfig(variant="mit_b0", num_classes=4, embed_dim=16, pretrained=None)
    model = segmentor_from_config(model_cfg).eval()
    torch.save({"format": "dida", "student": model.state_dict()}, tmp_path / "ckpt.pth")
    loaded = load_segmentor(model_cfg, tmp_path / "ckpt.pth")
    assert not loaded.training
    reference = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, reference[name]), name
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(img)[0], model(img)[0])
    partial = {k: v for k, v in reference.items() if not k.startswith("head.")}
    torch.save({"student": partial}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing"):
        load_segmentor(model_cfg, tmp_path / "partial.pth")


def test_meta_build_skips_the_random_init() -> None:
    """`load_segmentor` builds on the meta device and fills nothing at random there: torch's meta
    `normal_` would import `torch._dynamo` (~1 s of every `dida test`). A normal build still
    draws the original init (the same weights for the same seed)."""
    import subprocess
    import sys

    from dida.config import ModelConfig
    from dida.models import segmentor_from_config

    code = (
        "import sys\n"
        "import torch\n"
        "from dida.config import ModelConfig\n"
        "from dida.eval.evaluate import _build_uninitialised\n"
        "drawn = []\n"
        "for name in ('trunc_normal_', 'normal_'):\n"  # the original init's random fills
        "    def fill(tensor, *args, _f=getattr(torch.nn.init, name), **kwargs):\n"
        "        drawn.append(tensor.shape) if not tensor.is_meta else None\n"
        "        return _f(tensor, *args, **kwargs)\n"
        "    setattr(torch.nn.init, name, fill)\n"
        "model = _build_uninitialised(ModelConfig(variant='mit_b0', pretrained=None))\n"
        "assert not any(p.is_meta for p in model.parameters())\n"
        "print(len(drawn), 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # the meta build was taken (no fallback to a normal build: nothing was drawn) and it did not
    # import torch._dynamo
    assert out.stdout.strip() == "0 False"
    model_cfg = ModelConfig(variant="mit_b0", num_classes=4, embed_dim=16, pretrained=None)
    torch.manual_seed(0)
    a = segmentor_from_config(model_cfg).state_dict()
    torch.manual_seed(0)
    b = segmentor_from_config(model_cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the original init, not the layers' default (uniform, std ~0.1-0.15 at these sizes)
    assert 0.008 < a["head.conv_seg.weight"].std() < 0.012  # normal(0, 0.01)
    assert 0.016 < a["encoder.block1.0.attn.q.weight"].std() < 0.024  # trunc-normal(0.02)
