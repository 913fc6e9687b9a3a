"""Typed experiment configuration: dataclasses, YAML loading, dotted overrides, saving.

The dataclass defaults are the paper's GTA→Cityscapes DIDA setting (docs/reproduction.md lists it).
YAML files only hold what differs. Parsing goes through OmegaConf structured configs, so a key
that does not exist or a value of the wrong type is an error that names the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dida.data.labels import THING_CLASSES
from dida.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the key or file."""


@dataclass
class HRDAConfig:
    """HRDA multi-resolution training (Hoyer et al., ECCV 2022); sizes in full-resolution pixels."""

    enabled: bool = False
    # scale of the context (LR) view of the training crop
    lr_scale: float = 0.5
    # detail (HR) crop (h, w) inside the context crop, at full resolution
    detail_crop: list[int] = field(default_factory=lambda: [512, 512])
    # detail-box offsets are multiples of this
    crop_divisible: int = 8
    # false (reference): offsets in [0, margin - divisible]; true: [0, margin]
    full_offset_range: bool = False
    # λ_d of the detail loss and λ_lr of the context loss; the fused loss gets 1 - λ_d - λ_lr
    detail_loss_weight: float = 0.1
    context_loss_weight: float = 0.0
    # classwise | single (one channel) | fixed:<a> (constant attention a in [0, 1], no head)
    attention: str = "classwise"
    attention_embed_dim: int = 256
    # teacher and test: the detail branch over overlapping sliding windows of `detail_crop`
    slide_detail: bool = True
    # window stride = detail_crop // 2 (true) or detail_crop (false)
    slide_overlap: bool = True
    # lr (feature distance on the context features) | all (context + detail)
    fd_scale: str = "lr"
    # detail input blurred by ×0.5-then-×2 resizing (ablation)
    blur_detail: bool = False
    # true (reference): attention masked on the context grid before upsampling (box-edge quirk);
    # false: masked on the fused grid, fused = up(a)·hr + (1 - up(a))·up(lr) inside the box
    faithful_fusion: bool = True


@dataclass
class ModelConfig:
    variant: str = "mit_b5"
    num_classes: int = 19
    # channels of the DAFormer head's per-level embeddings and of the fused feature (DIDA's D)
    embed_dim: int = 256
    dilations: list[int] = field(default_factory=lambda: [1, 6, 12, 18])
    dropout: float = 0.1
    drop_path_rate: float = 0.1
    # ImageNet MiT weights: a .pth file, a Hugging Face id / folder / .safetensors, or None (random)
    pretrained: str | None = "pretrained/mit_b5.pth"
    # activation checkpointing of the encoder blocks: less memory, one more encoder forward
    checkpoint_encoder: bool = False
    hrda: HRDAConfig = field(default_factory=HRDAConfig)


@dataclass
class DatasetConfig:
    # one of: gta, synthia, cityscapes, folder
    kind: str = "cityscapes"
    root: str = "data/cityscapes"
    # sub-folders and suffixes; empty: the kind's default (`data.datasets.default_layout`)
    img_dir: str = ""
    ann_dir: str = ""
    img_suffix: str = ""
    seg_suffix: str = ""
    split: str = "train"
    # resize target (long side, short side), keep ratio
    scale: list[int] = field(default_factory=lambda: [1024, 512])
    # only for kind=folder: class names (defaults to the Cityscapes 19)
    classes: list[str] | None = None


@dataclass
class RCSConfig:
    enabled: bool = True
    temperature: float = 0.01
    min_pixels: int = 3000
    min_crop_ratio: float = 0.5


