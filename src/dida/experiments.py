"""The shipped experiment configs (`src/dida/configs/*.yaml`, also reachable as `configs/`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from omegaconf import OmegaConf

from dida.config import ExperimentConfig, load_config
from dida.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class Experiment:
    path: Path
    config: ExperimentConfig

    @property
    def exp(self) -> str:
        return self.config.exp


def list_experiments() -> list[Experiment]:
    """Every shipped config, sorted by experiment id."""
    found = [Experiment(path, load_config(path)) for path in CONFIG_DIR.glob("*.yaml")]
    return sorted(found, key=lambda e: (len(e.exp), e.exp))


@cache
def _ids() -> dict[str, Path]:
    """Experiment id -> shipped config file, from each file's `exp` key alone (parsing a file
    takes milliseconds, building its config ~0.2 s: `find_experiment` builds only the match)."""
    default = ExperimentConfig().exp
    ids: dict[str, Path] = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        ids.setdefault(str(OmegaConf.load(path).get("exp", default)), path)
    return ids


def find_experiment(exp: str) -> Experiment:
    path = _ids().get(str(exp))
    if path is None:
        known = ", ".join(sorted(_ids(), key=lambda e: (len(e), e)))
        raise UserError(f"unknown experiment '{exp}' (known: {known}; see `dida experiments`)")
    return Experiment(path, load_config(path))
