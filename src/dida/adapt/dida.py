"""DIDA: DAFormer plus the labelled instance bank and the instance-level consistency loss (§3).

On top of the DAFormer step: the bank is filled/updated from the student's source features (§3.3),
the teacher's class probabilities may be smoothed by instance similarities ("scatter", §3.6), and
the mixed forward gets L_in between the teacher's calibrated weak-view similarities ("gather",
§3.5) and the student's mixed-view similarities (§3.7).

The configuration's defaults are the released code's arithmetic (experiments 7 and 8): gather from
the student's raw logits on the mixed image, similarities at input resolution, normalisers without
epsilon, the reference bank update rule. `docs/deviations.md` lists the intended alternatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dida.adapt.daformer import DAFormer, SourceOutput, TeacherOutput, at_least_fp32
from dida.adapt.instance import (
    instance_loss,
    instance_similarity,
    normalise_similarity,
    smooth_probs,
)
from dida.adapt.instance_bank import InstanceBank
from dida.config import MethodConfig
from dida.eval.inference import resize


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a label map. Shapes: [B, H, W] -> [B, *size]."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


class DIDA(DAFormer):
    """The DAFormer method with DIDA's instance branch; the bank is a buffer module (`bank`).

    Args:
        student, cfg, **kwargs: as `DAFormer`.
        embed_dim: channels of the segmentor's fused feature (the bank's D).
    """

    def __init__(
        self, student: nn.Module, cfg: MethodConfig, *, embed_dim: int, **kwargs
    ) -> None:  # noqa: ANN003
        super().__init__(student, cfg, **kwargs)
        bank = cfg.bank
        self.bank = InstanceBank(
            bank.size, embed_dim, self.num_classes, momentum=bank.momentum,
            update_mode=bank.update_mode, boundary_threshold=bank.boundary_threshold,
            ignore_index=self.ignore_index, update_rule=bank.update_rule,
        )  # fmt: skip

    def _at_loss_resolution(self, crop: tuple[int, int], feat: tuple[int, int]) -> tuple[int, int]:
        return crop if self.cfg.instance.resolution == "input" else feat

    @torch.no_grad()
    def after_source_step(self, src: SourceOutput, src_label: torch.Tensor, iteration: int) -> None:
        """Online fill while the bank is not full, then one update event every N iterations.

        The features are the student's source embedding of this iteration, upsampled to the loss
        resolution (the reference uses the input resolution).
        """
        filling = not self.bank.is_full
        if not filling and iteration % self.cfg.bank.update_interval != 0:
            return
        embed = at_least_fp32(src.embed)
        if not filling and self.bank.update_rule == "reference":
            embed = embed[:1]  # the reference reads image 0 only
        size = self._at_loss_resolution(tuple(src_label.shape[-2:]), tuple(embed.shape[-2:]))
        embed = resize(embed, size)
        labels = resize_labels(src_label, size)
        if filling:
            self.bank.fill_online_(embed, labels)
        else:
            self.bank.update_(embed, labels)

    @torch.no_grad()
    def refine_probs(self, probs: torch.Tensor, teacher_embed: torch.Tensor) -> torch.Tensor:
        """Instance → semantic smoothing of the teacher probabilities (off when a_smooth = 1)."""
        icfg = self.cfg.instance
        if icfg.a_smooth >= 1.0 or not self.bank.is_full:
            return probs
        sim = instance_similarity(at_least_fp32(teacher_embed), self.bank.feats)  # [B, K, h, w]
        sim = normalise_similarity(
            resize(sim, probs.shape[-2:]), icfg.normalisation, tau=icfg.tau_weak, eps=icfg.eps,
            safe=icfg.safe_normaliser,
        )  # fmt: skip
        return smooth_probs(probs, sim, self.bank.labels, icfg.a_smooth)

    def target_extra_loss(
        self,
        mixed_logits: torch.Tensor,
        mixed_embed: torch.Tensor,
        teacher: TeacherOutput,
        masks: torch.Tensor,
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """L_in on the mixed forward (§3.7); nothing until the bank is full."""
        if not self.bank.is_full:
            return None, {"instance.bank_filled": float(self.bank.count)}
        icfg = self.cfg.instance
        crop, feat = tuple(masks.shape[-2:]), tuple(mixed_embed.shape[-2:])
        size = self._at_loss_resolution(crop, feat)
        calib = None
        if icfg.calibrate:
            if icfg.calibrate_source == "teacher_probs":
                calib = teacher.probs if size == crop else torch.softmax(teacher.logits, dim=1)
            else:
                calib = at_least_fp32(mixed_logits.detach())
        pixel_mask = None
        if icfg.target_pixels_only:
            pixel_mask = 1.0 - resize_labels(masks.long(), size).float()  # [B, *size]
        loss = instance_loss(
            at_least_fp32(mixed_embed), teacher.embed, self.bank.feats, self.bank.labels, calib,
            normalisation=icfg.normalisation, tau_weak=icfg.tau_weak, tau_strong=icfg.tau_strong,
            eps=icfg.eps, log_eps=icfg.log_eps, weight=icfg.weight,
            out_size=None if size == feat else size, pixel_mask=pixel_mask,
            calibrate_source=icfg.calibrate_source, safe=icfg.safe_normaliser,
            chunk_size=icfg.chunk_size,
        )  # fmt: skip
        return loss, {"instance.loss_in": loss.item()}

    def training_state(self) -> dict:
        return super().training_state() | {"method": {"bank": self.bank.state_dict()}}

    def load_training_state(self, ckpt: dict) -> None:
        super().load_training_state(ckpt)
        self.bank.load_state_dict(ckpt["method"]["bank"])