@dataclass
class DataConfig:
    source: DatasetConfig = field(
        default_factory=lambda: DatasetConfig(kind="gta", root="data/gta", scale=[1280, 720])
    )
    target: DatasetConfig = field(default_factory=DatasetConfig)
    val: DatasetConfig = field(default_factory=lambda: DatasetConfig(split="val"))
    crop_size: list[int] = field(default_factory=lambda: [512, 512])
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    batch_size: int = 2
    num_workers: int = 4
    rcs: RCSConfig = field(default_factory=RCSConfig)
    # HRDA "cpl v2": [top, bottom, left, right] pixels of each target image (at its original
    # size) whose pseudo-labels get weight 0, e.g. [30, 240, 30, 30]; the batch then holds
    # `valid_pseudo_mask`. Replaces method.teacher.ignore_top/bottom (set those to 0).
    target_pseudo_margins: list[int] | None = None


@dataclass
class TeacherConfig:
    alpha: float = 0.999
    pseudo_threshold: float = 0.968
    ignore_top: int = 15
    ignore_bottom: int = 120
    # BatchNorm of the teacher: `batch` (reference: train mode with dropout/drop path off, BN
    # normalises over the current batch, only parameters are averaged) | `running` (eval mode,
    # BN running statistics EMA'd with the parameters)
    bn: str = "batch"
    # false: the pseudo-label weight is forced to 0 (an ablation: the mixed loss then learns only
    # from the pasted source pixels, i.e. ClassMix + augmentation without self-training)
    self_training: bool = True


@dataclass
class AugConfig:
    color_jitter_strength: float = 0.2
    # jitter is applied when a uniform draw exceeds this value (i.e. with probability 1 - p)
    color_jitter_p: float = 0.2
    blur: bool = True
    # 11 equals the reference's 51×51 kernel to 1e-6 for its σ range; null = the reference size
    blur_max_kernel: int | None = 11
    # reference behaviour: the teacher sees the un-augmented target (its weak aug is a no-op)
    weak_aug: bool = False


@dataclass
class FeatDistConfig:
    enabled: bool = True
    weight: float = 0.005
    classes: list[int] | None = field(default_factory=lambda: list(THING_CLASSES))
    scale_min_ratio: float = 0.75


@dataclass
class BankConfig:
    size: int = 300
    # online | random | file
    init: str = "online"
    # a bank file or `embedding_cache` folder, or a shipped bank: `builtin:synthia_300` (the one
    # the released code loads for both benchmarks), `builtin:gta_balanced_300`
    init_path: str | None = None
    update_interval: int = 50
    momentum: float = 0.999
    # reference (released code: image 0's features, class positions searched over the whole
    # batch, absent classes decayed toward 0, one momentum step per event) | per_image (each
    # image's own class means, absent classes untouched)
    update_rule: str = "reference"
    # class_mean | boundary
    update_mode: str = "class_mean"
    boundary_threshold: int = 2


@dataclass
class InstanceConfig:
    weight: float = 0.5
    # sum | softmax
    normalisation: str = "sum"
    tau_weak: float = 1.0
    tau_strong: float = 1.0
    # false (reference): plain sum normalisers, the only epsilon is `log_eps` inside the log, and a
    # pixel whose normaliser is exactly 0 contributes 0 to L_in; true: negative similarities
    # clamped to 0 and `eps` added to every normaliser
    safe_normaliser: bool = False
    eps: float = 1e-6
    log_eps: float = 1e-10
    calibrate: bool = True
    # student_mixed_logits (reference: the student's raw logits on the mixed image) |
    # teacher_probs (intended: the teacher's class probabilities on the weak view)
    calibrate_source: str = "student_mixed_logits"
    # instance -> semantic smoothing of the pseudo-label probabilities; 1.0 = off
    a_smooth: float = 1.0
    # input (reference: similarities at crop resolution) | feature (1/4 resolution, cheap)
    resolution: str = "input"
    # restrict the loss to the target pixels of the ClassMix image
    target_pixels_only: bool = False
    # rows of the loss computed at once; 0 = as many as fit `chunk_memory_mb` (one chunk where
    # the whole loss fits: the input-resolution loss at 512x512, batch 2, K=300 takes ~5 GB), on
    # a CPU (not compiled) at most 1 MiB per tensor (cache-sized: faster); the bits do not
    # depend on it
    chunk_size: int = 0
    chunk_memory_mb: int = 1024


