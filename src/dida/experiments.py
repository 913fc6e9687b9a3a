"""The shipped experiment configs (`src/dida/configs/*.yaml`, also reachable as `configs/`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


def find_experiment(exp: str) -> Experiment:
    experiments = list_experiments()
    matches = [e for e in experiments if e.exp == str(exp)]
    if not matches:
        known = ", ".join(e.exp for e in experiments)
        raise UserError(f"unknown experiment '{exp}' (known: {known}; see `dida experiments`)")
    return matches[0]
