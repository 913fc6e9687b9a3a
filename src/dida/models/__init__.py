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
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dida.models' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


if TYPE_CHECKING:  # the same names for type checkers and editors (`X as X`: re-exported)
    from dida.models.daformer_head import DAFormerHead as DAFormerHead
    from dida.models.mit import MiT as MiT
    from dida.models.mit import build_mit as build_mit
    from dida.models.segmentor import Segmentor as Segmentor
    from dida.models.segmentor import build_segmentor as build_segmentor
    from dida.models.segmentor import segmentor_from_config as segmentor_from_config
    from dida.models.variants import MIT_VARIANTS as MIT_VARIANTS
    from dida.models.weights import LoadReport as LoadReport
    from dida.models.weights import load_pretrained as load_pretrained