@dataclass
class MICConfig:
    """Masked image consistency (MIC, Hoyer et al., CVPR 2023): a loss on a masked target view."""

    enabled: bool = False
    # target_aug (colour jitter + blur, then masking) | target (masking only)
    mode: str = "target_aug"
    # mask block size in input pixels; null = 64 with HRDA (full resolution), 32 without
    block_size: int | None = None
    # probability that a block is masked
    ratio: float = 0.7
    # λ of the masked loss (the reference's `mask_lambda`)
    weight: float = 1.0
    # with HRDA the reference scales only the fused term by λ, not the detail term
    faithful_lambda_fused_only: bool = False
    # shared (pseudo-labels and weights of the method's teacher) | separate (own EMA teacher)
    teacher: str = "shared"
    # for teacher=separate: EMA momentum and confidence threshold (null = weight 1 everywhere)
    teacher_alpha: float = 0.999
    pseudo_threshold: float | None = 0.968


@dataclass
class ComposeConfig:
    """How DIDA's instance branch combines with HRDA and MIC (new design, no published result)."""

    # lr (bank and L_in on the context branch) | hr (detail branch) | both
    hrda_scale: str = "lr"
    # teacher embedding of the detail box for hrda_scale hr/both: slide_avg (crop of the
    # slide-averaged canvas) | recompute_box (a teacher pass on the exact box)
    hr_teacher: str = "slide_avg"
    # hrda_scale both: two banks (one per branch) instead of one shared bank
    hrda_separate_banks: bool = False
    # hrda_scale both: L_in = λ_in·((1 - w)·L_lr + w·L_hr) with w = this (default = λ_d)
    hr_inst_weight: float = 0.1
    # none (L_in on the mixed view only) | add (also on the masked view) | only (masked view)
    mic_view: str = "none"
    # λ of L_in on the masked view (mic_view add/only)
    mic_inst_lambda: float = 0.5


