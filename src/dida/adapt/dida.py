"""DIDA: DAFormer plus the labelled instance bank and the instance-level consistency loss.

docs/method.md §3 describes the instance branch; the § numbers below are its sections.

On top of the DAFormer step: the bank is filled and updated from the student's source features
(§3.2, §3.3), the teacher's class probabilities may be smoothed by instance similarities
("scatter", §3.6), and the mixed forward gets L_in between the teacher's calibrated weak-view
similarities ("gather", §3.5) and the student's mixed-view similarities (§3.7).

The configuration's defaults are the released code's arithmetic (experiments 7 and 8): gather from
the student's raw logits on the mixed image, similarities at input resolution, normalisers without
epsilon, the reference bank update rule. `docs/deviations.md` lists the intended alternatives.

With HRDA (`method.compose`, a new composition): the bank and L_in live on the context branch by
default (`hrda_scale=lr`: F_lr at the context view's size, the label nearest-downsampled, teacher
probabilities area-downsampled, the student's fused logits for the gather), on the detail box
(`hr`) or on both (`both`, L_in split (1 - w)·L_lr + w·L_hr). With MIC, `mic_view` adds L_in on the
masked target view (`add`) or moves it there (`only`). Each L_in term is computed from an
`InstanceView`: one student view and the teacher's matching tensors on the same grid.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from dida.models.hrda import Box, HRDAOutput, crop_to_box


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a label map. Shapes: [B, H, W] -> [B, *size]."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


@dataclass
class InstanceView:
    """What one L_in term needs: a student view and the teacher's tensors over the same image.

    Shapes:
        student_embed (with graph), teacher_embed: [B, D, h, w] on one grid
        size: (H, W) of the image the view covers (the loss size at `resolution=input`)
        teacher_probs: [B, C, H, W]; teacher_logits, student_logits: [B, C, h', w'] over the view
        mix_mask: [B, H, W] ClassMix mask (1 = pasted source pixel), or None (all target pixels)
    """

    student_embed: torch.Tensor
    teacher_embed: torch.Tensor
    size: tuple[int, int]
    teacher_probs: torch.Tensor
    teacher_logits: torch.Tensor
    student_logits: torch.Tensor
    mix_mask: torch.Tensor | None = None


class DIDA(DAFormer):
    """The DAFormer method with DIDA's instance branch; the bank is a buffer module (`bank`).

    Args:
        student, cfg, **kwargs: as `DAFormer`.
        embed_dim: channels of the segmentor's fused feature (the bank's D).

    With HRDA and `compose.hrda_scale=both`, `compose.hrda_separate_banks` adds `bank_hr`, the
    detail branch's own bank.
    """

    def __init__(
        self, student: nn.Module, cfg: MethodConfig, *, embed_dim: int, **kwargs
    ) -> None:  # noqa: ANN003
        super().__init__(student, cfg, **kwargs)
        self.bank = self._new_bank(embed_dim)
        comp = cfg.compose
        both = self.hrda is not None and comp.hrda_scale == "both"
        self.bank_hr = self._new_bank(embed_dim) if both and comp.hrda_separate_banks else None
        # L_in's chunk arithmetic through torch.compile (the engine sets it under train.compile)
        self.compile_instance_loss = False

    def _new_bank(self, embed_dim: int) -> InstanceBank:
        bank = self.cfg.bank
        return InstanceBank(
            bank.size, embed_dim, self.num_classes, momentum=bank.momentum,
            update_mode=bank.update_mode, boundary_threshold=bank.boundary_threshold,
            ignore_index=self.ignore_index, update_rule=bank.update_rule,
        )  # fmt: skip

    @property
    def banks(self) -> list[InstanceBank]:
        return [self.bank] if self.bank_hr is None else [self.bank, self.bank_hr]

    def needs_teacher_detail_embed(self) -> bool:
        comp = self.cfg.compose
        return comp.hrda_scale != "lr" and comp.hr_teacher == "slide_avg"

    def _at_loss_resolution(self, crop: tuple[int, int], feat: tuple[int, int]) -> tuple[int, int]:
        return crop if self.cfg.instance.resolution == "input" else feat

    @torch.no_grad()
    def after_source_step(self, src: SourceOutput, src_label: torch.Tensor, iteration: int) -> None:
        """Online fill while the bank is not full, then one update event every N iterations.

        The features are the student's source embedding of this iteration, upsampled to the loss
        resolution (the reference uses the input resolution); with HRDA those of the
        `compose.hrda_scale` branch with the source label of that view.
        """
        for bank, embed, labels in self._bank_inputs(src, src_label):
            self._update_bank(bank, embed, labels, iteration)

    def _update_bank(
        self, bank: InstanceBank, embed: torch.Tensor, labels: torch.Tensor, iteration: int
    ) -> None:
        filling = not bank.is_full
        if not filling and iteration % self.cfg.bank.update_interval != 0:
            return
        embed = at_least_fp32(embed)
        if not filling and bank.update_rule == "reference":
            embed = embed[:1]  # the reference reads image 0 only
        size = self._at_loss_resolution(tuple(labels.shape[-2:]), tuple(embed.shape[-2:]))
        embed = resize(embed, size)
        labels = resize_labels(labels, size)
        if filling:
            bank.fill_online_(embed, labels)
        else:
            bank.update_(embed, labels)

    def _bank_inputs(
        self, src: SourceOutput, src_label: torch.Tensor
    ) -> list[tuple[InstanceBank, torch.Tensor, torch.Tensor]]:
        """(bank, source features, their labels) for each bank update of this step."""
        out = src.output
        if out is None:
            return [(self.bank, src.embed, src_label)]
        context = resize_labels(src_label, self.student.context_size(src_label.shape[-2:]))
        lr = (out.embed_lr, context)  # the context view: 1024 -> 512 labels (nearest)
        hr = (out.embed_hr, crop_to_box(src_label, out.box))  # the detail box
        scale = self.cfg.compose.hrda_scale
        if scale == "lr":
            return [(self.bank, *lr)]
        if scale == "hr":
            return [(self.bank, *hr)]
        if self.bank_hr is not None:
            return [(self.bank, *lr), (self.bank_hr, *hr)]
        return [(self.bank, *self._side_by_side(lr, hr))]

    def _side_by_side(
        self, *views: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of several views at the loss resolution, concatenated along the
        width: one bank's class means then count the pixels of all of them."""
        parts = []
        for embed, labels in views:
            size = self._at_loss_resolution(tuple(labels.shape[-2:]), tuple(embed.shape[-2:]))
            parts.append((resize(at_least_fp32(embed), size), resize_labels(labels, size)))
        if len({p[1].shape[-2] for p in parts}) > 1:
            raise ValueError(
                "method.compose.hrda_scale=both with one bank needs the context view and the "
                "detail crop at one height; set method.compose.hrda_separate_banks=true"
            )
        return torch.cat([p[0] for p in parts], dim=-1), torch.cat([p[1] for p in parts], dim=-1)

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
        output: HRDAOutput | None = None,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor | float]]:
        """L_in on the mixed forward (docs/method.md §3.7); nothing until the bank is full (nor with
        `compose.mic_view=only`, which moves it to the masked view)."""
        if not all(bank.is_full for bank in self.banks):
            return None, {"instance.bank_filled": float(self.bank.filled)}
        if self.cfg.compose.mic_view == "only":
            return None, {}
        views = self.instance_views(mixed_logits, mixed_embed, teacher, masks, output)
        loss = self._instance_loss_sum(views, self.cfg.instance.weight)
        return loss, {"instance.loss_in": loss.detach()}

    def masked_extra_loss(
        self, output: HRDAOutput | tuple[torch.Tensor, ...], teacher: TeacherOutput
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor | float]]:
        """L_in on MIC's masked target (`compose.mic_view` add/only), λ = `mic_inst_lambda`,
        against the teacher's view of the same unmasked target (spatially aligned, all pixels)."""
        if self.cfg.compose.mic_view == "none" or not all(b.is_full for b in self.banks):
            return None, {}
        if isinstance(output, HRDAOutput):
            views = self.instance_views(output.fused, output.embed_lr, teacher, None, output)
        else:
            views = self.instance_views(output[0], output[1], teacher, None, None)
        loss = self._instance_loss_sum(views, self.cfg.compose.mic_inst_lambda)
        return loss, {"instance.masked.loss_in": loss.detach()}

    def instance_views(
        self,
        logits: torch.Tensor,
        embed: torch.Tensor,
        teacher: TeacherOutput,
        mix_mask: torch.Tensor | None,
        output: HRDAOutput | None,
    ) -> list[tuple[float, InstanceView, InstanceBank]]:
        """(weight factor, view, bank) of every L_in term of one student forward.

        Plain: the whole crop. HRDA (`compose.hrda_scale`): the context view (`lr`), the detail
        box (`hr`), or both with factors 1 - w and w (`hr_inst_weight`).
        """
        if output is None:
            size = tuple(teacher.probs.shape[-2:])
            view = InstanceView(embed, teacher.embed, size, teacher.probs, teacher.logits, logits,
                                mix_mask)  # fmt: skip
            return [(1.0, view, self.bank)]
        comp = self.cfg.compose
        w = comp.hr_inst_weight if comp.hrda_scale == "both" else 1.0
        views = []
        if comp.hrda_scale in ("lr", "both"):
            views.append((1.0 - w if comp.hrda_scale == "both" else 1.0,
                          self._context_view(output, teacher, mix_mask), self.bank))  # fmt: skip
        if comp.hrda_scale in ("hr", "both"):
            bank = self.bank_hr if self.bank_hr is not None else self.bank
            views.append((w, self._detail_view(output, teacher, mix_mask), bank))
        return views

    def _context_view(
        self, out: HRDAOutput, teacher: TeacherOutput, mix_mask: torch.Tensor | None
    ) -> InstanceView:
        """F_lr at the context view's size; teacher probabilities area-downsampled to it; the
        student's fused logits for the gather (never `out.lr`, which is (1 - a)·lr)."""
        size = self.student.context_size(out.input_size)
        probs = F.interpolate(teacher.probs, size=size, mode="area")
        return InstanceView(out.embed_lr, teacher.embed, size, probs, teacher.logits, out.fused,
                            mix_mask)  # fmt: skip

    def _detail_view(
        self, out: HRDAOutput, teacher: TeacherOutput, mix_mask: torch.Tensor | None
    ) -> InstanceView:
        """F_hr of the detail box; the teacher's embedding, probabilities and logits cropped by
        the same box (the slide-averaged canvas, or a teacher pass on the box)."""
        box, size_in = out.box, out.input_size
        size = (box[1] - box[0], box[3] - box[2])
        return InstanceView(
            out.embed_hr, self._teacher_detail_embed(teacher, box), size,
            crop_to_box(teacher.probs, box), crop_to_box(teacher.logits, box, size_in),
            crop_to_box(out.fused, box, size_in),
            None if mix_mask is None else crop_to_box(mix_mask, box),
        )  # fmt: skip

    @torch.no_grad()
    def _teacher_detail_embed(self, teacher: TeacherOutput, box: Box) -> torch.Tensor:
        if self.cfg.compose.hr_teacher == "recompute_box":
            _, embed = self.teacher.model.decode_detail(crop_to_box(teacher.img, box))
            return at_least_fp32(embed)
        canvas = teacher.output
        return at_least_fp32(crop_to_box(canvas.embed_hr, box, canvas.input_size))

    def _instance_loss_sum(
        self, views: list[tuple[float, InstanceView, InstanceBank]], weight: float
    ) -> torch.Tensor:
        losses = [self._instance_loss(view, bank, weight * f) for f, view, bank in views]
        return losses[0] if len(losses) == 1 else torch.stack(losses).sum()

    def _instance_loss(self, view: InstanceView, bank: InstanceBank, weight: float) -> torch.Tensor:
        """λ · L_in of one view (docs/method.md §3.7) at the loss resolution
        (`instance.resolution`)."""
        icfg = self.cfg.instance
        crop, feat = view.size, tuple(view.student_embed.shape[-2:])
        size = self._at_loss_resolution(crop, feat)
        calib = None
        if icfg.calibrate:
            if icfg.calibrate_source == "teacher_probs":
                probs = view.teacher_probs
                calib = probs if size == crop else torch.softmax(view.teacher_logits, dim=1)
            else:
                calib = at_least_fp32(view.student_logits.detach())
        pixel_mask = None
        if icfg.target_pixels_only and view.mix_mask is not None:
            pixel_mask = 1.0 - resize_labels(view.mix_mask.long(), size).float()  # [B, *size]
        return instance_loss(
            at_least_fp32(view.student_embed), view.teacher_embed, bank.feats, bank.labels, calib,
            normalisation=icfg.normalisation, tau_weak=icfg.tau_weak, tau_strong=icfg.tau_strong,
            eps=icfg.eps, log_eps=icfg.log_eps, weight=weight,
            out_size=None if size == feat else size, pixel_mask=pixel_mask,
            calibrate_source=icfg.calibrate_source, safe=icfg.safe_normaliser,
            chunk_size=icfg.chunk_size, chunk_bytes=icfg.chunk_memory_mb * 2**20,
            compiled=self.compile_instance_loss,
        )  # fmt: skip

    def training_state(self) -> dict:
        state = super().training_state()
        state["method"] = state.get("method", {}) | {"bank": self.bank.state_dict()}
        if self.bank_hr is not None:
            state["method"]["bank_hr"] = self.bank_hr.state_dict()
        return state

    def load_training_state(self, ckpt: dict) -> None:
        super().load_training_state(ckpt)
        self.bank.load_state_dict(ckpt["method"]["bank"])
        if self.bank_hr is not None:
            self.bank_hr.load_state_dict(ckpt["method"]["bank_hr"])
