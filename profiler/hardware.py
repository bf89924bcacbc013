"""What the profiler runs on: CPU model and cores, or GPU name and count, as a record.

The record's ``slug`` names the hardware directory of the profile:
``cpu-<vendor>-<cores>c`` on a CPU (e.g. ``cpu-amd-2c``), the GPU's name on a GPU
(e.g. ``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3``, with ``-x<N>`` for N GPUs).
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CPU_VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd", "HygonGenuine": "hygon"}


@dataclass(frozen=True)
class HardwareInfo:
    kind: str  # "cpu" or "gpu"
    name: str
    vendor: str
    count: int
    slug: str
    memory_total_bytes: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_cpuinfo(text: str) -> tuple[str, str]:
    """(vendor, model name) from /proc/cpuinfo text; ARM boards give 'CPU implementer'."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    vendor_id = fields.get("vendor_id", "")
    vendor = CPU_VENDORS.get(vendor_id, vendor_id.lower() or platform.machine().lower() or "cpu")
    name = fields.get("model name") or fields.get("Model") or fields.get("Hardware") or platform.processor()
    return vendor, name or "unknown CPU"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_slug(vendor: str, cores: int) -> str:
    return f"cpu-{_slug(vendor) or 'generic'}-{cores}c"


def gpu_slug(name: str, count: int) -> str:
    """'NVIDIA H100 80GB HBM3', 2 -> 'h100-80gb-hbm3-x2'."""
    base = _slug(re.sub(r"^(nvidia|amd|tesla)\s+", "", name.strip(), flags=re.IGNORECASE))
    base = re.sub(r"^(nvidia|tesla)-", "", base) or "gpu"
    return base if count <= 1 else f"{base}-x{count}"


def machine_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def detect_cpu(cpus: list[int] | None = None, compute_cpus: list[int] | None = None) -> HardwareInfo:
    """The CPU: ``cpus`` are the cores the profiler may use (default: this process's
    affinity), ``compute_cpus`` those the engine's threads are bound to."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    vendor, name = parse_cpuinfo(text)
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    flags = re.search(r"^flags\s*:(.*)$", text, flags=re.MULTILINE)
    isa = sorted({f for f in (flags.group(1).split() if flags else []) if f.startswith(("avx512", "amx", "avx2"))})
    return HardwareInfo(
        kind="cpu", name=name, vendor=vendor, count=len(cpus), slug=cpu_slug(vendor, len(cpus)),
        memory_total_bytes=machine_memory_bytes(),
        details={"cpus": list(cpus), "compute_cpus": list(compute_cpus or cpus), "isa": isa,
                 "machine": platform.machine()},
    )


def detect_gpu(names: list[str], memory_total_bytes: int, driver: str = "") -> HardwareInfo:
    """A GPU record from device names (all GPUs the engine uses)."""
    name = names[0]
    return HardwareInfo(kind="gpu", name=name, vendor="nvidia" if "nvidia" in name.lower() else "gpu",
                        count=len(names), slug=gpu_slug(name, len(names)),
                        memory_total_bytes=memory_total_bytes,
                        details={"devices": names, "driver": driver})
