"""What the profiler runs on: CPU model and cores, or GPU name and count, as a record.

The record's ``slug`` names the hardware: ``cpu-<vendor>-<cores>c`` on a CPU (e.g.
``cpu-amd-2c``), the GPU's name on a GPU (e.g. ``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3``,
with ``-x<N>`` for N GPUs). The machine fingerprint (model string, cores or GPUs, ISA flags,
vLLM and torch versions) identifies the machine a profile measured; its 8-hex ``machine_key``
completes the profile's hardware directory (``cpu-amd-2c-1a2b3c4d``).
"""

from __future__ import annotations

import hashlib
import json
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


#: what identifies the machine a profile measured (beyond the hardware record: the software)
MACHINE_FIELDS = ("kind", "name", "count", "arch", "isa", "devices", "vllm", "torch")


def machine_fingerprint(hardware: HardwareInfo, vllm: str | None, torch: str | None) -> dict[str, Any]:
    """The measured machine: CPU model string or GPU names, cores or GPUs, architecture, the ISA
    flags that change kernels (avx2/avx512/amx), and the engine's vLLM and torch versions."""
    details = hardware.details or {}
    return {"kind": hardware.kind, "name": hardware.name, "count": int(hardware.count),
            "arch": details.get("machine"), "isa": sorted(details.get("isa") or []),
            "devices": list(details.get("devices") or []), "vllm": vllm, "torch": torch}


def machine_key(fingerprint: dict[str, Any]) -> str:
    """8 hex digits naming a machine fingerprint (in profile directory names)."""
    data = {k: fingerprint.get(k) for k in MACHINE_FIELDS}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def fingerprint_of_meta(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The machine fingerprint a profile's metadata records (derived from its hardware and
    versions for profiles written before fingerprints were stored); None if it has neither."""
    stored = (meta.get("machine") or {}).get("fingerprint")
    if stored:
        return stored
    if "hardware" not in meta:
        return None
    hw = meta["hardware"]
    info = HardwareInfo(kind=hw.get("kind", "?"), name=hw.get("name", "?"), vendor=hw.get("vendor", ""),
                        count=int(hw.get("count", 0)), slug=hw.get("slug", ""),
                        memory_total_bytes=int(hw.get("memory_total_bytes", 0)), details=hw.get("details") or {})
    versions = meta.get("versions") or {}
    return machine_fingerprint(info, versions.get("vllm"), versions.get("torch"))


def describe_machine(fingerprint: dict[str, Any]) -> str:
    """One phrase: 'AMD EPYC, 2 cores, avx512, vllm 0.32.0, torch 2.13.0+cpu'."""
    unit = "cores" if fingerprint.get("kind") == "cpu" else "GPUs"
    isa = sorted({flag[:6] if flag.startswith("avx512") else flag[:3] if flag.startswith("amx") else flag
                  for flag in fingerprint.get("isa") or []})
    parts = [str(fingerprint.get("name")), f"{fingerprint.get('count')} {unit}", *isa,
             f"vllm {fingerprint.get('vllm')}", f"torch {fingerprint.get('torch')}"]
    return ", ".join(parts)


def machine_differences(theirs: dict[str, Any], ours: dict[str, Any]) -> str:
    """'name: 'Intel Xeon' there, 'AMD EPYC' here; torch: ...' for the fields that differ."""
    diffs = []
    for k in MACHINE_FIELDS:
        a, b = theirs.get(k), ours.get(k)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            only_here, only_there = sorted(set(b) - set(a)), sorted(set(a) - set(b))
            diffs.append(f"{k}: " + ", ".join(filter(None, [only_here and f"only here {' '.join(only_here)}",
                                                            only_there and f"only there {' '.join(only_there)}"])))
        else:
            diffs.append(f"{k}: {a!r} there, {b!r} here")
    return "; ".join(diffs) or "same fingerprint"
