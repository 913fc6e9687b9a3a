"""Faithfulness of the reference preset (experiments 7 and 8) to the released DIDA code.

Each reference computation is transcribed literally from the specification of the released code
(bank update, similarities, the "gather" calibration with the student's mixed-image logits, the
instance target, L_in and its gradient): per-pixel loops or fully materialised [B, K, H, W]
tensors at input resolution, sharing no code with `dida.adapt`. Our implementation runs as the
experiment-7 method module does (float64 here) and must agree to a relative error of 1e-5.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dida.adapt.daformer import SourceOutput, TeacherOutput
from dida.adapt.dida import DIDA
from dida.experiments import find_experiment
from dida.models import build_segmentor

B, C, D, K = 2, 5, 6, 14  # batch, classes, embedding dim, bank size
h, w = 5, 6  # feature grid (1/4 of the crop)
H, W = 20, 24  # crop = input resolution
IGNORE = 255
RARE_SEQ = [18, 12, 17, 16, 7, 6, 11, 15, 4, 5, 14, 3, 9, 13, 8, 1, 10, 2, 0]


def _reference_method(exp: str = "7", **overrides) -> DIDA:  # noqa: ANN003
    """The DIDA module with experiment `exp`'s method config, tiny sizes, float64."""
    cfg = find_experiment(exp).config.method
    bank = dataclasses.replace(cfg.bank, size=K, **overrides)
    cfg = dataclasses.replace(cfg, bank=bank)
    student = build_segmentor("mit_tiny", num_classes=C, embed_dim=D, dilations=(1, 2))
    return DIDA(student, cfg, num_classes=C, embed_dim=D).double()