@dataclass
class MethodConfig:
    # source_only | daformer | dida
    name: str = "dida"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    feat_dist: FeatDistConfig = field(default_factory=FeatDistConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    instance: InstanceConfig = field(default_factory=InstanceConfig)
    mic: MICConfig = field(default_factory=MICConfig)
    compose: ComposeConfig = field(default_factory=ComposeConfig)


@dataclass
class OptimConfig:
    lr: float = 6e-5
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    max_iters: int = 40000
    seed: int = 0
    # auto (bf16 on GPUs that support it, else fp32) | fp32 | bf16 | fp16
    precision: str = "auto"
    # false (eager) | blocks (torch.compile each MiT block and head: compiles in about a minute
    # on a GPU) | full (the whole student as one graph); true, as in older configs, means full
    compile: str = "false"
    # torch.compile's mode for `compile`: default | reduce-overhead (CUDA graphs: each compiled
    # block one launch) | max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    device: str = "auto"
    log_interval: int = 50
    checkpoint_interval: int = 1600
    # iter_<N>.pth files kept (latest.pth is a link to the newest); a MiT-B5 checkpoint is 1.36 GB
    keep_checkpoints: int = 2
    # keep best.pth, the checkpoint of the best val mIoU, when the periodic evaluation runs
    save_best: bool = True
    eval_interval: int = 1600
    debug_interval: int = 1000
    tensorboard: bool = True

    def __post_init__(self) -> None:
        # YAML booleans of the former bool field reach here as "True"/"False"
        self.compile = {"false": "false", "true": "full"}.get(
            str(self.compile).lower(), str(self.compile)
        )


@dataclass
class EvalConfig:
    # whole | slide
    mode: str = "whole"
    scale: list[int] = field(default_factory=lambda: [1024, 512])
    crop_size: list[int] = field(default_factory=lambda: [512, 512])
    stride: list[int] = field(default_factory=lambda: [341, 341])
    # slide mode: all windows of an image in one batch (HRDA's test_cfg batched_slide)
    batched_slide: bool = False
    batch_size: int = 1
    num_workers: int = 2
    # class subsets reported beside the full mIoU, e.g. {"16": [...], "13": [...]}
    subsets: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class ExperimentConfig:
    name: str = "gta2cs_dida_mitb5"
    exp: str = "basic"
    description: str = ""
    work_root: str = "work_dirs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _merge(base: Any, update: Any, origin: str) -> ExperimentConfig:
    schema = OmegaConf.structured(base)
    try:
        merged = OmegaConf.merge(schema, update)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(err).splitlines()[0]
        raise ConfigError(f"{origin}: bad config key '{key}': {reason}") from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """Load a YAML or JSON config on top of the defaults, then apply `key=value` overrides."""
    cfg = ExperimentConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = OmegaConf.load(path)
        except Exception as err:  # yaml/json syntax errors
            raise ConfigError(f"{path}: cannot parse config: {str(err).splitlines()[0]}") from None
        if not isinstance(data, DictConfig):
            kind = "a list" if isinstance(data, ListConfig) else type(data).__name__
            raise ConfigError(f"{path}: expected a mapping of config keys at the top, got {kind}")
        cfg = _merge(cfg, data, str(path))
        if path.resolve().parent == SHIPPED_CONFIG_DIR:
            cfg = resolve_paths(cfg, project_root())
    return apply_overrides(cfg, overrides or [], origin=str(path) if path else None)


def apply_overrides(
    cfg: ExperimentConfig, overrides: list[str], origin: str | None = None
) -> ExperimentConfig:
    """Apply `key=value` overrides (dotted keys, YAML values) to a config, then `validate` it."""
    if not overrides:
        return validate(cfg, origin)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value")
        try:
            OmegaConf.from_dotlist([item])
        except Exception as err:  # OmegaConf and YAML syntax errors
            raise ConfigError(f"override '{item}': {str(err).splitlines()[0]}") from None
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
    except Exception as err:  # OmegaConf and YAML syntax errors
        raise ConfigError(f"bad override: {str(err).splitlines()[0]}") from None
    set_keys = [item.split("=", 1)[0].strip() for item in overrides]
    return validate(_merge(cfg, dotlist, "--set"), _Origin(origin, set_keys))


@dataclass(frozen=True)
class _Origin:
    """Where a config value came from, for error messages: the `--set` overrides for their keys
    (and the keys above or below them), else the config file (`file`, None when there is none)."""

    file: str | None
    set_keys: list[str] = field(default_factory=list)

    def where(self, *keys: str) -> str:
        """' (from --set)', ' (in FILE)' or '' for an error about `keys` (any overridden one)."""
        for key in keys:
            for k in self.set_keys:
                if key == k or key.startswith(k + ".") or k.startswith(key + "."):
                    return " (from --set)"
        return f" (in {self.file})" if self.file else ""


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any], origin: str = "config") -> ExperimentConfig:
    return validate(_merge(ExperimentConfig(), OmegaConf.create(data), origin), origin)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as JSON (the run directory's `<name>.json`)."""
    from dida.io_safety import atomic_write

    atomic_write(path, json.dumps(config_to_dict(cfg), indent=2) + "\n", what="config")


# --- validation: every value checked at load, errors name the key --------------------------------
# One rule per key: (dotted key, check, what is expected). A new field adds its line here.


def _int(lo: int) -> tuple[Callable[[Any], bool], str]:
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo
    return ok, f"an integer >= {lo}"


def _num(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False):  # noqa: ANN202
    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    left, right = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
    return ok, f"a number in {left}{lo:g}, {hi:g}{right}"


def _pair(lo: int) -> tuple[Callable[[Any], bool], str]:
    ok = lambda v: isinstance(v, list) and len(v) == 2 and all(_int(lo)[0](x) for x in v)
    return ok, f"two integers >= {lo}, e.g. [512, 512]"


def _ints(lo: int) -> tuple[Callable[[Any], bool], str]:
    ok = lambda v: isinstance(v, list) and len(v) > 0 and all(_int(lo)[0](x) for x in v)
    return ok, f"a non-empty list of integers >= {lo}"


def _choice(*options: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), "one of " + ", ".join(options)


def _variant() -> tuple[Callable[[Any], bool], str]:
    from dida.models.variants import MIT_VARIANTS  # plain data: no torch import

    return (lambda v: v in MIT_VARIANTS), "one of " + ", ".join(sorted(MIT_VARIANTS))


_UNIT = (0.0, 1.0)
_DATASET_RULES = [("kind", _choice("gta", "synthia", "cityscapes", "folder")), ("scale", _pair(1))]
RULES: list[tuple[str, Callable[[], tuple[Callable[[Any], bool], str]]]] = [
    ("model.variant", _variant),
    ("model.num_classes", lambda: _int(1)),
    ("model.embed_dim", lambda: _int(1)),
    ("model.dilations", lambda: _ints(1)),
    ("model.dropout", lambda: _num(0.0, 1.0, hi_open=True)),
    ("model.drop_path_rate", lambda: _num(0.0, 1.0, hi_open=True)),
    *[(f"data.{part}.{key}", lambda r=rule: r) for part in ("source", "target", "val")
      for key, rule in _DATASET_RULES],
    ("data.crop_size", lambda: _pair(1)),
    ("data.cat_max_ratio", lambda: _num(0.0, 1.0, lo_open=True)),
    ("data.flip_prob", lambda: _num(*_UNIT)),
    ("data.batch_size", lambda: _int(1)),
    ("data.num_workers", lambda: _int(0)),
    ("data.rcs.temperature", lambda: _num(0.0, lo_open=True)),
    ("data.rcs.min_pixels", lambda: _int(0)),
    ("data.rcs.min_crop_ratio", lambda: _num(0.0)),  # HRDA uses 2.0 (4x the pixels)
    ("method.teacher.alpha", lambda: _num(*_UNIT)),
    ("method.teacher.pseudo_threshold", lambda: _num(*_UNIT)),
    ("method.teacher.ignore_top", lambda: _int(0)),
    ("method.teacher.ignore_bottom", lambda: _int(0)),
    ("method.bank.size", lambda: _int(1)),
    ("method.bank.update_interval", lambda: _int(1)),
    ("method.bank.momentum", lambda: _num(*_UNIT)),
    ("method.instance.weight", lambda: _num(0.0)),
    ("method.instance.chunk_size", lambda: _int(0)),
    ("method.instance.chunk_memory_mb", lambda: _int(1)),
    ("optim.lr", lambda: _num(0.0, lo_open=True)),
    ("optim.head_lr_mult", lambda: _num(0.0, lo_open=True)),
    ("optim.weight_decay", lambda: _num(0.0)),
    ("optim.betas", lambda: ((lambda v: len(v) == 2 and all(0 <= b < 1 for b in v)),
                             "two numbers in [0, 1)")),
    ("optim.warmup_iters", lambda: _int(0)),
    ("optim.warmup_ratio", lambda: _num(*_UNIT)),
    ("optim.power", lambda: _num(0.0)),
    ("optim.min_lr", lambda: _num(0.0)),
    ("train.max_iters", lambda: _int(1)),
    ("train.seed", lambda: _int(0)),
    ("train.precision", lambda: _choice("auto", "fp32", "bf16", "fp16")),
    ("train.compile", lambda: _choice("false", "blocks", "full")),
    ("train.compile_mode", lambda: _choice("default", "reduce-overhead", "max-autotune",
                                           "max-autotune-no-cudagraphs")),
    ("train.log_interval", lambda: _int(1)),
    ("train.checkpoint_interval", lambda: _int(1)),
    ("train.keep_checkpoints", lambda: _int(1)),
    ("train.eval_interval", lambda: _int(0)),
    ("train.debug_interval", lambda: _int(0)),
    ("eval.mode", lambda: _choice("whole", "slide")),
    ("eval.scale", lambda: _pair(1)),
    ("eval.crop_size", lambda: _pair(1)),
    ("eval.stride", lambda: _pair(1)),
    ("eval.batch_size", lambda: _int(1)),
    ("eval.num_workers", lambda: _int(0)),
]  # fmt: skip


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: ExperimentConfig, origin: str | _Origin | None = None) -> ExperimentConfig:
    """Check every value of `cfg` against `RULES`; a `ConfigError` names the key, value, range
    and where the value came from (`origin`: the config file, or an `_Origin` that also knows
    the `--set` keys)."""
    origin = origin if isinstance(origin, _Origin) else _Origin(origin)
    for key, rule in RULES:
        check, expected = rule()
        value = _get(cfg, key)
        try:
            ok = check(value)
        except TypeError:
            ok = False
        if not ok:
            _fail(key, value, expected, origin)
    for name, ids in cfg.eval.subsets.items():
        if any(not 0 <= i < cfg.model.num_classes for i in ids):
            where = origin.where(f"eval.subsets.{name}", "model.num_classes")
            raise ConfigError(
                f"eval.subsets.{name}={ids}: class ids must lie in [0, model.num_classes="
                f"{cfg.model.num_classes}){where}"
            )
    return validate_hrda_mic(cfg, origin)


