"""Typed experiment configuration: dataclasses, YAML loading, dotted overrides, saving.

The dataclass defaults are the paper's GTA→Cityscapes DIDA setting (METHOD.md §2, §3, §7).
YAML files only hold what differs. Parsing goes through OmegaConf structured configs, so a key
that does not exist or a value of the wrong type is an error that names the key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dida.data.labels import THING_CLASSES
from dida.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the key or file."""


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


@dataclass
class DatasetConfig:
    # one of: gta, synthia, cityscapes, folder
    kind: str = "cityscapes"
    root: str = "data/cityscapes"
    # sub-folders and suffixes; empty means the dataset kind's default (METHOD.md §4.1)
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
    chunk_size: int = 32


@dataclass
class MethodConfig:
    # source_only | daformer | dida
    name: str = "dida"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    feat_dist: FeatDistConfig = field(default_factory=FeatDistConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    instance: InstanceConfig = field(default_factory=InstanceConfig)


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
    compile: bool = False
    device: str = "auto"
    log_interval: int = 50
    checkpoint_interval: int = 1600
    keep_checkpoints: int = 50
    eval_interval: int = 1600
    debug_interval: int = 1000
    tensorboard: bool = True


@dataclass
class EvalConfig:
    # whole | slide
    mode: str = "whole"
    scale: list[int] = field(default_factory=lambda: [1024, 512])
    crop_size: list[int] = field(default_factory=lambda: [512, 512])
    stride: list[int] = field(default_factory=lambda: [341, 341])
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
        cfg = _merge(cfg, data, str(path))
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Apply `key=value` overrides (dotted keys, YAML values) to a config."""
    if not overrides:
        return cfg
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value")
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad override: {str(err).splitlines()[0]}") from None
    return _merge(cfg, dotlist, "--set")


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any], origin: str = "config") -> ExperimentConfig:
    return _merge(ExperimentConfig(), OmegaConf.create(data), origin)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as JSON (the run directory's `<name>.json`)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
    tmp.replace(path)
