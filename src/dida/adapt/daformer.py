"""Source-only and DAFormer (DACS self-training) methods as modules that own their training step.

The step follows METHOD.md §2.5: source loss (+ ImageNet feature distance) → teacher pseudo-labels
on the target → ClassMix + strong augmentation → mixed loss. Every backward goes through the
engine's `backward` callable (AMP scaling lives there); one backward per student forward, so DDP
works.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dida.adapt.augment import strong_augment, weak_augment
from dida.adapt.classmix import mix, sample_class_masks
from dida.adapt.losses import accuracy, feature_distance_loss, pixel_weighted_ce
from dida.adapt.teacher import EMATeacher, pseudo_label_from_probs
from dida.config import MethodConfig
from dida.data.transforms import IMG_MEAN, IMG_STD
from dida.eval.inference import resize

Backward = Callable[[torch.Tensor], None]


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 unless it is already float32 or float64 (autocast outputs are 16-bit)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@dataclass
class StepLog:
    """What one training step reports: float metrics and, on debug iterations, detached images."""

    losses: dict[str, float]
    images: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SourceOutput:
    logits: torch.Tensor  # [B, C, H, W] upsampled to the crop, with graph
    embed: torch.Tensor  # [B, D, h, w] fused feature at 1/4 resolution, with graph
    loss: torch.Tensor
    metrics: dict[str, float]


@dataclass
class TeacherOutput:
    logits: torch.Tensor  # [B, C, h, w] at 1/4 resolution
    embed: torch.Tensor  # [B, D, h, w]
    probs: torch.Tensor  # [B, C, H, W] at crop resolution
    label: torch.Tensor  # [B, H, W]
    weight: torch.Tensor  # [B, H, W]


class SourceOnly(nn.Module):
    """Supervised training on the source domain only (the lower bound of every table).

    Args:
        student: the segmentor being trained.
        cfg: method settings (only `feat_dist` matters here).
        num_classes: number of classes of the label space.
        imnet_encoder: frozen ImageNet-initialised encoder for the feature distance, or None.
        img_mean, img_std: normalisation on the 0..255 scale, for the photometric augmentation.
        generator: torch RNG for all of the method's random draws.
    """

    def __init__(
        self,
        student: nn.Module,
        cfg: MethodConfig,
        *,
        num_classes: int,
        imnet_encoder: nn.Module | None = None,
        img_mean: tuple[float, float, float] = IMG_MEAN,
        img_std: tuple[float, float, float] = IMG_STD,
        ignore_index: int = 255,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.cfg = cfg
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.img_mean, self.img_std = img_mean, img_std
        self.generator = generator
        self.imnet = imnet_encoder
        if self.imnet is not None:
            self.imnet.requires_grad_(False).eval()
        # student forwards go through this callable (a DDP or compiled wrapper once the engine
        # sets one), kept out of the module tree so that state_dict holds the student once
        object.__setattr__(self, "_forward", student)

    def set_student_forward(self, wrapper: nn.Module) -> None:
        """Route student forwards through `wrapper` (DDP, compile); state stays in `student`."""
        object.__setattr__(self, "_forward", wrapper)

    def train(self, mode: bool = True) -> SourceOnly:
        super().train(mode)
        if self.imnet is not None:
            self.imnet.eval()
        return self

    def update_teacher(self, iteration: int) -> None:
        """Nothing to do without a teacher."""

    def forward_backward(
        self, batch: dict[str, torch.Tensor], iteration: int, backward: Backward, want_images: bool
    ) -> StepLog:
        src = self.source_step(batch["src_img"], batch["src_label"], backward)
        log = {"src.loss_seg": src.loss.item()}
        images = {}
        if want_images:
            images = {"src_img": batch["src_img"], "src_label": batch["src_label"],
                      "src_pred": src.logits.argmax(1)}  # fmt: skip
        return StepLog(losses=log | src.metrics, images=_detach(images))

    def source_step(
        self, src_img: torch.Tensor, src_label: torch.Tensor, backward: Backward
    ) -> SourceOutput:
        """Source cross-entropy (+ λ_FD · feature distance), backpropagated at once."""
        use_fd = self.imnet is not None and self.cfg.feat_dist.enabled
        logits, embed, feats = self._forward(src_img, return_features=True)
        logits = resize(logits, src_label.shape[-2:])
        loss = pixel_weighted_ce(logits, src_label, None, self.ignore_index)
        metrics = {"src.acc_seg": accuracy(logits.detach(), src_label, self.ignore_index).item()}
        total = loss
        if use_fd:
            fd = self.feature_distance(src_img, src_label, feats[-1])
            metrics["src.loss_feat_dist"] = fd.item()
            total = total + fd
        backward(total)
        return SourceOutput(
            logits=logits.detach(), embed=embed.detach(), loss=loss.detach(), metrics=metrics
        )

    def feature_distance(
        self, src_img: torch.Tensor, src_label: torch.Tensor, student_feat: torch.Tensor
    ) -> torch.Tensor:
        """λ · mean L2 distance to the frozen ImageNet features on thing-class cells (§2.5, 6)."""
        fd_cfg = self.cfg.feat_dist
        with torch.no_grad():
            imnet_feat = self.imnet(src_img)[-1]
        loss = feature_distance_loss(
            student_feat, imnet_feat, src_label, classes=fd_cfg.classes,
            min_ratio=fd_cfg.scale_min_ratio, num_classes=self.num_classes,
            ignore_index=self.ignore_index,
        )  # fmt: skip
        return fd_cfg.weight * loss

    def training_state(self) -> dict:
        """Everything of the method a checkpoint needs; subclasses add their own entries."""
        return {"student": self.student.state_dict()}

    def load_training_state(self, ckpt: dict) -> None:
        self.student.load_state_dict(ckpt["student"])


class DAFormer(SourceOnly):
    """DACS self-training with an EMA teacher, ClassMix and photometric augmentation (§2.5).

    The teacher normalises with its batch's statistics (`cfg.teacher.bn=batch`, the reference) or
    runs in eval mode (`running`); it sees the un-augmented target crop unless `cfg.aug.weak_aug`.
    """

    def __init__(self, student: nn.Module, cfg: MethodConfig, **kwargs) -> None:  # noqa: ANN003
        super().__init__(student, cfg, **kwargs)
        self.teacher = EMATeacher(student, alpha=cfg.teacher.alpha, bn=cfg.teacher.bn)

    def update_teacher(self, iteration: int) -> None:
        self.teacher.update(self.student, iteration)

    def forward_backward(
        self, batch: dict[str, torch.Tensor], iteration: int, backward: Backward, want_images: bool
    ) -> StepLog:
        src_img, src_label, tgt_img = batch["src_img"], batch["src_label"], batch["tgt_img"]
        src = self.source_step(src_img, src_label, backward)
        self.after_source_step(src, src_label, iteration)
        teacher = self.pseudo_labels(tgt_img)
        masks, mixed_img, mixed_label, mixed_weight = self.class_mix(
            src_img, src_label, tgt_img, teacher
        )
        mixed_logits, mixed_embed = self._forward(mixed_img)
        mixed_logits_up = resize(mixed_logits, mixed_label.shape[-2:])
        loss_mix = pixel_weighted_ce(mixed_logits_up, mixed_label, mixed_weight, self.ignore_index)
        extra, extra_log = self.target_extra_loss(mixed_logits, mixed_embed, teacher, masks)
        backward(loss_mix + extra if extra is not None else loss_mix)
        log = {"src.loss_seg": src.loss.item(), **src.metrics,
               "mix.loss_seg": loss_mix.item(),
               "mix.acc_seg": accuracy(mixed_logits_up.detach(), mixed_label).item(),
               "pseudo.weight": teacher.weight.amax().item(), **extra_log}  # fmt: skip
        images = {}
        if want_images:
            images = {"src_img": src_img, "src_label": src_label, "tgt_img": tgt_img,
                      "pseudo_label": teacher.label, "mix_mask": masks, "mixed_img": mixed_img,
                      "mixed_label": mixed_label, "pseudo_weight": mixed_weight}  # fmt: skip
        return StepLog(losses=log, images=_detach(images))

    @torch.no_grad()
    def pseudo_labels(self, tgt_img: torch.Tensor) -> TeacherOutput:
        """Teacher forward on the (weak view of the) target and DACS pseudo-labels (§2.5 8–11)."""
        if self.cfg.aug.weak_aug:
            tgt_img = weak_augment(tgt_img, **self._aug_kwargs())
        logits, embed = self.teacher(tgt_img)
        logits = at_least_fp32(logits)
        probs = torch.softmax(resize(logits, tgt_img.shape[-2:]), dim=1)
        probs = self.refine_probs(probs, embed)
        tcfg = self.cfg.teacher
        label, weight = pseudo_label_from_probs(
            probs, tcfg.pseudo_threshold, tcfg.ignore_top, tcfg.ignore_bottom
        )
        if not tcfg.self_training:
            weight = torch.zeros_like(weight)
        return TeacherOutput(logits=logits, embed=at_least_fp32(embed), probs=probs, label=label,
                             weight=weight)  # fmt: skip

    @torch.no_grad()
    def class_mix(
        self,
        src_img: torch.Tensor,
        src_label: torch.Tensor,
        tgt_img: torch.Tensor,
        teacher: TeacherOutput,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """ClassMix of source onto target, then colour jitter and blur of the mixed image (§2.5)."""
        masks = sample_class_masks(src_label, self.generator)  # [B, H, W]
        mixed_img = mix(masks, src_img, tgt_img)
        mixed_label = mix(masks, src_label, teacher.label)
        mixed_weight = mix(masks, torch.ones_like(teacher.weight), teacher.weight)
        mixed_img = strong_augment(mixed_img, **self._aug_kwargs())
        return masks, mixed_img, mixed_label, mixed_weight

    def _aug_kwargs(self) -> dict:
        aug = self.cfg.aug
        return dict(mean=self.img_mean, std=self.img_std,
                    color_jitter_strength=aug.color_jitter_strength,
                    color_jitter_p=aug.color_jitter_p, blur=aug.blur,
                    max_kernel_size=aug.blur_max_kernel, generator=self.generator)  # fmt: skip

    def after_source_step(self, src: SourceOutput, src_label: torch.Tensor, iteration: int) -> None:
        """Hook for methods that learn from the source features (DIDA's bank)."""

    def refine_probs(self, probs: torch.Tensor, teacher_embed: torch.Tensor) -> torch.Tensor:
        """Hook to change the teacher's class probabilities before thresholding (DIDA's scatter)."""
        return probs

    def target_extra_loss(
        self,
        mixed_logits: torch.Tensor,
        mixed_embed: torch.Tensor,
        teacher: TeacherOutput,
        masks: torch.Tensor,
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Hook for extra losses on the mixed forward (DIDA's instance loss)."""
        return None, {}

    def training_state(self) -> dict:
        return super().training_state() | {"teacher": self.teacher.state_dict()}

    def load_training_state(self, ckpt: dict) -> None:
        super().load_training_state(ckpt)
        self.teacher.load_state_dict(ckpt["teacher"])


def _detach(images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in images.items()}