# --- HRDA / MIC / composition: choices and cross-field rules -------------------------------------


def _fail(key: str, value: Any, expected: str, origin: _Origin, *related: str) -> None:
    """A `ConfigError` for `key`'s value, saying where it (or a `related` key's) came from."""
    raise ConfigError(
        f"{key}={json.dumps(value)}: expected {expected}{origin.where(key, *related)}"
    )


def parse_attention(spec: str) -> float | None:
    """`model.hrda.attention` -> None for a learned head (classwise/single), else the fixed a.

    Raises:
        ValueError: not classwise, single or fixed:<a> with a in [0, 1].
    """
    if spec in ("classwise", "single"):
        return None
    if spec.startswith("fixed:"):
        try:
            value = float(spec.removeprefix("fixed:"))
        except ValueError:
            value = -1.0
        if 0.0 <= value <= 1.0:
            return value
    raise ValueError(f"attention '{spec}': expected classwise, single or fixed:<a>, a in [0, 1]")


def validate_hrda_mic(
    cfg: ExperimentConfig, origin: str | _Origin | None = None
) -> ExperimentConfig:
    """Check the HRDA, MIC and DIDA-composition settings of `cfg`; errors name the key."""
    origin = origin if isinstance(origin, _Origin) else _Origin(origin)
    hrda, mic, comp = cfg.model.hrda, cfg.method.mic, cfg.method.compose
    try:
        parse_attention(hrda.attention)
    except ValueError:
        _fail("model.hrda.attention", hrda.attention, "classwise, single or fixed:<a in [0, 1]>",
              origin)  # fmt: skip
    if not 0.0 < hrda.lr_scale <= 1.0:
        _fail("model.hrda.lr_scale", hrda.lr_scale, "a number in (0, 1]", origin)
    crop = cfg.data.crop_size
    if len(hrda.detail_crop) != 2 or (
        hrda.enabled and not all(0 < d <= c for d, c in zip(hrda.detail_crop, crop, strict=True))
    ):
        _fail("model.hrda.detail_crop", hrda.detail_crop,
              f"two positive integers <= data.crop_size {crop}",
              origin, "data.crop_size", "model.hrda.enabled")  # fmt: skip
    if hrda.crop_divisible < 1:
        _fail("model.hrda.crop_divisible", hrda.crop_divisible, "an integer >= 1", origin)
    weights = (hrda.detail_loss_weight, hrda.context_loss_weight)
    if min(weights) < 0 or sum(weights) > 1:
        _fail("model.hrda.detail_loss_weight", hrda.detail_loss_weight,
              "weights >= 0 with detail + context <= 1",
              origin, "model.hrda.context_loss_weight")  # fmt: skip
    if hrda.fd_scale not in ("lr", "all"):
        _fail("model.hrda.fd_scale", hrda.fd_scale, "one of lr, all", origin)
    margins = cfg.data.target_pseudo_margins
    if margins is not None:
        if len(margins) != 4 or min(margins) < 0:
            _fail("data.target_pseudo_margins", margins,
                  "null or four integers >= 0 [top, bottom, left, right]", origin)  # fmt: skip
        teacher = cfg.method.teacher
        if teacher.ignore_top or teacher.ignore_bottom:
            where = origin.where("data.target_pseudo_margins", "method.teacher")
            raise ConfigError(
                f"data.target_pseudo_margins and method.teacher.ignore_top/ignore_bottom "
                f"({teacher.ignore_top}/{teacher.ignore_bottom}) exclude each other: set the "
                f"ignore rows to 0{where}"
            )
    for key, value, options in (
        ("method.mic.mode", mic.mode, ("target_aug", "target")),
        ("method.mic.teacher", mic.teacher, ("shared", "separate")),
        ("method.compose.hrda_scale", comp.hrda_scale, ("lr", "hr", "both")),
        ("method.compose.hr_teacher", comp.hr_teacher, ("slide_avg", "recompute_box")),
        ("method.compose.mic_view", comp.mic_view, ("none", "add", "only")),
    ):
        if value not in options:
            _fail(key, value, "one of " + ", ".join(options), origin)
    if not 0.0 <= mic.ratio < 1.0:
        _fail("method.mic.ratio", mic.ratio, "a number in [0, 1)", origin)
    if mic.block_size is not None and mic.block_size < 1:
        _fail("method.mic.block_size", mic.block_size, "null or an integer >= 1", origin)
    if mic.weight < 0:
        _fail("method.mic.weight", mic.weight, "a number >= 0", origin)
    if comp.hrda_scale != "lr" and not hrda.enabled:
        _fail("method.compose.hrda_scale", comp.hrda_scale, "lr unless model.hrda.enabled",
              origin, "model.hrda.enabled")  # fmt: skip
    if comp.mic_view != "none" and not mic.enabled:
        _fail("method.compose.mic_view", comp.mic_view, "none unless method.mic.enabled",
              origin, "method.mic.enabled")  # fmt: skip
    return cfg


