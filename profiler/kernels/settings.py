"""The kernel profiler's settings: ``key=value`` arguments, checked, with one-line errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.records.errors import ConfigError
from simulator.records.hardware import Hardware
from simulator.records.model_arch import ModelArchitecture


def log_grid(low: int, high: int, per_octave: int = 1) -> list[int]:
    """Integers from low to high, ``per_octave`` points per doubling (powers of two among them)."""
    out, i = [], 0
    while True:
        value = round(low * 2 ** (i / per_octave))
        if value > high:
            return out
        if not out or value != out[-1]:
            out.append(value)
        i += 1


@dataclass(frozen=True)
class Grid:
    """What is measured: token counts, attention shapes, all-reduce sizes, repeats."""

    tokens: list[int]
    context_batch: list[int]
    context_len: list[int]
    #: (chunk length, tokens already cached) checks of chunked prefill, batch 1
    chunked: list[tuple[int, int]]
    decode_batch: list[int]
    decode_len: list[int]
    #: most tokens in one attention measurement (batch x length), bounding memory and time
    max_attention_tokens: int
    allreduce_elements: list[int]
    warmup: int
    repeats: int


GRIDS = {
    # one 7B model on one H100/H200: about 5 minutes
    "default": Grid(tokens=log_grid(1, 16384, 2), context_batch=[1, 2, 4, 8],
                    context_len=log_grid(128, 16384), chunked=[(512, 4096), (2048, 8192), (512, 16384)],
                    decode_batch=log_grid(1, 256), decode_len=log_grid(128, 32768),
                    max_attention_tokens=1 << 21, allreduce_elements=log_grid(1024, 1 << 25, 1),
                    warmup=3, repeats=10),
    # a first look in about a minute
    "quick": Grid(tokens=log_grid(1, 16384), context_batch=[1, 4], context_len=log_grid(256, 16384, 1)[::2],
                  chunked=[(2048, 8192)], decode_batch=[1, 8, 64, 256], decode_len=[512, 4096, 32768],
                  max_attention_tokens=1 << 21, allreduce_elements=log_grid(1024, 1 << 25)[::2],
                  warmup=2, repeats=5),
    # the CPU path of the tests: tiny shapes, seconds
    "tiny": Grid(tokens=[1, 4, 16], context_batch=[1, 2], context_len=[8, 16], chunked=[(8, 8)],
                 decode_batch=[1, 2], decode_len=[8, 32], max_attention_tokens=1 << 10,
                 allreduce_elements=[256, 1024], warmup=3, repeats=5),
}
DTYPES = ("auto", "bf16", "fp8")
DEVICES = ("cuda", "cpu")
#: the CPU path is for tests: tiny shapes only
CPU_MAX_HIDDEN = 1024


@dataclass(frozen=True)
class Settings:
    model: ModelArchitecture
    hardware: Hardware
    tp: int
    dtypes: tuple[str, ...]  # GEMM dtypes asked for ("auto": bf16, and fp8 where the card has it)
    device: str
    grid_name: str
    grid: Grid
    out: Path
    overrides: dict[str, Any] = field(default_factory=dict)


def _value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _load_record(kind: str, name: str, overrides: dict[str, Any]):
    """A conf/<kind> entry (or a YAML file) with ``kind.field=value`` overrides on top."""
    import yaml

    from calibration import catalog

    path = Path(name)
    if name.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise ConfigError(kind, f"a name in conf/{kind} or an existing YAML file, got {name!r}")
        data = yaml.safe_load(path.read_text()) or {}
    else:
        if name not in catalog.names(kind):
            raise ConfigError(kind, f"one of {', '.join(catalog.names(kind))} (or a YAML file), got {name!r}")
        data = yaml.safe_load((catalog.CONF_DIR / kind / f"{name}.yaml").read_text())
    data = {**data, **overrides}
    cls = Hardware if kind == "hardware" else ModelArchitecture
    try:
        return cls.from_dict(data)
    except TypeError as err:
        raise ConfigError(kind, f"a complete {kind} record: {err}") from None


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, f"a positive integer, got {value!r}")
    return value


def parse(argv: list[str]) -> Settings:
    """Settings from ``key=value`` arguments; ConfigError naming the field for anything wrong.

    Keys: ``model``, ``hardware`` (conf names or YAML files; ``model.<field>=`` and
    ``hardware.<field>=`` override single fields), ``tp`` (default 1), ``dtype``
    (auto, bf16, fp8), ``device`` (cuda, the default; cpu: the CPU path for tests,
    tiny shapes only), ``grid`` (default, quick, tiny), ``out`` (the table folder),
    ``repeats`` and ``warmup`` (override the grid's).
    """
    from calibration import catalog

    values: dict[str, Any] = {}
    record_overrides: dict[str, dict[str, Any]] = {"model": {}, "hardware": {}}
    allowed = ("model", "hardware", "tp", "dtype", "device", "grid", "out", "repeats", "warmup")
    for arg in argv:
        key, sep, text = arg.partition("=")
        if not sep or not key:
            raise ConfigError("arguments", f"key=value (e.g. model=r1-distill-qwen-7b hardware=h200), got {arg!r}")
        group, dot, sub = key.partition(".")
        if dot and group in record_overrides and sub:
            record_overrides[group][sub] = _value(text)
        elif key in allowed:
            values[key] = text
        else:
            raise ConfigError(key, f"one of {', '.join(allowed)} (or model.<field>, hardware.<field>), got {arg!r}")
    for required in ("model", "hardware"):
        if required not in values:
            raise ConfigError(required, "is required (e.g. model=r1-distill-qwen-7b hardware=h200)")
    device = values.get("device", "cuda")
    if device not in DEVICES:
        raise ConfigError("device", f"one of {', '.join(DEVICES)}, got {device!r}")
    grid_name = values.get("grid", "tiny" if device == "cpu" else "default")
    if grid_name not in GRIDS:
        raise ConfigError("grid", f"one of {', '.join(GRIDS)}, got {grid_name!r}")
    grid = GRIDS[grid_name]
    for key in ("repeats", "warmup"):
        if key in values:
            grid = Grid(**{**grid.__dict__, key: _positive_int(key, _value(values[key]))})
    model = _load_record("model", values["model"], record_overrides["model"])
    hardware = _load_record("hardware", values["hardware"], record_overrides["hardware"])
    if device == "cpu" and model.hidden_size > CPU_MAX_HIDDEN:
        raise ConfigError("model", f"with device=cpu (the test path), a tiny shape: hidden_size <= {CPU_MAX_HIDDEN}, "
                                   f"got {model.name} with {model.hidden_size}")
    if device == "cpu" and hardware.name in catalog.names("hardware"):
        raise ConfigError("hardware", f"with device=cpu, a record of this CPU under a name of its own "
                                      f"(hardware.name=...): CPU timings must not stand for {hardware.name!r}")
    tp = _positive_int("tp", _value(values.get("tp", "1")))
    if tp > hardware.max_gpus_per_node:
        raise ConfigError("tp", f"at most {hardware.max_gpus_per_node} GPUs of one {hardware.name} node, got {tp}")
    from simulator.records.model_arch import check_tp

    check_tp(model, tp)
    dtype = values.get("dtype", "auto")
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"one of {', '.join(DTYPES)}, got {dtype!r}")
    has_fp8 = hardware.fp8_tflops > 0 and device == "cuda"
    if dtype == "fp8" and not has_fp8:
        raise ConfigError("dtype", f"fp8 GEMMs need a card with fp8 tensor cores and device=cuda; "
                                   f"{hardware.name} on {device} has none, got {dtype!r}")
    dtypes = {"auto": ("bf16", "fp8") if has_fp8 else ("bf16",), "bf16": ("bf16",), "fp8": ("bf16", "fp8")}[dtype]
    out = Path(values.get("out") or Path("kernel-tables") / hardware.name / f"{model.name}-tp{tp}")
    return Settings(model, hardware, tp, dtypes, device, grid_name, grid, out, record_overrides)
