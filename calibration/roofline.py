"""Roofline kernels: the uncalibrated fallback for hardware without measured tables.

Each kernel takes the longer of its compute time at a fraction of peak FLOPs and
its memory time at a fraction of peak bandwidth, plus a fixed launch latency.
The fractions are not guesses per GPU: they are read off the H100 tables, where
large bf16 GEMMs reach ~75% of the dense tensor-core peak, long causal
prefill attention ~60%, and memory-bound kernels 80% of the bandwidth plus
~3 us (aiconfigurator's own empirical constants). Applying them to another GPU
assumes its kernels are as mature as Hopper's, which is why every model built
here says ``calibrated=False``.
"""

from __future__ import annotations

import numpy as np

from calibration.layer_terms import MEMORY_EFFICIENCY, MEMORY_OP_LATENCY_S
from simulator.records.hardware import Hardware
from simulator.records.model_arch import dtype_bytes

GEMM_EFFICIENCY = 0.75
ATTENTION_EFFICIENCY = 0.60
INTERCONNECT_EFFICIENCY = 0.8
KERNEL_LATENCY_S = 3e-6
DECODE_ATTENTION_FLOOR_S = 8e-6
ALLREDUCE_LATENCY_S = 10e-6


class RooflineKernels:
    """KernelSource from a Hardware record's peak FLOPs, bandwidth and interconnect."""

    def __init__(self, hardware: Hardware):
        self.hw = hardware
        self.bandwidth = hardware.memory_bandwidth_gbps * 1e9 * MEMORY_EFFICIENCY

    def _peak_flops(self, dtype: str) -> float:
        if dtype in ("fp8", "fp8_e4m3", "fp8_e5m2") and self.hw.fp8_tflops > 0:
            return self.hw.fp8_tflops * 1e12
        return self.hw.bf16_tflops * 1e12

    def gemm_ms(self, m, n, k, dtype):
        m = np.asarray(m, dtype=float)
        flops = 2.0 * m * n * k
        nbytes = n * k * dtype_bytes(dtype) + (m * k + m * n) * 2
        t = np.maximum(flops / (self._peak_flops(dtype) * GEMM_EFFICIENCY), nbytes / self.bandwidth)
        return np.where(m > 0, 1e3 * (t + KERNEL_LATENCY_S), 0.0)

    def context_attention_ms(self, heads, kv_heads, head_dim, kv_dtype, batch, length):
        b = np.asarray(batch, dtype=float)
        s = np.asarray(length, dtype=float)
        flops = 2.0 * b * heads * head_dim * s * s  # QK^T and PV, causal half of 4 b h d s^2
        nbytes = b * s * head_dim * (2 * heads * 2 + 2 * kv_heads * dtype_bytes(kv_dtype))
        t = np.maximum(flops / (self.hw.bf16_tflops * 1e12 * ATTENTION_EFFICIENCY), nbytes / self.bandwidth)
        return 1e3 * (t + KERNEL_LATENCY_S)

    def generation_attention_ms(self, heads, kv_heads, head_dim, kv_dtype, batch, kv_len):
        b = np.asarray(batch, dtype=float)
        kv = np.asarray(kv_len, dtype=float)
        nbytes = b * kv * 2 * kv_heads * head_dim * dtype_bytes(kv_dtype)
        flops = 4.0 * b * heads * head_dim * kv
        t = np.maximum(flops / (self.hw.bf16_tflops * 1e12 * ATTENTION_EFFICIENCY), nbytes / self.bandwidth)
        return 1e3 * (t + DECODE_ATTENTION_FLOOR_S)

    def allreduce_ms(self, num_gpus, elements):
        e = np.asarray(elements, dtype=float)
        if num_gpus <= 1:
            return np.zeros_like(e)
        link = self.hw.interconnect_gbps * 1e9 * INTERCONNECT_EFFICIENCY
        if link <= 0:
            link = 16e9  # no interconnect given: PCIe 4.0 x16, one direction, derated
        t = ALLREDUCE_LATENCY_S + 2.0 * (num_gpus - 1) / num_gpus * e * 2 / link
        return np.where(e > 0, 1e3 * t, 0.0)

    def memory_op_ms(self, nbytes):
        return 1e3 * (MEMORY_OP_LATENCY_S + np.asarray(nbytes, dtype=float) / self.bandwidth)

    def describe(self) -> str:
        return (f"roofline from {self.hw.name} specs, UNCALIBRATED (efficiencies from the H100 tables: "
                f"GEMM {GEMM_EFFICIENCY}, attention {ATTENTION_EFFICIENCY}, memory {MEMORY_EFFICIENCY})")

