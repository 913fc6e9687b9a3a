"""MiT encoders, the DAFormer head, the segmentor and weight loading."""

from dida.models.daformer_head import DAFormerHead
from dida.models.mit import MIT_VARIANTS, MiT, build_mit
from dida.models.segmentor import Segmentor, build_segmentor, segmentor_from_config
from dida.models.weights import LoadReport, load_pretrained

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
