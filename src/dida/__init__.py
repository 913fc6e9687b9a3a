"""dida: DIDA (dual-level interaction for domain-adaptive segmentation) on plain PyTorch."""

__version__ = "0.1.0"

from dida.config import ExperimentConfig, load_config  # noqa: E402

__all__ = ["ExperimentConfig", "load_config", "__version__"]
