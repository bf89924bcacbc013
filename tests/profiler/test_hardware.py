"""Hardware detection and names (no GPU needed)."""

from __future__ import annotations

import os

from profiler.hardware import cpu_slug, detect_cpu, detect_gpu, gpu_slug, parse_cpuinfo

INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx2 avx512f amx_tile
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
CPU implementer\t: 0x41
"""


def test_cpuinfo_is_parsed():
    assert parse_cpuinfo(INTEL) == ("intel", "Intel(R) Xeon(R) Platinum 8480+")
    vendor, name = parse_cpuinfo(ARM)
    assert vendor and name


def test_this_machine():
    info = detect_cpu()
    assert info.kind == "cpu"
    assert info.count == len(os.sched_getaffinity(0))
    assert info.slug == cpu_slug(info.vendor, info.count)
    assert info.memory_total_bytes > 0
    with open("/proc/cpuinfo") as handle:
        assert info.name in handle.read()


def test_binding_is_recorded_but_the_machine_counts_all_cores():
    info = detect_cpu(cpus=[0, 1, 2, 3], compute_cpus=[0, 1, 2])
    assert info.count == 4 and info.slug.endswith("-4c")
    assert info.details["compute_cpus"] == [0, 1, 2]


def test_gpu_names():
    assert gpu_slug("NVIDIA H100 80GB HBM3", 1) == "h100-80gb-hbm3"
    assert gpu_slug("NVIDIA H200", 2) == "h200-x2"
    assert gpu_slug("NVIDIA RTX PRO 6000 Blackwell Server Edition", 1) == "rtx-pro-6000-blackwell-server-edition"
    gpu = detect_gpu(["NVIDIA A100-SXM4-80GB"] * 4, 85_000_000_000, "550.54")
    assert (gpu.kind, gpu.count, gpu.slug) == ("gpu", 4, "a100-sxm4-80gb-x4")
    assert gpu.details["driver"] == "550.54"
