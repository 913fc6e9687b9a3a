"""Builds the method module of a config: student, pretrained weights, frozen ImageNet encoder, bank.

This is the engine's side of model construction, so all file reading (weights, bank files) is here.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch

from dida.config import ExperimentConfig, mic_block_size
from dida.errors import UserError

log = logging.getLogger("dida.train")

METHODS = ("source_only", "daformer", "dida")


def check_inputs(cfg: ExperimentConfig) -> None:
    """Fail early, before any long work, on settings that cannot run."""
    if cfg.method.name not in METHODS:
        raise UserError(f"method.name: '{cfg.method.name}' is not one of {', '.join(METHODS)}")
    if cfg.model.pretrained:
        from dida.models.weights import check_weights_source

        check_weights_source(cfg.model.pretrained)
    fd = cfg.method.feat_dist
    if fd.enabled and fd.classes and max(fd.classes) >= cfg.model.num_classes:
        raise UserError(
            f"method.feat_dist.classes {fd.classes} holds ids >= model.num_classes "
            f"({cfg.model.num_classes}); set it to this dataset's thing classes or null"
        )
    bank = cfg.method.bank
    if bank.init not in ("online", "random", "file"):
        raise UserError(f"method.bank.init: '{bank.init}' is not one of online, random, file")
    safe = cfg.method.instance.safe_normaliser
    if cfg.method.name == "dida" and bank.init == "random" and not safe:
        raise UserError(
            "method.bank.init=random gives signed similarities, which the reference normaliser "
            "(method.instance.safe_normaliser=false) turns into log(negative) = NaN; use "
            "bank.init=online or file, or set method.instance.safe_normaliser=true"
        )
    if cfg.method.name == "dida" and bank.init == "file":
        from dida.engine.bank_io import resolve_bank_path

        if not bank.init_path or not resolve_bank_path(bank.init_path).exists():
            raise UserError(
                f"method.bank.init_path: '{bank.init_path}' not found (needed by bank.init=file)"
            )
    if cfg.method.mic.enabled and cfg.method.name == "source_only":
        raise UserError(
            "method.mic.enabled needs the teacher's pseudo-labels: use method.name=daformer or dida"
        )


def build_method(
    cfg: ExperimentConfig,
    train_set,  # noqa: ANN001
    device: torch.device,
    rank: int = 0,
) -> torch.nn.Module:
    """The method module of `cfg.method.name`, on `device`, with its own seeded torch generator."""
    from dida.adapt.daformer import DAFormer, SourceOnly
    from dida.models import load_pretrained, segmentor_from_config

    num_classes = cfg.model.num_classes
    classes = getattr(train_set, "classes", None)
    if classes is not None and len(classes) != num_classes:
        raise UserError(
            f"model.num_classes is {num_classes} but the dataset has {len(classes)} classes"
        )
    student = segmentor_from_config(cfg.model)
    imnet = None
    if cfg.model.pretrained:
        report = load_pretrained(student.encoder, cfg.model.pretrained)
        log.info("loaded encoder weights from %s (%s)", cfg.model.pretrained, report)
        if cfg.method.feat_dist.enabled:
            imnet = copy.deepcopy(student.encoder)
    elif cfg.method.feat_dist.enabled:
        log.warning("no pretrained weights: the ImageNet feature distance is switched off")
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.train.seed * 1000 + rank)
    kwargs = dict(num_classes=num_classes, imnet_encoder=imnet, generator=generator,
                  hrda=cfg.model.hrda)  # fmt: skip
    # MIC's block size in input pixels: 64 at HRDA's full resolution, 32 at half (unless set)
    mic = dataclasses.replace(cfg.method.mic, block_size=mic_block_size(cfg))
    method_cfg = dataclasses.replace(cfg.method, mic=mic)
    if cfg.method.name == "source_only":
        method = SourceOnly(student, method_cfg, **kwargs)
    elif cfg.method.name == "daformer":
        method = DAFormer(student, method_cfg, **kwargs)
    else:
        from dida.adapt.dida import DIDA

        method = DIDA(student, method_cfg, embed_dim=cfg.model.embed_dim, **kwargs)
        _init_bank(method, cfg)
    return method.to(device).train()


def _init_bank(method, cfg: ExperimentConfig) -> None:  # noqa: ANN001
    from dida.engine.bank_io import read_bank_file

    bank_cfg = cfg.method.bank
    for bank in method.banks:  # HRDA with separate banks: both start alike
        if bank_cfg.init == "file":
            feats, labels = read_bank_file(
                bank_cfg.init_path, size=bank.size, dim=bank.dim, num_classes=bank.num_classes
            )
            bank.load_(feats, labels)
            log.info("instance bank loaded from %s", bank_cfg.init_path)
        elif bank_cfg.init == "random":
            bank.init_random_(torch.Generator().manual_seed(cfg.train.seed))
