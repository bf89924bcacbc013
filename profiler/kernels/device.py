"""The device the kernels run on: detection, and what is recorded about it (NVML when present)."""

from __future__ import annotations

import platform
from typing import Any

from simulator.records.errors import ConfigError


def require_device(device: str) -> None:
    """Refuse, naming the option, when ``device=cuda`` is asked for and PyTorch sees no CUDA device."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"no CUDA device visible to torch {torch.__version__}; the kernel profiler "
                                    f"measures GPUs (device=cpu is the CPU path for tests, tiny shapes only)")


def nvml_readings() -> dict[str, Any]:
    """GPU 0's memory, clocks, power and driver through pynvml, or why not."""
    try:
        import pynvml
    except ImportError:
        return {"nvml": "pynvml not installed"}
    try:
        pynvml.nvmlInit()
    except Exception as err:  # noqa: BLE001 (NVML's own error types vary by version)
        return {"nvml": f"unavailable: {err}"}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        out = {"nvml": "ok", "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
               "name": _text(pynvml.nvmlDeviceGetName(handle)),
               "mem_total_mib": mem.total / 2**20, "mem_used_mib": mem.used / 2**20}
        for key, clock in (("sm_clock_mhz", pynvml.NVML_CLOCK_SM), ("mem_clock_mhz", pynvml.NVML_CLOCK_MEM)):
            out[key] = pynvml.nvmlDeviceGetClockInfo(handle, clock)
            out["max_" + key] = pynvml.nvmlDeviceGetMaxClockInfo(handle, clock)
        for key, fn, scale in (("power_w", "nvmlDeviceGetPowerUsage", 1e-3),
                               ("power_limit_w", "nvmlDeviceGetEnforcedPowerLimit", 1e-3),
                               ("temp_c", None, 1)):
            try:
                if fn is None:
                    out[key] = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
                else:
                    out[key] = getattr(pynvml, fn)(handle) * scale
            except Exception:  # noqa: BLE001 (not every board reports every reading)
                pass
        return out
    finally:
        pynvml.nvmlShutdown()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def describe(device: str) -> dict[str, Any]:
    """Name, versions and (GPU) capability, memory and NVML readings of the device."""
    import torch

    out: dict[str, Any] = {"kind": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        out.update(name=props.name, capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count, memory_total_bytes=total, memory_free_bytes=free,
                   count=torch.cuda.device_count(), nvml=nvml_readings())
    else:
        out.update(name=_cpu_name(), count=1, threads=torch.get_num_threads())
    return out


def _cpu_name() -> str:
    try:
        from profiler.hardware import parse_cpuinfo

        with open("/proc/cpuinfo") as f:
            return parse_cpuinfo(f.read())[1]
    except OSError:
        return platform.processor() or "CPU"


def versions() -> dict[str, str]:
    import torch

    out = {"torch": torch.__version__, "cuda": str(torch.version.cuda), "python": platform.python_version()}
    for name in ("vllm", "flashinfer", "pynvml"):
        try:
            from importlib import metadata

            out[name] = metadata.version({"pynvml": "nvidia-ml-py"}.get(name, name))
        except Exception:  # noqa: BLE001
            out[name] = "not installed"
    return out