def mic_block_size(cfg: ExperimentConfig) -> int:
    """`method.mic.block_size`, or its default: 64 px at HRDA's full resolution, 32 at half."""
    if cfg.method.mic.block_size is not None:
        return cfg.method.mic.block_size
    return 64 if cfg.model.hrda.enabled else 32


# --- paths: shipped experiments are relative to the project folder, run configs are absolute ----

SHIPPED_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# config keys holding file or folder paths (a new path field adds its key here)
PATH_KEYS = (
    "work_root",
    "model.pretrained",
    "data.source.root",
    "data.target.root",
    "data.val.root",
    "method.bank.init_path",
)


def project_root() -> Path:
    """The folder that relative paths of the shipped experiments refer to.

    The clone's root when dida runs from a source checkout (`pip install -e .`), so that
    `data/`, `pretrained/` and `work_dirs/` are found from any working folder; otherwise the
    current folder.
    """
    clone = Path(__file__).resolve().parents[2]
    return clone if (clone / "pyproject.toml").is_file() else Path.cwd()


def _looks_like_hub_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.endswith((".pth", ".pt", ".safetensors"))


def resolve_paths(cfg: ExperimentConfig, base: str | Path) -> ExperimentConfig:
    """`cfg` with every relative path of `PATH_KEYS` made absolute against `base`.

    Hugging Face ids in `model.pretrained` (`owner/name`) stay as they are unless such a path
    exists under `base`.
    """
    base = Path(base).absolute()
    for key in PATH_KEYS:
        *parents, name = key.split(".")
        node = _get(cfg, ".".join(parents)) if parents else cfg
        value = getattr(node, name)
        if not value or Path(value).is_absolute() or str(value).startswith("builtin:"):
            continue  # a shipped bank (`builtin:<name>`) is not a path
        if key == "model.pretrained" and _looks_like_hub_id(value) and not (base / value).exists():
            continue
        setattr(node, name, str(base / value))
    return cfg