def _random_bank(method: DIDA, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(K, D, generator=g, dtype=torch.float64) * 4  # non-negative, as the caches
    labels = torch.arange(K) % C
    labels = labels[torch.randperm(K, generator=g)]
    method.bank.load_(feats, labels)
    assert torch.equal(method.bank.feats, feats)  # float64 end to end
    return feats.clone(), labels.clone()


def _labels(seed: int) -> torch.Tensor:
    """Labels at the crop with ignore pixels; class C-1 only in image 1, class 0 nowhere."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(1, C - 1, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g) < 0.2] = IGNORE
    labels[1, :4, :5] = C - 1
    return labels


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------
# literal transcriptions of the released code (docs/method.md §3.3.1, §3.4, §3.5, §3.7, §3.9)


def literal_bank_update(f, lbl, emb_s, gt, momentum):  # noqa: ANN001, ANN201
    """`ema_update_bank`: image 0 only, positions of the class searched over the whole batch."""
    f = f.clone()
    feat = emb_s[0].reshape(D, -1)  # image 0's features, flattened positions
    cache = torch.zeros(C, D, dtype=f.dtype)
    for c in RARE_SEQ:
        if c >= C:
            continue
        idx = []
        for b in range(gt.shape[0]):  # "for any b": duplicates kept
            flat = gt[b].reshape(-1).tolist()
            idx += [p for p, v in enumerate(flat) if v == c]
        if not idx:
            continue  # cache row stays 0
        cache[c] = torch.stack([feat[:, p] for p in idx]).mean(0)
    for k in range(f.shape[0]):
        f[k] = momentum * f[k] + (1 - momentum) * cache[int(lbl[k])]
    return f


def literal_per_image_update(f, lbl, emb_s, gt, momentum):  # noqa: ANN001, ANN201
    """The intended rule: each image's own class means, absent classes untouched."""
    f = f.clone()
    for b in range(gt.shape[0]):
        flat = gt[b].reshape(-1).tolist()
        feat = emb_s[b].reshape(D, -1)
        for c in range(C):
            idx = [p for p, v in enumerate(flat) if v == c]
            if not idx:
                continue
            mean = torch.stack([feat[:, p] for p in idx]).mean(0)
            for k in range(f.shape[0]):
                if int(lbl[k]) == c:
                    f[k] = momentum * f[k] + (1 - momentum) * mean
    return f


def literal_loss_in(emb_w, emb_m, logits_m, f, lbl, lam=0.5, drop_zero=False):  # noqa: ANN001
    """Steps 9, 14, 16, 17 with materialised [B, K, H, W] tensors at input resolution."""
    n_b, _, n_h, n_w = emb_w.shape
    s_w = torch.zeros(n_b, f.shape[0], n_h, n_w, dtype=emb_w.dtype)
    s_s = torch.zeros_like(s_w)
    g = torch.zeros_like(s_w)
    for k in range(f.shape[0]):
        s_w[:, k] = (emb_w * f[k][None, :, None, None]).sum(1)
        s_s[:, k] = (emb_m * f[k][None, :, None, None]).sum(1)
        g[:, k] = logits_m[:, int(lbl[k])]
    t = s_w * g
    if drop_zero:  # our documented rule for a zero normaliser: no contribution, still counted
        keep = (t.sum(1) != 0) & (s_s.sum(1) != 0)  # [B, H, W]
        t, s_s = t.permute(0, 2, 3, 1)[keep], s_s.permute(0, 2, 3, 1)[keep]  # [N, K]
        t = t / t.sum(1, keepdim=True)
        s_s = s_s / s_s.sum(1, keepdim=True)
        return lam * (-t * torch.log(s_s + 1e-10)).sum() / (n_b * n_h * n_w)
    t = t / t.sum(1, keepdim=True)
    s_s = s_s / s_s.sum(1, keepdim=True)
    per_pixel = (-t * torch.log(s_s + 1e-10)).sum(1)  # [B, H, W]
    return lam * per_pixel.mean()


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exp", ["7", "8"])
def test_experiment_presets_are_the_reference(exp: str) -> None:
    cfg = find_experiment(exp).config
    assert cfg.method.name == "dida"
    assert cfg.method.teacher.bn == "batch"
    assert cfg.method.bank.init == "file" and cfg.method.bank.init_path == "builtin:synthia_300"
    assert cfg.method.bank.update_rule == "reference"
    inst = cfg.method.instance
    assert inst.calibrate and inst.calibrate_source == "student_mixed_logits"
    assert inst.resolution == "input" and not inst.safe_normaliser
    assert inst.normalisation == "sum" and inst.log_eps == 1e-10 and inst.weight == 0.5
    assert inst.a_smooth == 1.0 and not inst.target_pixels_only
    assert (cfg.method.bank.update_interval, cfg.method.bank.momentum) == (50, 0.999)


@pytest.mark.parametrize("rule", ["reference", "per_image"])
def test_bank_update_matches_literal_transcription(rule: str) -> None:
    method = _reference_method(update_rule=rule)
    feats, labels = _random_bank(method, seed=1)
    g = torch.Generator().manual_seed(2)
    embed = torch.rand(B, D, h, w, generator=g, dtype=torch.float64)
    gt = _labels(seed=3)
    src = SourceOutput(logits=torch.zeros(0), embed=embed, loss=torch.zeros(()), metrics={})
    method.after_source_step(src, gt, iteration=0)  # an update iteration (0 % 50 == 0)
    literal = literal_bank_update if rule == "reference" else literal_per_image_update
    expected = literal(feats, labels, _up(embed), gt, momentum=0.999)
    torch.testing.assert_close(method.bank.feats, expected, rtol=1e-5, atol=0)
    assert torch.equal(method.bank.labels, labels)
    if rule == "reference":  # class 0 is absent: its entries decayed toward 0
        absent = labels == 0
        torch.testing.assert_close(method.bank.feats[absent], 0.999 * feats[absent])
    else:
        assert torch.equal(method.bank.feats[labels == 0], feats[labels == 0])
    # not an update iteration: nothing changes
    before = method.bank.feats.clone()
    method.after_source_step(src, gt, iteration=7)
    assert torch.equal(method.bank.feats, before)


def _loss_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "student": torch.rand(B, D, h, w, generator=g, dtype=torch.float64),
        "teacher": torch.rand(B, D, h, w, generator=g, dtype=torch.float64),
        # confident, mixed-sign logits: negative target entries and normalisers occur
        "logits": 6 * torch.randn(B, C, h, w, generator=g, dtype=torch.float64),
    }


