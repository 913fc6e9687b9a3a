"""Source-only and DAFormer (DACS self-training) methods as modules that own their training step.

The step follows docs/method.md §2.1: source loss (+ ImageNet feature distance) → teacher
pseudo-labels on the target → ClassMix + strong augmentation → mixed loss (→ MIC's masked-target
loss when `cfg.mic.enabled`). Every backward goes through the engine's `backward` callable (AMP
scaling and the one-add accumulation of later passes live there, `engine.speed.StepBackward`); one
backward per student forward, so DDP works.

With an HRDA student (`model.hrda.enabled`) the same step runs multi-resolution: every student
forward gets its own detail box and HRDA's fused + detail loss (`_seg_forward_loss`), the feature
distance uses the context view, and the teacher's pseudo-labels come from its fused prediction
with sliding detail windows. HRDA and MIC specifics stay in the small helpers below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dida.adapt.augment import strong_augment, weak_augment
from dida.adapt.classmix import mix, sample_class_masks
from dida.adapt.hrda import hrda_seg_loss
from dida.adapt.losses import accuracy, feature_distance_loss, pixel_weighted_ce
from dida.adapt.mic import masked_view, mic_loss
from dida.adapt.teacher import EMATeacher, pseudo_label_from_probs
from dida.config import HRDAConfig, MethodConfig
from dida.data.transforms import IMG_MEAN, IMG_STD
from dida.eval.inference import resize
from dida.models.hrda import HRDAOutput, HRDASegmentor, crop_to_box
from dida.models.layers import is_dilated_depthwise
from dida.models.precision import LowPrecisionCopy, TrainedWeightCast, cast_weights_

Backward = Callable[[torch.Tensor], None]


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 unless it is already float32 or float64 (autocast outputs are 16-bit)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


Metric = torch.Tensor | float


@dataclass
class StepLog:
    """What one training step reports: metrics and, on debug iterations, detached images.

    Metrics are detached 0-d tensors on the step's device (or floats), read by the engine only
    at log intervals, so that a step never waits for the device.
    """

    losses: dict[str, Metric]
    images: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SourceOutput:
    logits: torch.Tensor  # [B, C, H, W] upsampled to the crop, with graph
    embed: torch.Tensor  # [B, D, h, w] fused feature at 1/4 resolution, with graph
    loss: torch.Tensor
    metrics: dict[str, Metric]
    output: HRDAOutput | None = None  # HRDA: the detached forward (F_lr, F_hr, detail box)


@dataclass
class TeacherOutput:
    logits: torch.Tensor  # [B, C, h, w] at 1/4 resolution (HRDA: fused)
    embed: torch.Tensor  # [B, D, h, w] (HRDA: F_lr over the context view)
    probs: torch.Tensor  # [B, C, H, W] at crop resolution
    label: torch.Tensor  # [B, H, W]
    weight: torch.Tensor  # [B, H, W], unmixed (ClassMix builds new tensors)
    img: torch.Tensor | None = None  # the view the teacher saw
    valid_mask: torch.Tensor | None = None  # [B, H, W] HRDA's pseudo-label margins
    output: HRDAOutput | None = None  # HRDA with `needs_teacher_detail_embed`: with F_hr canvas


@dataclass
class SegForward:
    """One student training forward and its segmentation loss, plain or HRDA."""

    logits: torch.Tensor  # raw logits, with graph: [B, C, H/4, W/4] (HRDA: fused)
    embed: torch.Tensor  # [B, D, h, w] F (HRDA: F_lr of the context view), with graph
    loss: torch.Tensor  # the sum of `terms`
    terms: dict[str, torch.Tensor]  # weighted terms: loss_seg (+ hr.loss_seg, lr.loss_seg)
    features: list[torch.Tensor] | None  # encoder maps (HRDA: context view) or None
    output: HRDAOutput | None  # HRDA: the whole forward (detail box, F_hr, ...)
    # plain: `logits` resized to the label as the loss read them, with graph; HRDA: None
    label_logits: torch.Tensor | None = None

    def at_label_size(self, size: Sequence[int]) -> torch.Tensor:
        """The logits resized to `size` without graph (the loss's own resize when it is there)."""
        if self.label_logits is not None and tuple(self.label_logits.shape[-2:]) == tuple(size):
            return self.label_logits.detach()
        with torch.no_grad():
            return resize(self.logits.detach(), size)


class SourceOnly(nn.Module):
    """Supervised training on the source domain only (the lower bound of every table).

    Args:
        student: the segmentor being trained.
        cfg: method settings (only `feat_dist` matters here).
        num_classes: number of classes of the label space.
        imnet_encoder: frozen ImageNet-initialised encoder for the feature distance, or None.
        img_mean, img_std: normalisation on the 0..255 scale, for the photometric augmentation.
        hrda: HRDA loss and feature-distance settings (`model.hrda`), used when `student` is an
            `HRDASegmentor` (defaults if None).
        generator: torch RNG for all of the method's random draws on the device; the draws the
            host branches on (augmentation decisions) come from `host_generator`: the same
            generator on the CPU, a CPU generator seeded alike for a GPU generator.
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
        hrda: HRDAConfig | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.hrda = (hrda or HRDAConfig()) if isinstance(student, HRDASegmentor) else None
        self.cfg = cfg
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.img_mean, self.img_std = img_mean, img_std
        self.generator = generator
        self.host_generator = generator
        if generator is not None and generator.device.type != "cpu":
            self.host_generator = torch.Generator().manual_seed(generator.initial_seed())
        self.imnet = imnet_encoder
        if self.imnet is not None:
            self.imnet.requires_grad_(False).eval()
        # student forwards go through this callable (a DDP or compiled wrapper once the engine
        # sets one), kept out of the module tree so that state_dict holds the student once
        object.__setattr__(self, "_forward", student)
        self._student_cast: TrainedWeightCast | None = None

    def set_student_forward(self, wrapper: nn.Module) -> None:
        """Route student forwards through `wrapper` (DDP, compile); state stays in `student`."""
        object.__setattr__(self, "_forward", wrapper)

    def train(self, mode: bool = True) -> SourceOnly:
        super().train(mode)
        if self.imnet is not None:
            self.imnet.eval()
        return self

    def use_low_precision_weights(self, dtype: torch.dtype, cast_student: bool = True) -> None:
        """16-bit matmul/conv weights for the forwards under autocast to `dtype` (autocast then
        casts none of them per weight; outputs and gradients unchanged): the ImageNet encoder
        is cast in place, each EMA teacher keeps a copy its update refreshes, and with
        `cast_student` each student forward casts the student's in one multi-tensor copy
        (`TrainedWeightCast`; the engine leaves it to the compiler under `train.compile`).
        Call it once the method is on its device."""
        if cast_student:  # the CPU's dilated depthwise convs take fp32 weights (fp32 gradients)
            on_cpu = next(self.student.parameters()).device.type == "cpu"
            keep = is_dilated_depthwise if on_cpu else None
            self._student_cast = TrainedWeightCast(self.student, dtype, keep)
        if self.imnet is not None:
            cast_weights_(self.imnet, dtype)
        for module in self.modules():
            if isinstance(module, EMATeacher):
                module.use_low_precision_copy(dtype)

    def low_precision_copies(self) -> list[LowPrecisionCopy]:
        """The EMA teachers' low-precision copies (not submodules: not in the state dict)."""
        return [m.low_precision for m in self.modules()
                if isinstance(m, EMATeacher) and m.low_precision is not None]  # fmt: skip

    def update_teacher(self, iteration: int) -> None:
        """Nothing to do without a teacher."""

    def forward_backward(
        self, batch: dict[str, torch.Tensor], iteration: int, backward: Backward, want_images: bool
    ) -> StepLog:
        src = self.source_step(batch["src_img"], batch["src_label"], backward)
        log = {"src.loss_seg": src.loss}
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
        src = self._seg_forward_loss(src_img, src_label, None, return_features=use_fd)
        logits = src.at_label_size(src_label.shape[-2:])
        metrics = {"src.acc_seg": accuracy(logits, src_label, self.ignore_index)}
        metrics |= {f"src.{k}": v.detach() for k, v in src.terms.items() if k != "loss_seg"}
        total = src.loss
        if use_fd:
            fd = self.feature_distance(src_img, src_label, src)
            metrics["src.loss_feat_dist"] = fd.detach()
            total = total + fd
        backward(total)
        return SourceOutput(
            logits=logits, embed=src.embed.detach(), loss=src.terms["loss_seg"].detach(),
            metrics=metrics, output=_detached(src.output),
        )  # fmt: skip

    def _train_forward(
        self, img: torch.Tensor, return_features: bool = False
    ) -> HRDAOutput | tuple[torch.Tensor, ...]:
        """One student training forward: `(logits, embed[, features])`, or with HRDA an
        `HRDAOutput` with a fresh detail box (one per forward, from the method's host RNG)."""
        kwargs: dict = {"return_features": return_features}
        if self.hrda is not None:
            kwargs["detail_box"] = self.student.sample_box(img.shape[-2:], self.host_generator)
        if self._student_cast is not None:
            return self._student_cast(self._forward, img, **kwargs)
        return self._forward(img, **kwargs)

    def _seg_forward_loss(
        self,
        img: torch.Tensor,
        label: torch.Tensor,
        weight: torch.Tensor | None,
        return_features: bool = False,
    ) -> SegForward:
        """A student forward on `img` and its pixel-weighted CE against `label`: one term, or
        HRDA's (1 - λ_d)·CE(fused) + λ_d·CE(detail box) (+ λ_lr·CE(context))."""
        out = self._train_forward(img, return_features)
        if isinstance(out, HRDAOutput):
            h = self.hrda
            terms = hrda_seg_loss(
                out, label, weight, detail_weight=h.detail_loss_weight,
                context_weight=h.context_loss_weight, ignore_index=self.ignore_index,
            )  # fmt: skip
            loss = torch.stack(list(terms.values())).sum()
            return SegForward(out.fused, out.embed_lr, loss, terms, out.features, out)
        logits, embed, *feats = out
        full = resize(logits, label.shape[-2:])
        loss = pixel_weighted_ce(full, label, weight, self.ignore_index)
        return SegForward(logits, embed, loss, {"loss_seg": loss}, feats[0] if feats else None,
                          None, full)  # fmt: skip

    def feature_distance(
        self, src_img: torch.Tensor, src_label: torch.Tensor, src: SegForward
    ) -> torch.Tensor:
        """λ · mean L2 distance to the frozen ImageNet features on thing-class cells.

        docs/method.md §2.4.

        HRDA: on the context view (`model.hrda.fd_scale=lr`), plus the detail box (`all`).
        """
        if src.output is None:
            return self._feature_distance(src_img, src_label, src.features[-1])
        out, student = src.output, self.student
        fd = self._feature_distance(student.context_view(src_img), src_label, out.features[-1])
        if self.hrda.fd_scale == "all":
            detail = crop_to_box(student.detail_view(src_img), out.box)
            label = crop_to_box(src_label, out.box)
            fd = fd + self._feature_distance(detail, label, out.features_hr[-1])
        return fd

    def _feature_distance(
        self, imnet_input: torch.Tensor, label: torch.Tensor, student_feat: torch.Tensor
    ) -> torch.Tensor:
        fd_cfg = self.cfg.feat_dist
        with torch.no_grad():
            imnet_feat = self.imnet(imnet_input)[-1]
        loss = feature_distance_loss(
            student_feat, imnet_feat, label, classes=fd_cfg.classes,
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
    """DACS self-training with an EMA teacher, ClassMix and photometric augmentation.

    docs/method.md §2 describes the step.

    The teacher normalises with its batch's statistics (`cfg.teacher.bn=batch`, the reference) or
    runs in eval mode (`running`); it sees the un-augmented target crop unless `cfg.aug.weak_aug`.
    With `cfg.mic.enabled`, MIC's masked-target loss follows the mixed loss; its pseudo-labels are
    the teacher's (`cfg.mic.teacher=shared`) or those of a second EMA teacher (`separate`).
    """

    def __init__(self, student: nn.Module, cfg: MethodConfig, **kwargs) -> None:  # noqa: ANN003
        super().__init__(student, cfg, **kwargs)
        self.teacher = EMATeacher(student, alpha=cfg.teacher.alpha, bn=cfg.teacher.bn)
        self.mic_teacher = None
        if cfg.mic.enabled:
            if cfg.mic.block_size is None:
                raise ValueError("method.mic.block_size: resolve it first (config.mic_block_size)")
            if cfg.mic.teacher == "separate":
                self.mic_teacher = EMATeacher(student, alpha=cfg.mic.teacher_alpha,
                                              bn=cfg.teacher.bn)  # fmt: skip

    def update_teacher(self, iteration: int) -> None:
        self.teacher.update(self.student, iteration)
        if self.mic_teacher is not None:
            self.mic_teacher.update(self.student, iteration)

    def forward_backward(
        self, batch: dict[str, torch.Tensor], iteration: int, backward: Backward, want_images: bool
    ) -> StepLog:
        src_img, src_label, tgt_img = batch["src_img"], batch["src_label"], batch["tgt_img"]
        src = self.source_step(src_img, src_label, backward)
        self.after_source_step(src, src_label, iteration)
        teacher = self.pseudo_labels(tgt_img, batch.get("valid_pseudo_mask"))
        masks, mixed_img, mixed_label, mixed_weight = self.class_mix(
            src_img, src_label, tgt_img, teacher
        )
        mixed = self._seg_forward_loss(mixed_img, mixed_label, mixed_weight)
        extra, extra_log = self.target_extra_loss(
            mixed.logits, mixed.embed, teacher, masks, output=mixed.output
        )
        backward(mixed.loss + extra if extra is not None else mixed.loss)
        mixed_pred = mixed.at_label_size(mixed_label.shape[-2:])
        log = {"src.loss_seg": src.loss, **src.metrics,
               **{f"mix.{k}": v.detach() for k, v in mixed.terms.items()},
               "mix.acc_seg": accuracy(mixed_pred, mixed_label),
               "pseudo.weight": teacher.weight.amax(), **extra_log}  # fmt: skip
        masked_img = None
        if self.cfg.mic.enabled:
            masked_img, mic_log = self.mic_step(tgt_img, teacher, backward)
            log |= mic_log
        images = {}
        if want_images:
            images = {"src_img": src_img, "src_label": src_label, "tgt_img": tgt_img,
                      "pseudo_label": teacher.label, "mix_mask": masks, "mixed_img": mixed_img,
                      "mixed_label": mixed_label, "pseudo_weight": mixed_weight}  # fmt: skip
            if masked_img is not None:
                images["masked_img"] = masked_img
        return StepLog(losses=log, images=_detach(images))

    def mic_step(
        self, tgt_img: torch.Tensor, teacher: TeacherOutput, backward: Backward
    ) -> tuple[torch.Tensor, dict[str, Metric]]:
        """MIC: the target, colour-augmented (`mode=target_aug`) and block-masked, trained with
        the teacher's pseudo-labels and their unmixed weights (all CE terms × `mic.weight`)."""
        mic, aug = self.cfg.mic, self.cfg.aug
        label, weight = teacher.label, teacher.weight
        if self.mic_teacher is not None:
            label, weight = self.mic_pseudo_labels(tgt_img, teacher)
        with torch.no_grad():
            masked_img, _ = masked_view(
                tgt_img, augment=mic.mode == "target_aug", block_size=mic.block_size,
                ratio=mic.ratio, mean=self.img_mean, std=self.img_std,
                color_jitter_strength=aug.color_jitter_strength, color_jitter_p=aug.color_jitter_p,
                max_kernel_size=aug.blur_max_kernel, generator=self.generator,
                host_generator=self.host_generator,
            )  # fmt: skip
        h = self.hrda or HRDAConfig()
        res = mic_loss(
            self._train_forward, masked_img, label, weight, weight=mic.weight,
            fused_only=mic.faithful_lambda_fused_only, detail_weight=h.detail_loss_weight,
            context_weight=h.context_loss_weight, ignore_index=self.ignore_index,
        )  # fmt: skip
        extra, extra_log = self.masked_extra_loss(res.output, teacher)
        backward(res.loss + extra if extra is not None else res.loss)
        return masked_img, {**res.terms, **extra_log}

    @torch.no_grad()
    def pseudo_labels(
        self, tgt_img: torch.Tensor, valid_mask: torch.Tensor | None = None
    ) -> TeacherOutput:
        """Teacher forward on the (weak view of the) target and DACS pseudo-labels.

        docs/method.md §2.3.

        `valid_mask` [B, H, W] (HRDA's pseudo-label margins, the batch's `valid_pseudo_mask`)
        multiplies the weight; the confident fraction q still counts every pixel.
        """
        if self.cfg.aug.weak_aug:
            tgt_img = weak_augment(tgt_img, **self._aug_kwargs())
        output = None
        if self.hrda is not None and self.needs_teacher_detail_embed():
            output = self.teacher(tgt_img, full_output=True)  # + the slide-averaged F_hr canvas
            logits, embed = output.fused, output.embed_lr
        else:
            logits, embed = self.teacher(tgt_img)  # HRDA: fused logits, F_lr
        logits = at_least_fp32(logits)
        probs = torch.softmax(resize(logits, tgt_img.shape[-2:]), dim=1)
        probs = self.refine_probs(probs, embed)
        tcfg = self.cfg.teacher
        label, weight = self._pseudo_label(probs, tcfg.pseudo_threshold, valid_mask)
        if not tcfg.self_training:
            weight = torch.zeros_like(weight)
        return TeacherOutput(logits=logits, embed=at_least_fp32(embed), probs=probs, label=label,
                             weight=weight, img=tgt_img, valid_mask=valid_mask,
                             output=output)  # fmt: skip

    def _pseudo_label(
        self, probs: torch.Tensor, threshold: float | None, valid_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels and DACS weights (threshold None: weight 1), ignore rows, margins."""
        tcfg = self.cfg.teacher
        label, weight = pseudo_label_from_probs(  # every probability is >= 0: q = 1 for None
            probs, 0.0 if threshold is None else threshold, tcfg.ignore_top, tcfg.ignore_bottom
        )
        if valid_mask is not None:
            weight = weight * valid_mask.to(weight.dtype)
        return label, weight

    @torch.no_grad()
    def mic_pseudo_labels(
        self, tgt_img: torch.Tensor, teacher: TeacherOutput
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MIC's own EMA teacher (`mic.teacher=separate`) on the un-augmented target: labels and
        weights with `mic.pseudo_threshold` (null: weight 1), the same rows and margins."""
        logits = at_least_fp32(self.mic_teacher(tgt_img)[0])
        probs = torch.softmax(resize(logits, tgt_img.shape[-2:]), dim=1)
        return self._pseudo_label(probs, self.cfg.mic.pseudo_threshold, teacher.valid_mask)

    @torch.no_grad()
    def class_mix(
        self,
        src_img: torch.Tensor,
        src_label: torch.Tensor,
        tgt_img: torch.Tensor,
        teacher: TeacherOutput,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """ClassMix of source onto target, then colour jitter and blur of the mixed image
        (docs/method.md §2.5, §2.7)."""
        masks = sample_class_masks(src_label, self.generator, self.num_classes)  # [B, H, W]
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
                    max_kernel_size=aug.blur_max_kernel, generator=self.generator,
                    host_generator=self.host_generator)  # fmt: skip

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
        output: HRDAOutput | None = None,
    ) -> tuple[torch.Tensor | None, dict[str, Metric]]:
        """Hook for extra losses on the mixed forward (DIDA's instance loss); `output` is the
        HRDA forward (`mixed_logits` are then its fused logits, `mixed_embed` its F_lr)."""
        return None, {}

    def masked_extra_loss(
        self, output: HRDAOutput | tuple[torch.Tensor, ...], teacher: TeacherOutput
    ) -> tuple[torch.Tensor | None, dict[str, Metric]]:
        """Hook for extra losses on MIC's masked forward (DIDA's `compose.mic_view`)."""
        return None, {}

    def needs_teacher_detail_embed(self) -> bool:
        """Whether `pseudo_labels` must keep the HRDA teacher's slide-averaged F_hr canvas."""
        return False

    def training_state(self) -> dict:
        state = super().training_state() | {"teacher": self.teacher.state_dict()}
        if self.mic_teacher is not None:
            state["mic_teacher"] = self.mic_teacher.state_dict()
        if self.host_generator is not self.generator:  # the engine saves `generator` itself
            state["method"] = {"host_rng": self.host_generator.get_state()}
        return state

    def load_training_state(self, ckpt: dict) -> None:
        super().load_training_state(ckpt)
        self.teacher.load_state_dict(ckpt["teacher"])
        if self.mic_teacher is not None:
            self.mic_teacher.load_state_dict(ckpt["mic_teacher"])
        host_rng = (ckpt.get("method") or {}).get("host_rng")
        if host_rng is not None and self.host_generator is not self.generator:
            self.host_generator.set_state(host_rng)


def _detach(images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in images.items()}


def _detached(out: HRDAOutput | None) -> HRDAOutput | None:
    """An HRDA forward without graph and without its encoder maps (kept for DIDA's bank)."""
    if out is None:
        return None
    fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    fields |= {"features": None, "features_hr": None}
    return HRDAOutput(**{k: v.detach() if torch.is_tensor(v) else v for k, v in fields.items()})
