"""Physical plausibility of kernel measurements: no kernel runs faster than its card's roofline.

A kernel moving ``B`` bytes and doing ``F`` floating-point operations takes at
least ``max(F / peak, B / bandwidth)`` on a card with that dense peak and memory
bandwidth (``conf/hardware``: ``bf16_tflops``, ``fp8_tflops``,
``memory_bandwidth_gbps``, ``interconnect_gbps``). A row measured faster than
that floor by more than ``MARGIN`` is a broken measurement (a kernel that did
not run, or a mislabelled shape) and is rejected; the tables then fill its
place from its neighbours (``calibration.kernel_tables``).

Floors, per kernel family (``d`` head dim, ``h`` query heads, ``kv`` KV heads,
``e`` bytes per element):

- GEMM ``m x k`` by ``k x n``: ``F = 2 m n k``; ``B = (m k + k n) e_in + m n e_out``;
- context (prefill) attention of ``b`` sequences, ``q`` new tokens over ``c``
  cached ones, causal: ``F = 4 b h d (q c + q^2 / 2)`` (for ``c = 0``:
  ``4 b h q^2 d / 2``, the causal half of QK^T and PV);
  ``B = b (q (2 h d e_act) + (q + c) 2 kv d e_kv)`` (Q in, O out, K and V read);
- generation (decode) attention of ``b`` sequences over ``L`` cached tokens:
  ``F = 4 b h L d``; ``B = b L 2 kv d e_kv`` (the KV read);
- all-reduce of ``E`` elements over ``g`` GPUs (ring): ``B = 2 (g - 1) / g E e``
  per GPU over the interconnect;
- element-wise kernels: the bytes they read and write at memory bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: a row is rejected when it is more than this fraction faster than its floor
MARGIN = 0.05
#: the kernel families the tables hold, in report order
FAMILIES = ("gemm", "context_attention", "generation_attention", "allreduce", "elementwise")


@dataclass(frozen=True)
class Roofline:
    """A card's dense peaks: FLOP/s by dtype, memory and interconnect bytes/s."""

    bf16_flops: float
    fp8_flops: float
    memory_bps: float
    link_bps: float
    card: str = ""

    @classmethod
    def of(cls, hardware) -> Roofline:
        """From a simulator.records.hardware.Hardware (conf/hardware): TFLOP/s and GB/s become /s."""
        bf16 = float(hardware.bf16_tflops) * 1e12
        fp8 = float(hardware.fp8_tflops or 0.0) * 1e12
        link = float(hardware.interconnect_gbps or 0.0) * 1e9
        return cls(bf16, fp8 if fp8 > 0 else bf16, float(hardware.memory_bandwidth_gbps) * 1e9,
                   link if link > 0 else float(hardware.memory_bandwidth_gbps) * 1e9, hardware.name)

    def flops_s(self, flops: np.ndarray, dtype: str) -> np.ndarray:
        peak = self.fp8_flops if dtype in ("fp8", "fp8_e4m3", "fp8_e5m2") else self.bf16_flops
        return np.asarray(flops, dtype=float) / peak

    def memory_s(self, nbytes: np.ndarray) -> np.ndarray:
        return np.asarray(nbytes, dtype=float) / self.memory_bps

    # --- floors (seconds) per kernel family ---------------------------------------
    def gemm_s(self, m, n, k, dtype: str) -> np.ndarray:
        """``max(2 m n k / peak, bytes / bandwidth)``; fp8 inputs are 1 byte, outputs bf16."""
        m, n, k = (np.asarray(a, dtype=float) for a in (m, n, k))
        e_in = 1.0 if dtype == "fp8" else 2.0
        nbytes = (m * k + k * n) * e_in + m * n * 2.0
        return np.maximum(self.flops_s(2 * m * n * k, dtype), self.memory_s(nbytes))

    def context_attention_s(self, batch, q, heads, kv_heads, head_dim, kv_bytes, prior=0) -> np.ndarray:
        """Causal attention of q new tokens over ``prior`` cached ones: ``4 b h d (q c + q^2/2)`` FLOPs."""
        b, q, c = (np.asarray(a, dtype=float) for a in (batch, q, prior))
        h, kv, d = (np.asarray(a, dtype=float) for a in (heads, kv_heads, head_dim))
        flops = 4 * b * h * d * (q * c + q * q / 2)
        nbytes = b * (q * 2 * h * d * 2.0 + (q + c) * 2 * kv * d * np.asarray(kv_bytes, dtype=float))
        return np.maximum(self.flops_s(flops, "bf16"), self.memory_s(nbytes))

    def generation_attention_s(self, batch, kv_len, heads, kv_heads, head_dim, kv_bytes) -> np.ndarray:
        """One query token per sequence over ``kv_len`` cached: ``4 b h L d`` FLOPs, the KV read in bytes."""
        b, n = np.asarray(batch, dtype=float), np.asarray(kv_len, dtype=float)
        h, kv, d = (np.asarray(a, dtype=float) for a in (heads, kv_heads, head_dim))
        flops = 4 * b * h * n * d
        nbytes = b * n * 2 * kv * d * np.asarray(kv_bytes, dtype=float)
        return np.maximum(self.flops_s(flops, "bf16"), self.memory_s(nbytes))

    def allreduce_s(self, elements, gpus, element_bytes: float = 2.0) -> np.ndarray:
        """Ring all-reduce: each GPU sends and receives ``2 (g - 1) / g`` of the message."""
        e, g = np.asarray(elements, dtype=float), np.asarray(gpus, dtype=float)
        return 2 * (g - 1) / g * e * element_bytes / self.link_bps

    def elementwise_s(self, nbytes) -> np.ndarray:
        return self.memory_s(nbytes)


def implausible(latency_ms: np.ndarray, floor_s: np.ndarray) -> np.ndarray:
    """True where a measured latency is more than ``MARGIN`` below its physical floor."""
    return np.asarray(latency_ms, dtype=float) * 1e-3 < (1 - MARGIN) * np.asarray(floor_s, dtype=float)


@dataclass
class Rejections:
    """Rows rejected per kernel family, out of the rows checked."""

    card: str = ""
    rejected: dict[str, int] | None = None
    checked: dict[str, int] | None = None

    def __post_init__(self) -> None:
        self.rejected = dict(self.rejected or {})
        self.checked = dict(self.checked or {})

    def add(self, family: str, bad: np.ndarray) -> None:
        bad = np.asarray(bad, dtype=bool)
        self.rejected[family] = self.rejected.get(family, 0) + int(bad.sum())
        self.checked[family] = self.checked.get(family, 0) + int(bad.size)

    @property
    def total(self) -> int:
        return sum(self.rejected.values())

    def to_dict(self) -> dict:
        return {"card": self.card, "margin": MARGIN, "rejected": dict(self.rejected), "checked": dict(self.checked)}

    @classmethod
    def from_dict(cls, data: dict) -> Rejections:
        return cls(str(data.get("card", "")), dict(data.get("rejected") or {}), dict(data.get("checked") or {}))

    def summary(self) -> str:
        """``rejected as faster than physics (h200): context_attention 812/20240`` or ``all rows plausible``."""
        parts = [f"{f} {self.rejected[f]}/{self.checked[f]}" for f in FAMILIES if self.rejected.get(f)]
        where = f" ({self.card})" if self.card else ""
        if not parts:
            return f"all {sum(self.checked.values())} rows physically plausible{where}"
        return f"rows rejected as faster than physics{where}: " + ", ".join(parts)
