"""HRDA and MIC inside the training step (DAFormer and DIDA method modules): detail boxes per
student forward, HRDA losses, the feature distance on the context view, pseudo-labels with the
margins, MIC on unmixed weights, DIDA composed with HRDA (context branch by default, the detail and
both-branch alternatives, the masked view), and the separate MIC teacher.

Method-level tests with a tiny HRDA model on 64×64 crops (detail crop 32, context view 32); the
training-loop tests (train → test, resume, run_exp.sh) are in `test_hrda_mic_train.py`.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dida.adapt import daformer as daformer_module
from dida.adapt.daformer import DAFormer
from dida.adapt.dida import DIDA
from dida.adapt.instance import instance_loss
from dida.adapt.instance_bank import InstanceBank
from dida.adapt.losses import feature_distance_loss
from dida.config import load_config, mic_block_size
from dida.eval.inference import resize
from dida.models import segmentor_from_config
from dida.models.hrda import HRDAOutput, crop_to_box

C, D, S = 5, 16, 64  # classes, embedding, crop
TINY = ["model.variant=mit_tiny", f"model.embed_dim={D}", "model.dilations=[1,2]",
        f"model.num_classes={C}", "model.pretrained=null", "model.drop_path_rate=0.0",
        "model.hrda.enabled=true", "model.hrda.attention_embed_dim=8",
        "model.hrda.detail_crop=[32,32]", f"data.crop_size=[{S},{S}]",
        "data.target_pseudo_margins=[8,8,0,0]", "method.teacher.ignore_top=0",
        "method.teacher.ignore_bottom=0", "method.mic.enabled=true", "method.mic.block_size=8",
        "method.bank.size=10", "method.feat_dist.classes=null"]  # fmt: skip


def _method(name: str = "dida", *extra: str, imnet: bool = False, seed: int = 0) -> DAFormer:
    cfg = load_config(None, [*TINY, f"method.name={name}", *extra])
    torch.manual_seed(seed)
    student = segmentor_from_config(cfg.model)
    encoder = None
    if imnet:  # a frozen "ImageNet" encoder that differs from the student's
        encoder = copy.deepcopy(student.encoder)
        with torch.no_grad():
            for p in encoder.parameters():
                p.add_(0.05 * torch.randn_like(p))
    mic = dataclasses.replace(cfg.method.mic, block_size=mic_block_size(cfg))
    method_cfg = dataclasses.replace(cfg.method, mic=mic)
    kwargs = dict(num_classes=C, generator=torch.Generator().manual_seed(seed),
                  hrda=cfg.model.hrda, imnet_encoder=encoder)  # fmt: skip
    if name == "dida":
        return DIDA(student, method_cfg, embed_dim=D, **kwargs).train()
    return DAFormer(student, method_cfg, **kwargs).train()


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, C, (2, S // 8, S // 8), generator=g)
    label = label.repeat_interleave(8, 1).repeat_interleave(8, 2)  # 8×8 blocks of classes
    valid = torch.ones(2, S, S)
    valid[:, :8] = valid[:, -8:] = 0  # the margins (top / bottom rows)
    src, tgt = torch.randn(2, 3, S, S, generator=g), torch.randn(2, 3, S, S, generator=g)
    return {"src_img": src, "src_label": label, "tgt_img": tgt, "valid_pseudo_mask": valid}


def _fill_banks(method: DIDA, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for bank in method.banks:
        bank.load_(torch.rand(bank.size, D, generator=g), torch.arange(bank.size) % C)


def _record_forwards(method: DAFormer) -> list[dict]:
    calls: list[dict] = []
    student = method.student

    def forward(img: torch.Tensor, **kwargs):  # noqa: ANN202, ANN003
        calls.append({"size": tuple(img.shape[-2:]), **kwargs})
        return student(img, **kwargs)

    method.set_student_forward(forward)
    return calls


def _step(method: DAFormer, batch: dict, want_images: bool = False):  # noqa: ANN202
    return method.forward_backward(batch, 1, lambda loss: loss.backward(), want_images)


def test_hrda_mic_step_runs_three_student_forwards_each_with_its_own_box() -> None:
    method = _method("dida")
    _fill_banks(method)
    calls = _record_forwards(method)
    step = _step(method, _batch(), want_images=True)
    assert len(calls) == 3  # source, mixed, masked: the teacher does not go through _forward
    boxes = [c["detail_box"] for c in calls]
    for y1, y2, x1, x2 in boxes:
        assert y2 - y1 == x2 - x1 == 32 and y1 % 8 == x1 % 8 == 0 and max(y1, x1) <= 24
    assert calls[0]["return_features"] is False  # no ImageNet encoder: no feature distance
    keys = {"src.loss_seg", "src.hr.loss_seg", "mix.loss_seg", "mix.hr.loss_seg", "pseudo.weight",
            "masked.loss_seg", "masked.hr.loss_seg", "instance.loss_in"}  # fmt: skip
    assert keys <= set(step.losses)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in step.losses.values())
    assert step.images["masked_img"].shape == (2, 3, S, S)
    grads = [p.grad for p in method.student.attention_head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in method.teacher.parameters())


def test_boxes_come_from_the_method_generator_in_step_order() -> None:
    a, b = _method("daformer", seed=3), _method("daformer", seed=3)
    calls_a, calls_b = _record_forwards(a), _record_forwards(b)
    _step(a, _batch())
    _step(b, _batch())
    assert [c["detail_box"] for c in calls_a] == [c["detail_box"] for c in calls_b]
    # the source box is the generator's first draw
    first = a.student.sample_box((S, S), torch.Generator().manual_seed(3))
    assert calls_a[0]["detail_box"] == first


@pytest.mark.parametrize("fd_scale", ["lr", "all"])
def test_hrda_feature_distance_uses_the_context_view(fd_scale: str) -> None:
    method = _method("daformer", f"model.hrda.fd_scale={fd_scale}", imnet=True)
    batch = _batch()
    img, label = batch["src_img"], batch["src_label"]
    state = method.generator.get_state()
    src = method.source_step(img, label, backward=lambda loss: None)
    box = method.student.sample_box((S, S), torch.Generator().set_state(state))
    assert src.output.box == box
    student, imnet = method.student, method.imnet
    with torch.no_grad():
        context = F.avg_pool2d(img, 2)  # bilinear ×0.5
        expected = feature_distance_loss(
            student.encoder(context)[-1], imnet(context)[-1], label, classes=None,
            num_classes=C,
        )  # fmt: skip
        if fd_scale == "all":
            crop = crop_to_box(img, box)
            expected = expected + feature_distance_loss(
                student.encoder(crop)[-1], imnet(crop)[-1], crop_to_box(label, box),
                classes=None, num_classes=C,
            )  # fmt: skip
    fd = torch.as_tensor(src.metrics["src.loss_feat_dist"])
    torch.testing.assert_close(fd, 0.005 * expected)


def test_pseudo_labels_from_the_fused_teacher_with_margins_and_mic_gets_them_unmixed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    method = _method("daformer", "method.teacher.pseudo_threshold=0.0")
    seen: dict = {}
    real_mic_loss, real_labels = daformer_module.mic_loss, method.pseudo_labels

    def spy_mic_loss(forward, masked_img, pseudo_label, pseudo_weight, **kwargs):  # noqa: ANN001, ANN202, ANN003
        seen.update(label=pseudo_label, weight=pseudo_weight, masked_img=masked_img)
        return real_mic_loss(forward, masked_img, pseudo_label, pseudo_weight, **kwargs)

    def spy_labels(*args):  # noqa: ANN002, ANN202
        seen["teacher"] = real_labels(*args)
        return seen["teacher"]

    monkeypatch.setattr(daformer_module, "mic_loss", spy_mic_loss)
    monkeypatch.setattr(method, "pseudo_labels", spy_labels)
    batch = _batch()
    step = _step(method, batch, want_images=True)
    teacher = seen["teacher"]
    with torch.no_grad():  # the teacher's fused prediction with sliding detail windows
        fused, embed_lr = method.teacher.model(batch["tgt_img"])
    assert fused.shape == (2, C, S // 4, S // 4) and embed_lr.shape == (2, D, 8, 8)
    expected = resize(fused, (S, S)).argmax(1)
    assert torch.equal(teacher.label, expected) and torch.equal(seen["label"], expected)
    valid = batch["valid_pseudo_mask"]
    assert torch.equal(teacher.weight, valid)  # q = 1 (threshold 0) times the margins
    assert torch.equal(seen["weight"], valid)  # MIC: the unmixed weight
    mixed_weight = step.images["pseudo_weight"]
    assert (mixed_weight[valid == 0] == 1).any()  # ClassMix pasted source pixels into margins
    assert (seen["masked_img"] == 0).float().mean() > 0.3  # masked blocks are 0


def test_mic_with_daformer_uses_one_ce_and_its_block_size() -> None:
    cfg_extra = ["model.hrda.enabled=false", "data.target_pseudo_margins=null",
                 "method.mic.block_size=null"]  # fmt: skip
    method = _method("daformer", *cfg_extra)
    assert method.hrda is None and method.cfg.mic.block_size == 32
    calls = _record_forwards(method)
    batch = {k: v for k, v in _batch().items() if k != "valid_pseudo_mask"}
    step = _step(method, batch)
    assert [c.get("detail_box") for c in calls] == [None] * 3
    assert "masked.loss_seg" in step.losses and "masked.hr.loss_seg" not in step.losses


def test_separate_mic_teacher_without_threshold() -> None:
    method = _method("daformer", "method.mic.teacher=separate", "method.mic.teacher_alpha=0.5",
                     "method.mic.pseudo_threshold=null")  # fmt: skip
    assert method.mic_teacher is not None and method.mic_teacher.alpha == 0.5
    method.update_teacher(0)
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.01)
    method.update_teacher(5)  # min(1 - 1/6, 0.5) = 0.5: halfway to the student
    s = next(method.student.parameters())
    m, t = next(method.mic_teacher.parameters()), next(method.teacher.parameters())
    torch.testing.assert_close(m, s - 0.005)
    assert not torch.allclose(t, m)
    batch = _batch()
    teacher = method.pseudo_labels(batch["tgt_img"], batch["valid_pseudo_mask"])
    label, weight = method.mic_pseudo_labels(batch["tgt_img"], teacher)
    assert torch.equal(weight, batch["valid_pseudo_mask"])  # weight 1 times the margins
    with torch.no_grad():
        expected = resize(method.mic_teacher.model(batch["tgt_img"])[0], (S, S)).argmax(1)
    assert torch.equal(label, expected)
    assert "mic_teacher" in method.training_state()


# --- DIDA composed with HRDA -------------------------------------------------------------------


def test_dida_hrda_bank_is_filled_from_the_context_branch() -> None:
    method = _method("dida")
    batch = _batch()
    src = method.source_step(batch["src_img"], batch["src_label"], backward=lambda loss: None)
    method.after_source_step(src, batch["src_label"], iteration=0)
    expected = InstanceBank(10, D, C, ignore_index=255)
    embed = F.interpolate(src.output.embed_lr, size=(32, 32), mode="bilinear")
    expected.fill_online_(embed, batch["src_label"][:, ::2, ::2])  # nearest 64 -> 32
    assert int(method.bank.count) == int(expected.count) > 0
    torch.testing.assert_close(method.bank.feats, expected.feats)
    assert torch.equal(method.bank.labels, expected.labels)


@pytest.mark.parametrize("source", ["student_mixed_logits", "teacher_probs"])
def test_dida_hrda_instance_loss_on_the_context_view(source: str) -> None:
    extra = [f"method.instance.calibrate_source={source}", "method.instance.resolution=input",
             f"method.instance.target_pixels_only={source == 'teacher_probs'}"]  # fmt: skip
    method = _method("dida", *extra)
    _fill_banks(method)
    batch = _batch()
    teacher = method.pseudo_labels(batch["tgt_img"], batch["valid_pseudo_mask"])
    torch.testing.assert_close(teacher.embed, method.teacher(batch["tgt_img"])[1])
    out = method.student(batch["src_img"], detail_box=(8, 40, 16, 48))
    masks = (torch.rand(2, S, S) > 0.5).float()
    loss, log = method.target_extra_loss(out.fused, out.embed_lr, teacher, masks, output=out)
    if source == "teacher_probs":
        calib, pixel_mask = F.avg_pool2d(teacher.probs, 2), 1 - masks[:, ::2, ::2]
    else:
        calib, pixel_mask = resize(out.fused.detach(), (32, 32)), None  # fused ×2, never out.lr
    expected = instance_loss(
        out.embed_lr, teacher.embed, method.bank.feats, method.bank.labels, calib,
        weight=0.5, out_size=(32, 32), pixel_mask=pixel_mask, calibrate_source=source,
    )  # fmt: skip
    torch.testing.assert_close(loss, expected)
    assert "instance.loss_in" in log


SLOW = pytest.mark.slow  # the default suite keeps one variant per flag group


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["method.compose.hrda_scale=hr"], id="hr"),
        pytest.param(["method.compose.hrda_scale=hr", "method.compose.hr_teacher=recompute_box"],
                     id="hr-recompute", marks=SLOW),
        pytest.param(["method.compose.hrda_scale=both"], id="both", marks=SLOW),
        pytest.param(["method.compose.hrda_scale=both", "method.compose.hrda_separate_banks=true"],
                     id="both-separate"),
        pytest.param(["method.compose.mic_view=add"], id="mic-add", marks=SLOW),
        pytest.param(["method.compose.mic_view=only", "method.compose.hrda_scale=both"],
                     id="mic-only-both"),
        pytest.param(["method.compose.mic_view=add", "model.hrda.enabled=false",
                      "method.mic.block_size=16", "data.target_pseudo_margins=null"],
                     id="no-hrda-mic-add", marks=SLOW),
    ],
)  # fmt: skip
def test_compose_variants_train(extra: list[str]) -> None:
    method = _method("dida", *extra)
    comp = method.cfg.compose
    assert len(method.banks) == (2 if comp.hrda_separate_banks else 1)
    batch = _batch()
    # the bank fill reaches every bank (side by side for `both` with one bank)
    src = method.source_step(batch["src_img"], batch["src_label"], backward=lambda loss: None)
    method.after_source_step(src, batch["src_label"], iteration=0)
    assert all(int(bank.count) > 0 for bank in method.banks)
    _fill_banks(method)
    method.student.zero_grad()
    step = _step(method, batch)
    assert ("instance.loss_in" in step.losses) == (comp.mic_view != "only")
    assert ("instance.masked.loss_in" in step.losses) == (comp.mic_view != "none")
    assert all(torch.isfinite(torch.as_tensor(v)) for v in step.losses.values())
    if len(method.banks) == 2:
        assert "bank_hr" in method.training_state()["method"]


def test_detail_views_of_the_teacher_slide_average_and_recomputed_box() -> None:
    """Without overlap and with eval-mode BatchNorm, the slide-averaged F_hr canvas cropped at a
    window equals a teacher pass on that window."""
    extra = ["method.compose.hrda_scale=hr", "model.hrda.slide_overlap=false",
             "method.teacher.bn=running"]  # fmt: skip
    slide = _method("dida", *extra)
    recompute = _method("dida", *extra, "method.compose.hr_teacher=recompute_box")
    assert slide.needs_teacher_detail_embed() and not recompute.needs_teacher_detail_embed()
    batch = _batch()
    box = (32, 64, 0, 32)  # one of the 2×2 windows
    t_slide = slide.pseudo_labels(batch["tgt_img"])
    t_recompute = recompute.pseudo_labels(batch["tgt_img"])
    assert isinstance(t_slide.output, HRDAOutput) and t_recompute.output is None
    a = slide._teacher_detail_embed(t_slide, box)
    b = recompute._teacher_detail_embed(t_recompute, box)
    assert a.shape == (2, D, 8, 8)
    torch.testing.assert_close(a, b)
