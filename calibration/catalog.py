"""The shipped configurations in conf/, loadable by name without Hydra.

The planner, the tests and ``python -m calibration list`` use these; the
simulator gets the same files through Hydra's config groups.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from simulator.records.errors import ConfigError
from simulator.records.hardware import Hardware
from simulator.records.model_arch import ModelArchitecture

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


def names(group: str) -> list[str]:
    """Choices of one config group (file stems in conf/<group>/)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _path(group: str, name: str) -> Path:
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(group, f"unknown {group} {name!r}; allowed: {', '.join(names(group))}")
    return path


@lru_cache(maxsize=64)
def load_hardware(name: str) -> Hardware:
    """conf/hardware/<name>.yaml as a Hardware record."""
    return Hardware.from_yaml(_path("hardware", name))


@lru_cache(maxsize=128)
def load_model(name: str) -> ModelArchitecture:
    """conf/model/<name>.yaml as a ModelArchitecture record."""
    return ModelArchitecture.from_yaml(_path("model", name))


def load_optimization(name: str) -> dict[str, Any]:
    """conf/optimization/<name>.yaml as a plain mapping (a fresh copy)."""
    import copy

    return copy.deepcopy(_load_optimization(name))


@lru_cache(maxsize=64)
def _load_optimization(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load(_path("optimization", name).read_text()) or {})


#: a release of a model with its base's shapes (Qwen3's -Instruct-2507 / -Thinking-2507, Llama's
#: -Instruct): the name with this suffix removed is the base model's ``hf_name``
RELEASE_SUFFIX = re.compile(r"-(instruct|thinking)(-\d{4})?$", re.IGNORECASE)


def base_model_name(hf_name: str) -> str:
    """The base model of a release (``RELEASE_SUFFIX`` removed), lower case."""
    return RELEASE_SUFFIX.sub("", hf_name).lower()
