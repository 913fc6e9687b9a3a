"""HRDA segmentor: parameter counts, detail boxes, scale-attention fusion against a hand
computation, training/teacher forwards, sliding detail windows, loss split, encoder checkpointing,
and `dida test` / `dida weights inspect` on a released-layout HRDA checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dida.adapt.hrda import hrda_seg_loss
from dida.adapt.losses import pixel_weighted_ce
from dida.cli.main import main
from dida.config import ConfigError, load_config, save_config, validate_hrda_mic
from dida.eval.evaluate import evaluate, load_segmentor
from dida.eval.inference import resize
from dida.models import segmentor_from_config
from dida.models.hrda import (
    HRDASegmentor,
    build_attention_head,
    fuse_scales,
    paste_windows,
    sample_detail_box,
)

TINY = ["model.variant=mit_tiny", "model.embed_dim=16", "model.dilations=[1,2]",
        "model.num_classes=5", "model.hrda.enabled=true", "model.hrda.attention_embed_dim=8",
        "model.hrda.detail_crop=[32,32]", "model.pretrained=null"]  # fmt: skip


def tiny_hrda(*extra: str, seed: int = 0) -> HRDASegmentor:
    torch.manual_seed(seed)
    model = segmentor_from_config(load_config(None, [*TINY, *extra]).model)
    assert isinstance(model, HRDASegmentor)
    return model


# --- sizes and parameters --------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta_b5() -> HRDASegmentor:
    """The published HRDA model (MiT-B5, 19 classes) on the meta device: shapes, no numbers."""
    with torch.device("meta"):
        return segmentor_from_config(load_config(None, ["model.hrda.enabled=true"]).model)


def test_parameter_counts_of_the_published_model(meta_b5: HRDASegmentor) -> None:
    model = meta_b5
    with torch.device("meta"):
        dims = model.encoder.embed_dims
        classwise = build_attention_head(dims, 19, classwise=True)
        single = build_attention_head(dims, 19, classwise=False)
        fixed = segmentor_from_config(
            load_config(None, ["model.hrda.enabled=true", "model.hrda.attention=fixed:0.5"]).model
        )
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(classwise) == 530_707 and count(single) == 526_081
    assert count(model) == 85_685_990  # one encoder and one head for both branches
    assert count(model.head) == 3_712_275
    assert fixed.attention_head is None and count(fixed) == 85_685_990 - 530_707
    keys = model.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"encoder", "head", "attention_head"}


def test_published_shapes_on_meta_tensors(meta_b5: HRDASegmentor) -> None:
    """Spec F at B = 2, 1024² crops, 512² detail: LR/HR [2,3,512²], logits 128², fused 256²,
    teacher: the head decodes 2 context crops and 18 detail windows."""
    model = meta_b5
    with torch.device("meta"):
        img = torch.empty(2, 3, 1024, 1024)
        out = model(img, detail_box=(8, 520, 504, 1016))
        head_batches: list[int] = []
        model.head.register_forward_pre_hook(lambda m, a: head_batches.append(a[0][0].shape[0]))
        teacher = model.eval()(img, full_output=True)
    assert out.fused.shape == (2, 19, 256, 256)
    assert out.lr.shape == out.hr.shape == out.attention.shape == (2, 19, 128, 128)
    assert out.embed_lr.shape == out.embed_hr.shape == (2, 256, 128, 128)
    assert head_batches == [2, 18]
    assert teacher.fused.shape == teacher.hr.shape == (2, 19, 256, 256)
    assert teacher.embed_hr.shape == (2, 256, 256, 256) and teacher.box is None


def test_attention_head_gets_the_head_learning_rate() -> None:
    from dida.config import OptimConfig
    from dida.engine.optim import param_groups

    model = tiny_hrda()
    groups = param_groups(model, OptimConfig(lr=1.0, head_lr_mult=10.0))
    ten = {id(p) for g in groups if g["lr"] == 10.0 for p in g["params"]}
    heads = list(model.head.parameters()) + list(model.attention_head.parameters())
    assert ten == {id(p) for p in heads}  # as decode_head.* in the reference (BN included)


def test_attention_starts_near_one_half() -> None:
    model = tiny_hrda().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), full_output=True)
    assert out.attention.shape == (2, 5, 8, 8)
    assert (out.attention - 0.5).abs().max() < 0.05  # classifier init N(0, 0.01), bias 0


# --- detail boxes ------------------------------------------------------------------------------


def test_detail_box_offsets_faithful_and_full_range() -> None:
    gen = torch.Generator().manual_seed(0)
    boxes = [sample_detail_box((1024, 1024), (512, 512), 8, generator=gen) for _ in range(1500)]
    starts = {b[0] for b in boxes} | {b[2] for b in boxes}
    assert starts == set(range(0, 505, 8))  # 64 values; 512 is never drawn (as the reference)
    assert all(b[1] - b[0] == 512 and b[3] - b[2] == 512 for b in boxes)
    full = [
        sample_detail_box((1024, 1024), (512, 512), 8, full_offset_range=True, generator=gen)
        for _ in range(1500)
    ]
    assert {b[0] for b in full} == set(range(0, 513, 8))
    # y and x drawn independently; the same seed gives the same boxes
    assert len({(b[0], b[2]) for b in boxes}) > 1000
    again = torch.Generator().manual_seed(0)
    assert sample_detail_box((1024, 1024), (512, 512), 8, generator=again) == boxes[0]


def test_detail_box_edge_cases() -> None:
    assert sample_detail_box((64, 96), (64, 96), 8) == (0, 64, 0, 96)  # crop = image
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):  # margins not divisible by 8, one of them 0
        y1, y2, x1, x2 = sample_detail_box((100, 64), (64, 64), 8, generator=gen)
        assert y1 % 8 == 0 and 0 <= y1 <= 36 and y2 == y1 + 64 and (x1, x2) == (0, 64)
    with pytest.raises(ValueError, match="larger than the image"):
        sample_detail_box((64, 64), (65, 32), 8)
    model = tiny_hrda()
    box = model.sample_box((64, 64), torch.Generator().manual_seed(3))
    assert box[1] - box[0] == 32 and box[0] % 8 == 0 and box[0] <= 24


# --- fusion --------------------------------------------------------------------------------------

# bilinear ×2 upsampling of 2 cells (align_corners False), written out by hand
_UP = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])


def _up(x: torch.Tensor) -> torch.Tensor:
    """[..., 2, 2] -> [..., 4, 4] by the hand-written interpolation matrix."""
    return _UP @ x @ _UP.T


def _fusion_case() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    lr = torch.randn(1, 2, 2, 2)  # context logits: 2x2 cells over a 16x16 input (stride 8)
    hr = torch.randn(1, 2, 2, 2)  # detail logits of the box (8..16)², stride 4
    att = torch.rand(1, 2, 2, 2)
    hr_in = torch.zeros(1, 2, 4, 4)
    hr_in[:, :, 2:, 2:] = hr
    return lr, hr, att, hr_in


def test_faithful_fusion_matches_hand_computation_inside_and_outside_the_box() -> None:
    lr, hr, att, hr_in = _fusion_case()
    box = (8, 16, 8, 16)
    fused, lr_out, att_used = fuse_scales(lr, hr, att, box, (16, 16), (4, 4), faithful=True)
    mask = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # the box on the context grid: cell (1, 1)
    a = att * mask
    torch.testing.assert_close(att_used, a)
    torch.testing.assert_close(lr_out, (1 - a) * lr)  # the returned lr is attenuated (E3)
    torch.testing.assert_close(fused, _up(a) * hr_in + _up((1 - a) * lr))
    a11, lr11 = att[..., 1, 1], lr[..., 1, 1]
    # outside, away from the box: the context prediction
    torch.testing.assert_close(fused[..., 0, 0], lr[..., 0, 0])
    # the far corner inside the box: a·hr + (1 - a)·lr of that cell
    torch.testing.assert_close(fused[..., 3, 3], a11 * hr[..., 1, 1] + (1 - a11) * lr11)
    # the first pixel inside the box edge gets 0.75·0.75·a (reference quirk) times the detail logit
    lr_part = _up((1 - a) * lr)[..., 2, 2]
    torch.testing.assert_close(fused[..., 2, 2], 0.5625 * a11 * hr[..., 0, 0] + lr_part)
    # just outside the edge: no detail logit, but the attenuated lr cell leaks in (weight 1/16)
    expected_11 = 0.5625 * lr[..., 0, 0] + 0.1875 * (lr[..., 0, 1] + lr[..., 1, 0])
    torch.testing.assert_close(fused[..., 1, 1], expected_11 + 0.0625 * (1 - a11) * lr11)


def test_exact_fusion_is_the_context_prediction_outside_the_box() -> None:
    lr, hr, att, hr_in = _fusion_case()
    fused, lr_out, att_used = fuse_scales(lr, hr, att, (8, 16, 8, 16), (16, 16), (4, 4),
                                          faithful=False)  # fmt: skip
    box_mask = torch.zeros(4, 4)
    box_mask[2:, 2:] = 1
    a = _up(att) * box_mask
    torch.testing.assert_close(att_used, a)
    torch.testing.assert_close(lr_out, lr)
    torch.testing.assert_close(fused, a * hr_in + (1 - a) * _up(lr))
    outside = box_mask == 0
    torch.testing.assert_close(fused[..., outside], _up(lr)[..., outside])


def test_fusion_without_box_and_fixed_attention() -> None:
    lr, _, att, _ = _fusion_case()
    hr = torch.randn(1, 2, 4, 4)  # the whole detail canvas
    fused, _, _ = fuse_scales(lr, hr, att, None, (16, 16), (4, 4))
    torch.testing.assert_close(fused, _up(att) * hr + _up((1 - att) * lr))
    fused, lr_out, _ = fuse_scales(lr, hr, 0.25, None, (16, 16), (4, 4))
    torch.testing.assert_close(fused, 0.25 * hr + _up(0.75 * lr))
    with pytest.raises(ValueError, match="do not fit the box"):
        fuse_scales(lr, hr, att, (8, 16, 8, 16), (16, 16), (4, 4))


@pytest.mark.parametrize("faithful", ["true", "false"])
def test_fixed_attention_one_gives_detail_zero_gives_context(faithful: str) -> None:
    """Spec F: with the detail box covering the context crop, a ≡ 1 -> fused = HR prediction,
    a ≡ 0 -> fused = ×2-upsampled LR prediction."""
    img = torch.randn(2, 3, 64, 64)
    flags = ("model.hrda.detail_crop=[64,64]", f"model.hrda.faithful_fusion={faithful}")
    ones = tiny_hrda("model.hrda.attention=fixed:1.0", *flags)
    out = ones.eval()(img, detail_box=(0, 64, 0, 64))
    torch.testing.assert_close(out.fused, out.hr)
    zeros = tiny_hrda("model.hrda.attention=fixed:0.0", *flags)
    out = zeros.eval()(img, detail_box=(0, 64, 0, 64))
    torch.testing.assert_close(out.fused, resize(out.lr, out.fused.shape[-2:]))
    lr_plain = zeros.head(zeros.encoder(zeros.context_view(img)))[0]
    torch.testing.assert_close(out.lr, lr_plain)


# --- forwards ----------------------------------------------------------------------------------


def test_training_forward_decodes_the_context_view_and_the_box() -> None:
    model = tiny_hrda().eval()  # deterministic: no dropout, BN running statistics
    img = torch.randn(2, 3, 64, 64)
    box = (8, 40, 24, 56)
    with torch.no_grad():
        out = model(img, detail_box=box, return_features=True)
        context = model.context_view(img)
        hr, embed_hr = model.head(model.encoder(img[:, :, 8:40, 24:56]))
        lr, embed_lr = model.head(model.encoder(context))
    torch.testing.assert_close(context, F.avg_pool2d(img, 2))  # bilinear ×0.5 = 2×2 mean
    torch.testing.assert_close(out.hr, hr)
    torch.testing.assert_close(out.embed_hr, embed_hr)
    torch.testing.assert_close(out.embed_lr, embed_lr)
    torch.testing.assert_close(out.features[-1], model.encoder(context)[-1])
    assert out.features_hr[0].shape == (2, 8, 8, 8) and out.box == box
    assert out.fused.shape == (2, 5, 16, 16) and out.input_size == (64, 64)
    # outside the box (and away from its edges) the fused prediction is the context prediction
    torch.testing.assert_close(out.fused[..., :, :4], resize(lr, (16, 16))[..., :, :4])


def test_training_forward_has_gradients_for_all_three_parts() -> None:
    model = tiny_hrda().train()
    out = model(torch.randn(2, 3, 64, 64), detail_box=(0, 32, 32, 64))
    out.fused.sum().backward()
    for part in (model.encoder, model.head, model.attention_head):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_inference_forward_is_the_segmentor_contract() -> None:
    model = tiny_hrda().eval()
    img = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        logits, embed = model(img)
        logits_f, embed_f, feats = model(img, return_features=True)
        full = model(img, full_output=True)
    assert logits.shape == (1, 5, 16, 24) and embed.shape == (1, 16, 8, 12)
    torch.testing.assert_close(logits, full.fused)
    torch.testing.assert_close(embed, full.embed_lr)
    torch.testing.assert_close(logits_f, logits)
    assert len(feats) == 4 and full.embed_hr.shape == (1, 16, 16, 24)


def test_slide_detail_with_one_window_equals_whole_detail_pass() -> None:
    img = torch.randn(2, 3, 64, 64)
    model = tiny_hrda("model.hrda.detail_crop=[64,64]").eval()  # one window covers the input
    with torch.no_grad():
        slide = model(img, full_output=True)
        model.slide_detail = False
        whole = model(img, full_output=True)
    assert len(model.slide_boxes((64, 64))) == 1
    for name in ("fused", "hr", "embed_hr", "lr"):
        torch.testing.assert_close(getattr(slide, name), getattr(whole, name))


def test_overlapping_detail_windows_are_averaged() -> None:
    model = tiny_hrda().eval()
    assert model.slide_boxes((64, 64)) == [
        (y, y + 32, x, x + 32) for y in (0, 16, 32) for x in (0, 16, 32)
    ]  # stride = window // 2: 3×3 windows (the published 1024 crop / 512 window case)
    model.slide_overlap = False
    assert len(model.slide_boxes((64, 64))) == 4
    # window i carries the value i; each canvas cell averages the windows covering it
    boxes = [(y, y + 8, x, x + 8) for y in (0, 4, 8) for x in (0, 4, 8)]
    windows = torch.arange(9.0).repeat_interleave(2).view(18, 1, 1, 1).expand(18, 1, 8, 8)
    canvas = paste_windows(windows, boxes, 2, (16, 16))
    for y in range(16):
        for x in range(16):
            cover = [i for i, b in enumerate(boxes) if b[0] <= y < b[1] and b[2] <= x < b[3]]
            assert len(cover) in (1, 2, 4)
            assert canvas[1, 0, y, x] == pytest.approx(sum(cover) / len(cover))
    with pytest.raises(ValueError, match="do not cover"):
        paste_windows(windows[:2], boxes[:1], 2, (16, 16))


def test_blur_detail_view() -> None:
    model = tiny_hrda("model.hrda.blur_detail=true")
    img = torch.randn(1, 3, 16, 16)
    expected = F.interpolate(F.avg_pool2d(img, 2), scale_factor=2.0, mode="bilinear")
    torch.testing.assert_close(model.detail_view(img), expected)


# --- loss, memory flag ---------------------------------------------------------------------------


def test_hrda_loss_is_fused_on_full_label_plus_detail_on_the_box() -> None:
    model = tiny_hrda().train()
    img = torch.randn(2, 3, 64, 64)
    label = torch.randint(0, 5, (2, 64, 64))
    label[:, :5] = 255
    weight = torch.rand(2, 64, 64)
    box = (16, 48, 8, 40)
    out = model(img, detail_box=box)
    terms = hrda_seg_loss(out, label, weight, detail_weight=0.1)
    fused = pixel_weighted_ce(resize(out.fused, (64, 64)), label, weight)
    detail = pixel_weighted_ce(
        resize(out.hr, (32, 32)), label[:, 16:48, 8:40], weight[:, 16:48, 8:40]
    )
    assert set(terms) == {"loss_seg", "hr.loss_seg"}
    torch.testing.assert_close(terms["loss_seg"], 0.9 * fused)
    torch.testing.assert_close(terms["hr.loss_seg"], 0.1 * detail)
    terms = hrda_seg_loss(out, label, None, detail_weight=0.2, context_weight=0.3)
    torch.testing.assert_close(
        terms["lr.loss_seg"], 0.3 * pixel_weighted_ce(resize(out.lr, (64, 64)), label)
    )
    torch.testing.assert_close(
        terms["loss_seg"], 0.5 * pixel_weighted_ce(resize(out.fused, (64, 64)), label)
    )
    sum(terms.values()).backward()
    assert model.attention_head.conv_seg.weight.grad is not None


def test_checkpoint_encoder_gives_identical_outputs_and_gradients() -> None:
    plain = tiny_hrda("model.drop_path_rate=0.3", seed=4).train()
    ckpt = tiny_hrda("model.drop_path_rate=0.3", "model.checkpoint_encoder=true", seed=4).train()
    assert ckpt.encoder.grad_checkpointing and not plain.encoder.grad_checkpointing
    img = torch.randn(2, 3, 64, 64)
    outs = []
    for model in (plain, ckpt):
        torch.manual_seed(7)  # same drop-path and dropout draws
        out = model(img, detail_box=(0, 32, 8, 40))
        loss = (out.fused.square().mean() + out.hr.mean()) * 10
        loss.backward()
        outs.append((out.fused.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    assert outs[0][1].keys() == outs[1][1].keys()
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # no recomputation machinery without a graph
        torch.testing.assert_close(ckpt.eval()(img)[0], plain.eval()(img)[0])


# --- config, released checkpoints, dida test ------------------------------------------------------


def test_config_validation() -> None:
    cfg = load_config(None, ["model.hrda.enabled=true", "data.crop_size=[1024,1024]"])
    validate_hrda_mic(cfg)
    bad = [
        (["model.hrda.attention=fixed:2"], "model.hrda.attention"),
        (["model.hrda.attention=soft"], "model.hrda.attention"),
        (
            ["model.hrda.enabled=true", "model.hrda.detail_crop=[600,512]"],
            "model.hrda.detail_crop",
        ),  # larger than data.crop_size
        (["data.target_pseudo_margins=[30,240,30]"], "data.target_pseudo_margins"),
        (["data.target_pseudo_margins=[30,240,30,30]"], "ignore_top/ignore_bottom"),
        (["method.mic.mode=source"], "method.mic.mode"),
        (["method.mic.ratio=1.0"], "method.mic.ratio"),
        (["method.compose.mic_view=add"], "method.compose.mic_view"),
        (["method.compose.hrda_scale=hr"], "method.compose.hrda_scale"),
    ]
    for overrides, key in bad:
        with pytest.raises(ConfigError, match=key):
            validate_hrda_mic(load_config(None, overrides))
    ok = ["data.target_pseudo_margins=[30,240,30,30]", "method.teacher.ignore_top=0",
          "method.teacher.ignore_bottom=0", "method.mic.enabled=true",
          "method.compose.mic_view=add"]  # fmt: skip
    validate_hrda_mic(load_config(None, ok))


def _released_state(model: HRDASegmentor) -> dict[str, torch.Tensor]:
    """`model`'s weights in the released HRDA/MIC mmseg layout, with teacher and ImageNet copies."""
    state = {}
    for key, value in model.state_dict().items():
        part, rest = key.split(".", 1)
        name = {"encoder": "backbone.", "head": "decode_head.head.",
                "attention_head": "decode_head.scale_attention."}[part] + rest  # fmt: skip
        state[f"model.{name}"] = value
        state[f"ema_model.{name}"] = torch.zeros_like(value)
        if part == "encoder":
            state[f"imnet_model.{name}"] = torch.zeros_like(value)
    return state


