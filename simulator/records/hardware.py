"""Hardware: one accelerator type's specs and price, from conf/hardware/."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from simulator.records.engine_config import check_field_types
from simulator.records.errors import ConfigError

GIB = 1024**3


@dataclass(frozen=True)
class Hardware:
    """Specs of one accelerator; sources name where each number came from."""

    name: str
    gpu: str
    memory_gib: float
    memory_bandwidth_gbps: float
    bf16_tflops: float
    fp8_tflops: float = 0.0
    interconnect_gbps: float = 0.0
    price_per_gpu_hour_usd: float = 0.0
    max_gpus_per_node: int = 8
    kernel_tables: str = ""
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_field_types(self, "hardware")
        for f in ("memory_gib", "memory_bandwidth_gbps", "bf16_tflops"):
            if not float(getattr(self, f)) > 0:
                raise ConfigError(f"hardware.{f}", "must be > 0")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hardware:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError("hardware", f"unknown fields {sorted(unknown)}; allowed: {sorted(known)}")
        if "kernel_tables" in data and data["kernel_tables"] is None:  # null: no tables, as ""
            data = {**data, "kernel_tables": ""}
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Hardware:
        import yaml

        path = Path(path)
        if not path.exists():
            raise ConfigError("hardware", f"no such hardware file {path}")
        return cls.from_dict(yaml.safe_load(path.read_text()))
