"""The shipped experiment configs (`src/dida/configs/*.yaml`, also reachable as `configs/`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dida.config import ExperimentConfig, load_config
from dida.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class Experiment:
    exp: str
    path: Path
    config: ExperimentConfig


def list_experiments() -> list[Experiment]:
    """Every shipped config, sorted by experiment id."""
    found = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cfg = load_config(path)
        found.append(Experiment(exp=cfg.exp, path=path, config=cfg))
    return sorted(found, key=lambda e: (len(e.exp), e.exp))


def find_experiment(exp: str) -> Experiment:
    matches = [e for e in list_experiments() if e.exp == str(exp)]
    if not matches:
        known = ", ".join(e.exp for e in list_experiments())
        raise UserError(f"unknown experiment '{exp}' (known: {known}; see `dida experiments`)")
    return matches[0]
