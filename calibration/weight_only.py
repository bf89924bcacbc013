"""GEMMs of a weight dtype the kernel tables did not measure, derived from the measured ones.

aiconfigurator's tables hold bf16 GEMMs for H100, H200 and A100, and fp8 GEMMs for H100
only. Two derivations, each labelled in the performance model's description:

- **Weight read bound** (int4 everywhere: GPTQ and AWQ, W4A16 with group size 128; fp8 on
  Ampere, which has no fp8 tensor cores): vLLM runs these with Marlin kernels, which read the
  low-bit weights, dequantize them in registers and multiply on the bf16 tensor cores. For an
  (m x k) by (k x n) GEMM::

      t(m) = max(t_bf16(m) - (w_bf16 - w) / B,  r * t_bf16(m))

  with ``t_bf16`` the measured bf16 kernel, ``w`` the weight bytes (int4: half a byte per
  weight plus the group scales and zero points, calibration.memory.GROUP_BYTES_PER_WEIGHT;
  fp8: one byte), ``B`` the memory bandwidth at aiconfigurator's empirical efficiency and
  ``r = w / w_bf16``. Small m (decode) is bound by the weight read and drops towards ``r``;
  large m (prefill) keeps the bf16 tensor-core work. Dequantization is taken as hidden under
  the weight read (Marlin's design point): a lower bound, not a measurement. The study's AWQ
  runs, which nearly doubled E2E in its setup (older, non-Marlin kernels), are not this.
- **Measured ratio from a sibling card** (fp8 on H200): the H200 is an H100 with more and
  faster memory on the same Hopper tensor cores, so an fp8 GEMM on H200 takes its measured
  bf16 time times the fp8 / bf16 ratio measured on H100 at the same (m, n, k).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from calibration.memory import GROUP_BYTES_PER_WEIGHT
from simulator.records.hardware import Hardware

#: aiconfigurator's ``mem_bw_empirical_scaling_factor`` (as calibration.composed.MEMORY_EFFICIENCY)
MEMORY_EFFICIENCY = 0.8
READ_BOUND = "GEMMs bounded from the measured bf16 GEMMs (weight bytes at bandwidth), not measured"
#: systems whose fp8 GEMMs are priced with a sibling's measured fp8 / bf16 ratio
SIBLING = {"h200_sxm": "h100_sxm"}


def weight_bytes_per_weight(dtype: str) -> float:
    """Bytes a Marlin-style weight-only kernel reads per weight (group scales included)."""
    return {"int4": 0.5, "fp8": 1.0}[dtype] + GROUP_BYTES_PER_WEIGHT.get(dtype, 0.0)


class DerivedGemms:
    """A KernelSource whose ``dtype`` GEMMs come from ``derive(m, n, k)``; all else is the wrapped one's."""

    def __init__(self, inner, dtype: str, derive: Callable, label: str):
        self.inner, self.dtype, self.derive, self.label = inner, dtype, derive, label

    def gemm_ms(self, m, n, k, dtype):
        return self.derive(m, n, k) if dtype == self.dtype else self.inner.gemm_ms(m, n, k, dtype)

    def __getattr__(self, name):  # attention, all-reduce, memory ops, tables: the wrapped source's
        return getattr(self.inner, name)

    def describe(self) -> str:
        return f"{self.inner.describe()}; {self.label}"


def read_bound(inner, hardware: Hardware, dtype: str) -> Callable:
    """``t(m)`` of the weight read bound (module docstring) over ``inner``'s bf16 GEMMs."""
    bandwidth = hardware.memory_bandwidth_gbps * 1e9 * MEMORY_EFFICIENCY
    per_weight = weight_bytes_per_weight(dtype)

    def derive(m, n, k):
        t16 = np.asarray(inner.gemm_ms(m, n, k, "bf16"), dtype=float)
        w16, w = n * k * 2.0, n * k * per_weight
        return np.maximum(t16 - 1e3 * (w16 - w) / bandwidth, t16 * (w / w16))

    return derive


def sibling_ratio(inner, sibling, dtype: str) -> Callable:
    """``t(m)``: ``inner``'s bf16 GEMM times the sibling tables' measured ``dtype`` / bf16 ratio."""
    def derive(m, n, k):
        t16 = np.asarray(inner.gemm_ms(m, n, k, "bf16"), dtype=float)
        ref16 = np.asarray(sibling.gemm_table("bf16").latency_ms(m, n, k), dtype=float)
        ref = np.asarray(sibling.gemm_table(dtype).latency_ms(m, n, k), dtype=float)
        return t16 * np.divide(ref, ref16, out=np.ones_like(ref), where=ref16 > 0)

    return derive


def derivation(tables, hardware: Hardware, dtype: str) -> str | None:
    """How ``dtype`` GEMMs missing from ``tables`` are derived (a label), or None when they cannot be."""
    if "bf16" not in tables.gemm or dtype in tables.gemm:
        return None
    if dtype == "int4" or (dtype == "fp8" and not hardware.fp8_tflops):
        return f"{dtype} {READ_BOUND}"
    if dtype == "fp8" and SIBLING.get(tables.system):
        return (f"fp8 GEMMs: the measured bf16 GEMMs times the fp8 / bf16 ratio measured on "
                f"{SIBLING[tables.system]} (same tensor cores), not measured here")
    return None


def derived_kernels(inner, tables, hardware: Hardware, dtype: str):
    """``inner`` with ``dtype`` GEMMs derived as ``derivation`` says (``inner`` when none is needed)."""
    label = derivation(tables, hardware, dtype)
    if label is None:
        return inner
    if dtype == "fp8" and hardware.fp8_tflops and SIBLING.get(tables.system):
        from calibration import kernel_tables

        sibling = kernel_tables.load_tables(SIBLING[tables.system])
        return DerivedGemms(inner, dtype, sibling_ratio(inner, sibling, dtype), label)
    return DerivedGemms(inner, dtype, read_bound(inner, hardware, dtype), label)