def _our_loss(method: DIDA, x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    student = x["student"].clone().requires_grad_()
    teacher_logits = torch.randn(B, C, h, w, dtype=torch.float64)  # unused by the preset
    teacher = TeacherOutput(
        logits=teacher_logits, embed=x["teacher"],
        probs=torch.softmax(_up(teacher_logits), 1), label=torch.zeros(B, H, W).long(),
        weight=torch.ones(B, H, W, dtype=torch.float64),
    )  # fmt: skip
    masks = torch.zeros(B, H, W, dtype=torch.float64)
    loss, log = method.target_extra_loss(x["logits"], student, teacher, masks)
    (grad,) = torch.autograd.grad(loss, student)
    assert log["instance.loss_in"] == pytest.approx(loss.item())
    return loss.detach(), grad


def _literal_loss(method: DIDA, x: dict, drop_zero: bool = False):  # noqa: ANN202
    student = x["student"].clone().requires_grad_()
    f, lab = method.bank.feats.detach().clone(), method.bank.labels.clone()
    loss = literal_loss_in(_up(x["teacher"]), _up(student), _up(x["logits"]), f, lab,
                           drop_zero=drop_zero)  # fmt: skip
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad


def _assert_rel(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel <= tol, f"relative error {rel.item():.3g}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_instance_loss_and_gradient_match_literal_transcription(seed: int) -> None:
    method = _reference_method()
    _random_bank(method, seed=10 + seed)
    x = _loss_inputs(seed)
    ours, grad = _our_loss(method, x)
    ref, ref_grad = _literal_loss(method, x)
    assert torch.isfinite(ref)
    _assert_rel(ours, ref)
    _assert_rel(grad, ref_grad)
    # the inputs do exercise the reference's sign problem (negative target entries)
    s_w = torch.einsum("bdhw,kd->bkhw", _up(x["teacher"]), method.bank.feats)
    t = s_w * _up(x["logits"])[:, method.bank.labels]
    assert (t / t.sum(1, keepdim=True) < 0).float().mean() > 0.2


def test_whole_step_order_bank_update_then_loss() -> None:
    """An update iteration: the bank is updated from the source first, L_in uses the new bank."""
    method = _reference_method()
    feats, labels = _random_bank(method, seed=4)
    g = torch.Generator().manual_seed(5)
    src_embed = torch.rand(B, D, h, w, generator=g, dtype=torch.float64)
    gt = _labels(seed=6)
    src = SourceOutput(logits=torch.zeros(0), embed=src_embed, loss=torch.zeros(()), metrics={})
    method.after_source_step(src, gt, iteration=50)
    x = _loss_inputs(7)
    ours, grad = _our_loss(method, x)
    f_new = literal_bank_update(feats, labels, _up(src_embed), gt, 0.999)
    student = x["student"].clone().requires_grad_()
    ref = literal_loss_in(_up(x["teacher"]), _up(student), _up(x["logits"]), f_new, labels)
    (ref_grad,) = torch.autograd.grad(ref, student)
    _assert_rel(ours, ref.detach())
    _assert_rel(grad, ref_grad)


def test_zero_normaliser_is_finite_and_contributes_nothing() -> None:
    """A student pixel with an all-zero (post-ReLU) embedding: 0/0 = NaN in the reference.

    Defined behaviour: that pixel contributes 0 to L_in and no gradient, and still counts in the
    mean over all pixels. A zero weak-view normaliser gives T = 0 there, so the same holds.
    """
    method = _reference_method()
    _random_bank(method, seed=8)
    x = _loss_inputs(9)
    x["student"][0, :, 1:3, 2:4] = 0.0  # a block of zero embeddings: zero at input res. inside
    x["teacher"][1, :, 2:4, 0:2] = 0.0
    ours, grad = _our_loss(method, x)
    assert torch.isfinite(ours) and torch.isfinite(grad).all()
    ref, ref_grad = _literal_loss(method, x, drop_zero=True)
    with torch.no_grad():  # the reference itself is NaN there
        raw = literal_loss_in(_up(x["teacher"]), _up(x["student"]), _up(x["logits"]),
                              method.bank.feats, method.bank.labels)  # fmt: skip
    assert torch.isnan(raw)
    _assert_rel(ours, ref)
    _assert_rel(grad, ref_grad)


def test_intended_preset_differs_and_is_safe() -> None:
    """`7-intended` uses the teacher's probabilities, feature resolution and safe normalisers."""
    cfg = find_experiment("7-intended").config.method
    assert cfg.instance.calibrate_source == "teacher_probs"
    assert cfg.instance.resolution == "feature" and cfg.instance.safe_normaliser
    assert cfg.bank.update_rule == "per_image" and cfg.teacher.bn == "batch"
    student = build_segmentor("mit_tiny", num_classes=C, embed_dim=D, dilations=(1, 2))
    bank = dataclasses.replace(cfg.bank, size=K)
    method = DIDA(student, dataclasses.replace(cfg, bank=bank), num_classes=C, embed_dim=D)
    method = method.double()
    _random_bank(method, seed=11)
    x = _loss_inputs(12)
    x["student"][0, :, 0, 0] = 0.0
    ours, _ = _our_loss(method, x)
    assert torch.isfinite(ours) and ours > 0  # T is a non-negative distribution
