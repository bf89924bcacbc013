"""Memory readings: NVML when present, process RSS otherwise (no GPU needed)."""

from __future__ import annotations

import importlib.util
import mmap
import os
from types import SimpleNamespace

import pytest

from profiler.device_memory import peak_rss_bytes, process_rss_bytes, read_gpus


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is not None, reason="pynvml is installed here")
def test_without_nvml_there_are_no_gpu_readings():
    assert read_gpus() is None


class NoDriver:
    """pynvml as it behaves on a machine without an NVIDIA driver."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self):
        raise self.NVMLError("NVML Shared Library Not Found")


class TwoGpus:
    """pynvml's interface on a two-GPU machine."""

    def __init__(self):
        self.shut = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3" if handle == 0 else "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=80 * 2**30, used=(10 + handle) * 2**30, free=(70 - handle) * 2**30)


def test_nvml_without_driver_is_absence():
    assert read_gpus(NoDriver()) is None


def test_nvml_readings_per_gpu():
    nvml = TwoGpus()
    gpus = read_gpus(nvml)
    assert [g.index for g in gpus] == [0, 1]
    assert {g.name for g in gpus} == {"NVIDIA H100 80GB HBM3"}
    assert gpus[1].used_bytes == 11 * 2**30 and gpus[1].total_bytes == 80 * 2**30
    assert nvml.shut


def _anonymous_bytes() -> int:
    """Resident memory less its file-backed and shared pages, from one read of /proc/self/statm:
    what the process's own allocations hold (file pages, e.g. mapped libraries, come and go as
    the kernel reclaims page cache, on some machines at any moment)."""
    with open("/proc/self/statm") as handle:
        resident, shared = (int(x) for x in handle.read().split()[1:3])
    return (resident - shared) * os.sysconf("SC_PAGE_SIZE")


def test_rss_counts_an_allocation():
    before = _anonymous_bytes()
    # fresh pages from the kernel (mmap), not from an allocator that may hand back memory it
    # keeps resident (the test suite's process has torch's allocator loaded)
    block = mmap.mmap(-1, 64 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for offset in range(0, len(block), mmap.PAGESIZE):  # touch every page
        block[offset] = 1
    after = _anonymous_bytes()
    assert after - before >= 60 * 2**20
    rss = process_rss_bytes()
    assert rss >= after  # the resident total holds the allocation
    assert peak_rss_bytes() >= 0.98 * rss  # ru_maxrss counts a little differently from statm
    block.close()
