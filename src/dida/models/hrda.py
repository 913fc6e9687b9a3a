"""HRDA multi-resolution segmentor (Hoyer et al., ECCV 2022; the reference's `HRDAEncoderDecoder`,
`HRDAHead`).

One MiT encoder and one DAFormer head (shared weights) decode a context view (the whole crop at
`lr_scale`) and a detail view (a full-resolution box inside it, or sliding windows over the whole
input without a box); a light scale-attention head on the context features weighs the two:
`fused = a·hr + (1 - a)·lr` inside the box, the context prediction outside. Every size derives from
the tensors: the output stride is input size / logit size, the fused grid that of the detail logits.
State-dict keys: the `Segmentor`'s `encoder.*` and `head.*`, plus `attention_head.*` (a "head"
for the optimizer's ×10 learning rate, as `decode_head.scale_attention.*` in the reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dida.eval.inference import resize, sliding_windows
from dida.models.daformer_head import DAFormerHead
from dida.models.mit import MiT
from dida.models.segmentor import Segmentor, build_segmentor

if TYPE_CHECKING:
    from dida.config import ModelConfig

Box = tuple[int, int, int, int]  # (y1, y2, x1, x2), end-exclusive, in input pixels


def sample_detail_box(
    size: Sequence[int],
    crop: Sequence[int],
    divisible: int = 8,
    *,
    full_offset_range: bool = False,
    generator: torch.Generator | None = None,
) -> Box:
    """Random detail box of size `crop` inside an image of `size` (HRDA `get_crop_bbox`).

    Offsets are multiples of `divisible`. Faithful range (default): `randint(0, (margin + 1) //
    divisible) · divisible`, exclusive bound, so with margin 512 and divisible 8 the offsets are
    0..504 and the last 8 rows/columns are never in a detail crop; `full_offset_range` allows
    0..margin. A crop equal to the image gives the whole image. Draws y first, then x.
    """
    (h, w), (ch, cw) = size, crop
    if ch > h or cw > w:
        raise ValueError(f"detail crop {ch}x{cw} is larger than the image {h}x{w}")
    if (ch, cw) == (h, w):
        return 0, h, 0, w
    device = generator.device if generator is not None else "cpu"

    def offset(margin: int) -> int:
        n = margin // divisible + 1 if full_offset_range else max((margin + 1) // divisible, 1)
        return int(torch.randint(n, (1,), generator=generator, device=device)) * divisible

    y1 = offset(h - ch)
    x1 = offset(w - cw)
    return y1, y1 + ch, x1, x1 + cw


def box_to_grid(box: Box, input_size: Sequence[int], grid_size: Sequence[int]) -> Box:
    """Scale an input-pixel box to a grid of `grid_size` over the same image (truncating, as HRDA's
    `scale_box`)."""
    fy, fx = input_size[0] / grid_size[0], input_size[1] / grid_size[1]
    y1, y2, x1, x2 = box
    return int(y1 / fy), int(y2 / fy), int(x1 / fx), int(x2 / fx)


def crop_to_box(x: torch.Tensor, box: Box, input_size: Sequence[int] | None = None) -> torch.Tensor:
    """The part of `x` inside `box`; `x`'s last two dims are a grid over an image of `input_size`
    (default: `x`'s own size, i.e. a plain crop).

    Shapes: x: [..., h, w] -> [..., box_h·h/H, box_w·w/W]
    """
    grid = tuple(x.shape[-2:])
    y1, y2, x1, x2 = box_to_grid(box, input_size or grid, grid)
    return x[..., y1:y2, x1:x2]


def paste_windows(
    windows: torch.Tensor, boxes: Sequence[Box], batch: int, size: Sequence[int]
) -> torch.Tensor:
    """Average window outputs on a canvas by their overlap count (HRDA `decode_hr`).

    Args:
        windows: outputs of all windows, window-major: rows i·B..(i+1)·B belong to `boxes[i]`.
        boxes: window boxes on the canvas grid.
        batch: images per window (B).
        size: canvas (h, w).

    Shapes: windows: [n·B, K, h_win, w_win] -> [B, K, h, w]
    """
    canvas = windows.new_zeros(batch, windows.shape[1], *size)  # [B, K, h, w]
    count = torch.zeros(1, 1, *size, device="cpu")  # checked on the CPU: no device sync
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        part = windows[i * batch : (i + 1) * batch]
        if part.shape[-2:] != (y2 - y1, x2 - x1):
            raise ValueError(f"window output {tuple(part.shape[-2:])} does not fit box {boxes[i]}")
        canvas[:, :, y1:y2, x1:x2] += part
        count[:, :, y1:y2, x1:x2] += 1
    if bool((count == 0).any()):
        raise ValueError("sliding windows do not cover the canvas")
    return canvas / count.to(device=canvas.device, dtype=canvas.dtype)


def _box_mask(like: torch.Tensor, box: Box, input_size: Sequence[int]) -> torch.Tensor:
    """1 inside `box` on `like`'s grid, else 0. Shapes: like [B, K, h, w] -> [B, 1, h, w]."""
    mask = like.new_zeros(like.shape[0], 1, *like.shape[-2:])
    y1, y2, x1, x2 = box_to_grid(box, input_size, like.shape[-2:])
    mask[:, :, y1:y2, x1:x2] = 1
    return mask


def fuse_scales(
    lr: torch.Tensor,
    hr: torch.Tensor,
    attention: torch.Tensor | float,
    box: Box | None,
    input_size: Sequence[int],
    out_size: Sequence[int],
    *,
    faithful: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
    """Scale-attention fusion of context and detail logits (the reference's `HRDAHead.forward`).

    Faithful (reference): `a` is masked by the box on the context grid, `lr' = (1 - a)·lr`,
    `fused = up(a)·hr_in + up(lr')`, with `hr_in` the detail logits pasted into zeros at the box.
    Because the mask is applied before the bilinear upsampling, fused-grid pixels next to the box
    edges get a fraction of `a` (a reference quirk). `faithful=False` masks `up(a)` on the fused
    grid: `fused = up(a)·hr_in + (1 - up(a))·up(lr)`, exactly `up(lr)` outside the box.

    Args:
        lr: context logits over the whole context crop.
        hr: detail logits of the box, or (box None) over the whole input.
        attention: sigmoid attention on the context grid, or a fixed float.
        box: detail box in input pixels, or None (no masking).
        input_size: (H, W) of the input (full-resolution pixels).
        out_size: the fused grid (h', w'), the grid of the detail logits over the whole input.

    Returns:
        (fused, lr_out, attention used): `lr_out` is `(1 - a)·lr` (faithful, as the reference
        returns it) or `lr`; the attention is box-masked when a box is given.

    Shapes:
        lr: [B, C, h, w]; hr: [B, C, h_d, w_d] (box) or [B, C, h', w']; attention [B, C|1, h, w]
        fused: [B, C, h', w']
    """
    hr_in = hr
    if box is not None:
        hr_in = hr.new_zeros(*hr.shape[:2], *out_size)
        y1, y2, x1, x2 = box_to_grid(box, input_size, out_size)
        if hr.shape[-2:] != (y2 - y1, x2 - x1):
            raise ValueError(f"detail logits {tuple(hr.shape[-2:])} do not fit the box {box} "
                             f"on the fused grid {tuple(out_size)}")  # fmt: skip
        hr_in[:, :, y1:y2, x1:x2] = hr
    elif tuple(hr.shape[-2:]) != tuple(out_size):
        raise ValueError(f"detail logits {tuple(hr.shape[-2:])} != fused grid {tuple(out_size)}")
    if faithful:
        if box is not None:
            attention = attention * _box_mask(lr, box, input_size)
        lr_out = (1 - attention) * lr
        att_up = resize(attention, out_size) if torch.is_tensor(attention) else attention
        return att_up * hr_in + resize(lr_out, out_size), lr_out, attention
    if torch.is_tensor(attention):
        att_up = resize(attention, out_size)
    else:
        att_up = hr.new_full((hr.shape[0], 1, *out_size), attention)
    if box is not None:
        att_up = att_up * _box_mask(hr_in, box, input_size)
    return att_up * hr_in + (1 - att_up) * resize(lr, out_size), lr, att_up


@dataclass
class HRDAOutput:
    """Everything one HRDA forward computes; logits are raw (pre-softmax) at their own grids.

    Shapes (input B×3×H×W, context scale s, output stride 4, detail box of size h_d×w_d):
        fused: [B, C, H/4, W/4]; lr: [B, C, sH/4, sW/4] (`(1 - a)·lr` in faithful fusion)
        hr: [B, C, h_d/4, w_d/4] with a box, else the slide-averaged [B, C, H/4, W/4]
        attention: [B, C|1, sH/4, sW/4] (box-masked with a box) or a float (fixed attention)
        embed_lr: [B, D, sH/4, sW/4] F_lr; embed_hr: F_hr of the box, or the slide-averaged
            canvas [B, D, H/4, W/4] (None when not requested)
        features / features_hr: the encoder's 4 maps of the context / detail view (with
            `return_features`; detail only with a box)
    """

    fused: torch.Tensor
    lr: torch.Tensor
    hr: torch.Tensor
    attention: torch.Tensor | float
    embed_lr: torch.Tensor
    embed_hr: torch.Tensor | None
    box: Box | None
    input_size: tuple[int, int]
    features: list[torch.Tensor] | None = None
    features_hr: list[torch.Tensor] | None = None


class HRDASegmentor(Segmentor):
    """A `Segmentor` that decodes a context and a detail view and fuses them (HRDA).

    Called like a `Segmentor`, `model(img)` runs inference (context view + detail windows, no box)
    and returns `(fused logits, F_lr)` (+ the context encoder maps with `return_features`), so
    evaluation and teachers work unchanged. `model(img, detail_box=box)` is the training forward
    and `model(img, full_output=True)` the teacher forward with the slide-averaged `F_hr`; both
    return an `HRDAOutput`.

    Args:
        encoder, head: the shared MiT encoder and DAFormer head.
        attention_head: the attention head (a conv-fusion DAFormer head with C or 1 outputs), or
            None with `fixed_attention`.
        lr_scale: context view scale.
        detail_crop: detail box / sliding window (h, w) in input pixels.
        crop_divisible, full_offset_range: detail-box offsets (see `sample_detail_box`).
        fixed_attention: constant attention instead of the head (ablation; 0 = context only,
            1 = detail only inside the box).
        slide_detail: without a box, the detail branch runs on sliding windows (else on the
            whole input at once); `slide_overlap` sets the stride to half the window.
        blur_detail: detail input blurred by ×0.5-then-×2 bilinear resizing.
        faithful_fusion: see `fuse_scales`.
    """

    def __init__(
        self,
        encoder: MiT,
        head: DAFormerHead,
        attention_head: DAFormerHead | None,
        *,
        lr_scale: float = 0.5,
        detail_crop: Sequence[int] = (512, 512),
        crop_divisible: int = 8,
        full_offset_range: bool = False,
        fixed_attention: float | None = None,
        slide_detail: bool = True,
        slide_overlap: bool = True,
        blur_detail: bool = False,
        faithful_fusion: bool = True,
    ) -> None:
        super().__init__(encoder, head)
        if (attention_head is None) == (fixed_attention is None):
            raise ValueError("give exactly one of attention_head and fixed_attention")
        self.attention_head = attention_head
        self.fixed_attention = fixed_attention
        self.lr_scale = lr_scale
        self.detail_crop = (int(detail_crop[0]), int(detail_crop[1]))
        self.crop_divisible = crop_divisible
        self.full_offset_range = full_offset_range
        self.slide_detail = slide_detail
        self.slide_overlap = slide_overlap
        self.blur_detail = blur_detail
        self.faithful_fusion = faithful_fusion

    def context_view(self, img: torch.Tensor) -> torch.Tensor:
        """The context (LR) input: bilinear ×`lr_scale` (= 2×2 average pooling at 0.5).

        Shapes: [B, 3, H, W] -> [B, 3, ⌊sH⌋, ⌊sW⌋]
        """
        if self.lr_scale == 1:
            return img
        return F.interpolate(img, scale_factor=self.lr_scale, mode="bilinear", align_corners=False)

    def context_size(self, size: Sequence[int]) -> tuple[int, int]:
        """(h, w) of the context view of an input of `size`: ⌊s·H⌋ × ⌊s·W⌋."""
        return int(size[0] * self.lr_scale), int(size[1] * self.lr_scale)

    def detail_view(self, img: torch.Tensor) -> torch.Tensor:
        """The full-resolution input of the detail branch (blurred with `blur_detail`)."""
        if not self.blur_detail:
            return img
        down = F.interpolate(img, scale_factor=0.5, mode="bilinear", align_corners=False)
        return F.interpolate(down, scale_factor=2.0, mode="bilinear", align_corners=False)

    def sample_box(self, size: Sequence[int], generator: torch.Generator | None = None) -> Box:
        """A random detail box for a training forward on inputs of `size` (h, w)."""
        return sample_detail_box(
            size, self.detail_crop, self.crop_divisible,
            full_offset_range=self.full_offset_range, generator=generator,
        )  # fmt: skip

    def slide_boxes(self, size: Sequence[int]) -> list[Box]:
        """Detail windows over an input of `size` (stride half the window with `slide_overlap`)."""
        stride = [c // 2 for c in self.detail_crop] if self.slide_overlap else self.detail_crop
        return sliding_windows(size, self.detail_crop, stride)

    def decode_detail(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared head on the detail view of the whole `img` (no context, no attention):
        `(logits, F_hr)`, e.g. a teacher pass on exactly a student's detail box.

        Shapes: img: [B, 3, h, w] -> [B, C, h/4, w/4], [B, D, h/4, w/4]
        """
        return self.head(self.encoder(self.detail_view(img)))

    def forward(
        self,
        img: torch.Tensor,
        return_features: bool = False,
        *,
        detail_box: Box | None = None,
        full_output: bool = False,
    ) -> HRDAOutput | tuple[torch.Tensor, ...]:
        """Inference `(fused, F_lr[, features])`, or an `HRDAOutput` with a box or `full_output`.

        Shapes: img: [B, 3, H, W]; see `HRDAOutput`.
        """
        if detail_box is not None:
            return self._forward_box(img, detail_box, return_features)
        out = self._forward_slide(img, return_features, with_embed_hr=full_output)
        if full_output:
            return out
        if return_features:
            return out.fused, out.embed_lr, out.features
        return out.fused, out.embed_lr

    def _encode(self, x_lr: torch.Tensor, x_hr: torch.Tensor) -> tuple[list, list]:
        """Encoder maps of both views; one batched pass when their sizes agree (the encoder has no
        batch statistics, so this equals two passes)."""
        if x_lr.shape[-2:] != x_hr.shape[-2:]:
            return self.encoder(x_lr), self.encoder(x_hr)
        feats = self.encoder(torch.cat([x_lr, x_hr]))  # 4 × [B_lr + B_hr, C_i, h_i, w_i]
        n = x_lr.shape[0]
        return [f[:n] for f in feats], [f[n:] for f in feats]

    def _attention(self, feats_lr: list[torch.Tensor]) -> torch.Tensor | float:
        if self.attention_head is None:
            return self.fixed_attention
        return torch.sigmoid(self.attention_head(feats_lr)[0])

    def _forward_box(self, img: torch.Tensor, box: Box, return_features: bool) -> HRDAOutput:
        size = tuple(img.shape[-2:])
        x_hr = crop_to_box(self.detail_view(img), box)
        feats_lr, feats_hr = self._encode(self.context_view(img), x_hr)
        lr, embed_lr = self.head(feats_lr)  # head passes kept apart: BatchNorm statistics
        hr, embed_hr = self.head(feats_hr)
        # fused grid = the detail logits' grid extended to the whole input
        out_size = (
            size[0] * hr.shape[-2] // x_hr.shape[-2],
            size[1] * hr.shape[-1] // x_hr.shape[-1],
        )
        fused, lr_out, att = fuse_scales(
            lr, hr, self._attention(feats_lr), box, size, out_size, faithful=self.faithful_fusion
        )
        return HRDAOutput(
            fused=fused, lr=lr_out, hr=hr, attention=att, embed_lr=embed_lr, embed_hr=embed_hr,
            box=box, input_size=size, features=feats_lr if return_features else None,
            features_hr=feats_hr if return_features else None,
        )  # fmt: skip

    def _forward_slide(
        self, img: torch.Tensor, return_features: bool, with_embed_hr: bool
    ) -> HRDAOutput:
        batch, size = img.shape[0], tuple(img.shape[-2:])
        x_hr = self.detail_view(img)
        boxes = self.slide_boxes(size) if self.slide_detail else [(0, size[0], 0, size[1])]
        windows = torch.cat([x_hr[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])  # [n·B, 3, ..]
        feats_lr, feats_hr = self._encode(self.context_view(img), windows)
        lr, embed_lr = self.head(feats_lr)
        hr_win, embed_win = self.head(feats_hr)  # [n·B, C | D, h_win, w_win]
        win_h, win_w = boxes[0][1] - boxes[0][0], boxes[0][3] - boxes[0][2]
        out_size = (size[0] * hr_win.shape[-2] // win_h, size[1] * hr_win.shape[-1] // win_w)
        grid_boxes = [box_to_grid(b, size, out_size) for b in boxes]
        hr = paste_windows(hr_win, grid_boxes, batch, out_size)
        embed_hr = paste_windows(embed_win, grid_boxes, batch, out_size) if with_embed_hr else None
        fused, lr_out, att = fuse_scales(
            lr, hr, self._attention(feats_lr), None, size, out_size, faithful=self.faithful_fusion
        )
        return HRDAOutput(
            fused=fused, lr=lr_out, hr=hr, attention=att, embed_lr=embed_lr, embed_hr=embed_hr,
            box=None, input_size=size, features=feats_lr if return_features else None,
        )  # fmt: skip


def build_attention_head(
    in_channels: Sequence[int], num_classes: int, classwise: bool = True, embed_dim: int = 256,
    dropout: float = 0.1,
) -> DAFormerHead:  # fmt: skip
    """HRDA's attention head: a DAFormer head with conv1 fusion and C (or 1) sigmoid outputs.

    530,707 parameters for MiT-B5 widths, 19 classes, classwise (526,081 with one channel).
    """
    out = num_classes if classwise else 1
    return DAFormerHead(in_channels, out, embed_dim, dilations=(1,), dropout=dropout, fusion="conv")


def hrda_segmentor_from_config(model_cfg: ModelConfig) -> HRDASegmentor:
    """The `HRDASegmentor` of `model_cfg` (`model_cfg.hrda`), randomly initialised."""
    from dida.config import ConfigError, parse_attention

    hrda = model_cfg.hrda
    base = build_segmentor(
        variant=model_cfg.variant, num_classes=model_cfg.num_classes,
        embed_dim=model_cfg.embed_dim, dilations=tuple(model_cfg.dilations),
        dropout=model_cfg.dropout, drop_path_rate=model_cfg.drop_path_rate,
        checkpoint_encoder=model_cfg.checkpoint_encoder,
    )  # fmt: skip
    try:
        fixed = parse_attention(hrda.attention)
    except ValueError as err:
        raise ConfigError(f"model.hrda.{err}") from None
    attention = None
    if fixed is None:
        attention = build_attention_head(
            base.encoder.embed_dims, model_cfg.num_classes, hrda.attention == "classwise",
            hrda.attention_embed_dim, model_cfg.dropout,
        )  # fmt: skip
    return HRDASegmentor(
        base.encoder, base.head, attention, lr_scale=hrda.lr_scale,
        detail_crop=hrda.detail_crop, crop_divisible=hrda.crop_divisible,
        full_offset_range=hrda.full_offset_range, fixed_attention=fixed,
        slide_detail=hrda.slide_detail, slide_overlap=hrda.slide_overlap,
        blur_detail=hrda.blur_detail, faithful_fusion=hrda.faithful_fusion,
    )  # fmt: skip
