"""MiT encoders, the DAFormer head, the segmentor and weight loading.

The names below are imported on first use, so that `dida.models.variants` (plain data, read when
a config is validated) does not import torch: commands that only read configs, and the parent
process of `dida quickstart`, start ~1.4 s sooner.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "MIT_VARIANTS": "dida.models.variants",
    "DAFormerHead": "dida.models.daformer_head",
    "LoadReport": "dida.models.weights",
    "MiT": "dida.models.mit",
    "Segmentor": "dida.models.segmentor",
    "build_mit": "dida.models.mit",
    "build_segmentor": "dida.models.segmentor",
    "load_pretrained": "dida.models.weights",
    "segmentor_from_config": "dida.models.segmentor",
}
__all__ = [
    "MIT_VARIANTS",
    "DAFormerHead",
    "LoadReport",
    "MiT",
    "Segmentor",
    "build_mit",
    "build_segmentor",
    "load_pretrained",
    "segmentor_from_config",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dida.models' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


if TYPE_CHECKING:
    from dida.models.daformer_head import DAFormerHead
    from dida.models.mit import MiT, build_mit
    from dida.models.segmentor import Segmentor, build_segmentor, segmentor_from_config
    from dida.models.variants import MIT_VARIANTS
    from dida.models.weights import LoadReport, load_pretrained
