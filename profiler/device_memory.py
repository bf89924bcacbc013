"""Memory readings: NVML per GPU when there is one, the process's RSS otherwise.

NVML comes from the ``pynvml`` module (package ``nvidia-ml-py``), imported only
when asked for. On a machine without it, or without an NVIDIA driver,
``read_gpus`` returns None and the profiler records process memory instead.
"""

from __future__ import annotations

import contextlib
import os
import resource
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class GpuMemory:
    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load_nvml() -> ModuleType | None:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    return pynvml


def read_gpus(nvml: ModuleType | None = None) -> list[GpuMemory] | None:
    """Memory of every GPU NVML sees, or None without NVML, driver or GPUs."""
    nvml = nvml or _load_nvml()
    if nvml is None:
        return None
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no usable GPU
        return None
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(GpuMemory(index=index, name=name.decode() if isinstance(name, bytes) else str(name),
                                  total_bytes=int(info.total), used_bytes=int(info.used),
                                  free_bytes=int(info.free)))
        return gpus or None
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def driver_version(nvml: ModuleType | None = None) -> str:
    nvml = nvml or _load_nvml()
    if nvml is None:
        return ""
    try:
        nvml.nvmlInit()
        version = nvml.nvmlSystemGetDriverVersion()
        nvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return ""


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_rss_bytes() -> int:
    """Resident memory of this process now (from /proc, cheap enough to call every step)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
