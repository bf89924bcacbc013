"""ProfilerSettings: the validated profiler configuration (from conf/profiler.yaml + overrides)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from profiler.field_types import check_fields, check_known
from profiler.grid import EXTRA_PHASES, GridSpec
from simulator.records.errors import ConfigError, require

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
OPTIMIZATION_DIR = CONF_DIR / "profiler" / "optimization"
GRID_DIR = CONF_DIR / "profiler" / "grid"
PROFILES_DIR = REPO_ROOT / "calibration" / "profiles"
TINY_MODEL = "tiny-llama"


def available(folder: Path) -> list[str]:
    """Names of the YAML files in a config group folder."""
    return sorted(p.stem for p in folder.glob("*.yaml"))


def check_choice(field_name: str, value: str, folder: Path) -> None:
    """One-line ConfigError when value is not one of the group's files."""
    names = available(folder)
    if value not in names:
        raise ConfigError(field_name, f"unknown {value!r}; allowed: {', '.join(names)}")



@dataclass(frozen=True)
class ServingSettings:
    """``serving.enabled``, ``serving.repeats`` (probe rounds per server), ``serving.servers``,
    ``serving.load_requests`` (requests of the served load after each server's probes; 0: none),
    ``serving.pin_frontend`` (the servers' processes but vLLM's worker, and the client, kept to the
    CPUs the worker leaves: ``profiler.live.server.ServerSpec``)."""

    enabled: bool = True
    repeats: int = 3
    servers: int = 3
    load_requests: int = 64
    pin_frontend: bool = False

    def __post_init__(self) -> None:
        require(isinstance(self.enabled, bool), "serving.enabled", f"must be true or false, got {self.enabled!r}")
        require(isinstance(self.repeats, int) and not isinstance(self.repeats, bool) and self.repeats >= 1,
                "serving.repeats", f"must be an integer >= 1, got {self.repeats!r}")
        require(isinstance(self.servers, int) and not isinstance(self.servers, bool) and self.servers >= 1,
                "serving.servers", f"must be an integer >= 1, got {self.servers!r}")
        require(isinstance(self.load_requests, int) and not isinstance(self.load_requests, bool)
                and self.load_requests >= 0,
                "serving.load_requests", f"must be an integer >= 0, got {self.load_requests!r}")
        require(isinstance(self.pin_frontend, bool), "serving.pin_frontend",
                f"must be true or false, got {self.pin_frontend!r}")


@dataclass(frozen=True)
class OptimizationSpec:
    """An optimization as the profiler applies it: vLLM engine arguments plus extra phases."""

    name: str
    engine_args: dict[str, Any] = field(default_factory=dict)
    phases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_fields(self, "optimization.")
        bad = [p for p in self.phases if p not in EXTRA_PHASES]
        require(not bad, "optimization.phases", f"unknown {bad}; allowed: {list(EXTRA_PHASES)}")
        spec = self.engine_args.get("speculative_config")
        if isinstance(spec, dict) and "model" in spec and not spec["model"]:
            raise ConfigError("optimization.engine_args.speculative_config.model",
                              f"{self.name} needs a draft model: set it to a local model folder")


@dataclass(frozen=True)
class EngineSettings:
    """vLLM engine settings the profiler controls (null: the platform's default)."""

    block_size: int | None = None
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 128
    enforce_eager: bool = True
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    kv_cache_space_gib: float | None = 2
    num_gpu_blocks_override: int | None = None
    cpu_threads: str | int = "auto"
    extra_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self, "engine.")
        require(self.block_size is None or self.block_size >= 1, "engine.block_size", "must be >= 1 or null")
        require(self.max_num_seqs >= 1, "engine.max_num_seqs", "must be >= 1")
        require(self.tensor_parallel_size >= 1, "engine.tensor_parallel_size", "must be >= 1")
        require(0 < self.gpu_memory_utilization <= 1, "engine.gpu_memory_utilization", "must lie in (0, 1]")
        require(self.kv_cache_space_gib is None or self.kv_cache_space_gib > 0,
                "engine.kv_cache_space_gib", "must be > 0 or null")


@dataclass(frozen=True)
class ProfilerSettings:
    model: str
    optimization: OptimizationSpec
    grid: GridSpec
    engine: EngineSettings
    model_name: str | None = None
    #: the tiny model's shape (model.layers=6 ...; profiler.tiny_model.SHAPE_KEYS), {} for the default
    model_shape: dict[str, Any] = field(default_factory=dict)
    #: the serving phase (profiler.serving): probes on `vllm serve` after the grid
    serving: ServingSettings = field(default_factory=ServingSettings)
    hardware_name: str | None = None
    output_dir: str | None = None
    resume: bool = True
    seed: int = 0
    progress: bool = True
    verbose: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if self.model_shape:
            require(self.model == TINY_MODEL, f"model.{next(iter(self.model_shape))}",
                    f"shape settings apply to {TINY_MODEL} only, got model {self.model!r}")
            from profiler.tiny_model import check_shape

            check_shape(self.model_shape)

    @property
    def resolved_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.model == TINY_MODEL:
            from profiler.tiny_model import tiny_model_name

            return tiny_model_name(self.model_shape)
        return Path(self.model.rstrip("/")).name.lower()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:
        pass
    return value


def settings_from_config(cfg: Any) -> ProfilerSettings:
    """Validate the composed Hydra config into ProfilerSettings."""
    data = _plain(cfg)
    top_known = {"model", "model_name", "hardware_name", "output_dir", "resume", "seed", "progress",
                 "verbose", "optimization", "grid", "engine", "serving"}
    check_known(set(data), top_known)
    for key in ("optimization", "grid", "engine", "serving"):
        require(isinstance(data.get(key) or {}, dict), key, f"must be a mapping of settings, got {data.get(key)!r}")
    opt = dict(data.get("optimization") or {})
    grid = dict(data.get("grid") or {})
    engine = dict(data.get("engine") or {})
    serving = dict(data.get("serving") or {})
    check_known(serving, ServingSettings.__dataclass_fields__, "serving.")
    check_known(engine, EngineSettings.__dataclass_fields__, "engine.",
                "other vLLM arguments go in engine.extra_args")
    check_known(opt, OptimizationSpec.__dataclass_fields__, "optimization.")
    model = data.get("model")
    shape = {}
    if isinstance(model, dict):
        shape = {k: v for k, v in model.items() if k != "name"}
        model = model.get("name")
    require(bool(model), "model", f"must name tiny-llama, a model folder or a cached hub model, got {model!r}")
    return ProfilerSettings(
        model=str(model),
        model_shape=shape,
        model_name=data.get("model_name"),
        hardware_name=data.get("hardware_name"),
        output_dir=data.get("output_dir"),
        resume=data.get("resume", True),
        seed=data.get("seed", 0),
        progress=data.get("progress", True),
        verbose=data.get("verbose", False),
        optimization=OptimizationSpec(
            name=str(opt.get("name", "none")),
            engine_args=opt.get("engine_args") or {},
            phases=tuple(opt.get("phases") or ()),
        ),
        grid=GridSpec.from_dict(grid),
        engine=EngineSettings(**{k: v for k, v in engine.items()}),
        serving=ServingSettings(**serving),
    )