@pytest.fixture(scope="module")
def hrda_run(tiny_uda_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("hrda_run")
    overrides = [*TINY, "model.num_classes=19", f"data.val.root={tiny_uda_root / 'cityscapes'}",
                 "eval.scale=[128,64]", "eval.mode=slide", "eval.crop_size=[64,64]",
                 "eval.stride=[32,32]", "eval.batched_slide=true", "eval.num_workers=0",
                 "train.device=cpu", "name=tiny_hrda"]  # fmt: skip
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = segmentor_from_config(cfg.model)
    with torch.no_grad():  # spread the logits so that several classes get predicted
        model.head.conv_seg.weight.mul_(50.0)
    save_config(cfg, tmp / "tiny_hrda.json")
    ckpt = tmp / "released_mic_hrda.pth"
    torch.save({"meta": {"iter": 40000}, "state_dict": _released_state(model)}, ckpt)
    return {"cfg": cfg, "config": tmp / "tiny_hrda.json", "ckpt": ckpt, "model": model}


def test_released_hrda_checkpoint_loads_exactly(hrda_run: dict) -> None:
    model = load_segmentor(hrda_run["cfg"].model, hrda_run["ckpt"])
    assert isinstance(model, HRDASegmentor)
    for key, value in hrda_run["model"].state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_dida_test_evaluates_a_released_hrda_checkpoint(
    hrda_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from dida.data.uda import build_val_dataset

    out = tmp_path / "res.json"
    args = ["test", str(hrda_run["config"]), str(hrda_run["ckpt"]), "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    results = json.loads(out.read_text())
    cfg = hrda_run["cfg"]
    expected = evaluate(
        hrda_run["model"].eval(), build_val_dataset(cfg.data.val, cfg.eval.scale),
        num_classes=19, mode="slide", crop_size=[64, 64], stride=[32, 32], progress=False,
    )  # fmt: skip
    assert results["mode"] == "slide" and results["num_images"] == 4
    assert results["mIoU"] == pytest.approx(expected["mIoU"])
    capsys.readouterr()
    # the same checkpoint with a non-HRDA config is refused in one line
    refused = [
        "test",
        str(hrda_run["config"]),
        str(hrda_run["ckpt"]),
        "--out",
        str(tmp_path / "refused.json"),
    ]
    assert main([*refused, "--set", "model.hrda.enabled=false", "--no-progress"]) == 2
    assert "model.hrda.enabled=true" in capsys.readouterr().err
    # inspect names the HRDA layout
    assert main(["weights", "inspect", str(hrda_run["ckpt"])]) == 0
    text = capsys.readouterr().out
    assert "mmseg" in text and "classwise attention" in text and "mit_tiny" in text


def test_hrda_model_refuses_a_checkpoint_without_attention(hrda_run: dict, tmp_path: Path) -> None:
    from dida.errors import CheckpointError

    state = {k: v for k, v in _released_state(hrda_run["model"]).items()
             if "scale_attention" not in k}  # fmt: skip
    path = tmp_path / "daformer.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match="HRDA model needs an HRDA checkpoint"):
        load_segmentor(hrda_run["cfg"].model, path)
    fixed = load_config(None, [*TINY, "model.num_classes=19", "model.hrda.attention=fixed:1.0"])
    assert load_segmentor(fixed.model, path).fixed_attention == 1.0  # `--hrda-out HR` analogue
