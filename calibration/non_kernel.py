"""The work between the GEMMs and attention (norms, rotary, activation, KV write), checked against data.

The composed model charges each memory-bound kernel of a layer, per step,
``MEMORY_OP_LATENCY_S + bytes / (MEMORY_EFFICIENCY x bandwidth)`` for the bytes
``composed.layer_memory_ops`` says it reads and writes per token. Two
measurements bound that charge, one from each side:

- from below, vLLM 0.19's own fused kernels as LLMServingSim timed them on a
  real GPU (``dense.csv``: ``act_fn`` = SiLU(gate) x up, ``layernorm`` = fused
  residual add + RMSNorm, twice a layer, ``rotary_emb``), by token count. They
  are fitted as ``t = latency + bytes / (efficiency x bandwidth)``: the latency
  is the intercept of a straight line through the rows of at most 64 tokens,
  the efficiency is read off the row moving the most bytes. The model must not charge less than they took.
- from above, a real H200's whole steps (``../shared/data/gpu-measurements/
  h200-r1-distill-qwen-7b``): the whole step minus its GEMMs and its attention.
  That decoder is plain PyTorch, whose element-wise work is unfused (an RMSNorm
  is several kernels and fp32 passes), so it is an upper bound on vLLM's and the
  model must stay below it. It is a check, not a table to fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration.layer_terms import (
    ACT_BYTES,
    MEMORY_EFFICIENCY,
    MEMORY_OP_LATENCY_S,
    LayerShapes,
    layer_memory_ops,
)
from calibration.llmservingsim import ProfileKey
from simulator.records.hardware import Hardware
from simulator.records.model_arch import ModelArchitecture

#: model families whose layers also normalise q and k per head (vLLM's Qwen3 code: ``q_norm``, ``k_norm``)
QK_NORM_FAMILIES = ("qwen3", "qwen3_moe")
#: The TP per-step term (host-side broadcast of each step to the TP workers, beyond the all-reduces the
#: tables price): none is added. No shipped data set supports a number: LLMServingSim's TP-2 profiles
#: time one shard on one GPU, BLIS's beta0 does not grow with TP (its fits range 0.04-27 ms with no
#: trend), and the one shipped real TP-2 run is a validation target (``calibration accuracy``).
TP_STEP_S = 0.0
#: rows up to this many tokens fix the latency (a straight line in bytes; beyond, caches bend it)
SMALL_TOKENS = 64
#: LLMServingSim's element-wise ops -> (the model's kernel, times per layer)
PROFILE_OPS = {"act_fn": ("silu_mul", 1), "layernorm": ("add_rmsnorm_attn", 2), "rotary_emb": ("rotary", 1)}


@dataclass(frozen=True)
class ElementwiseFit:
    """vLLM's element-wise kernels on one card: fixed latency and the bandwidth fraction they stream at."""

    latency_s: float
    efficiency: float
    profile: str


def profile_layer_us(key: ProfileKey, arch: ModelArchitecture) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, measured us, bytes) of one layer's element-wise ops, summed, at each profiled token count."""
    import pandas as pd  # (here: a simulation imports this module and must not load pandas)

    dense = pd.read_csv(Path(key.path) / "dense.csv")
    per_token = layer_memory_ops(LayerShapes.of(arch, key.tp), "bf16", "bf16")
    parts = []
    for op, (kernel, count) in PROFILE_OPS.items():
        rows = dense[dense["layer"] == op].set_index("tokens")["time_us"]
        parts.append((count * rows, count * per_token[kernel] * rows.index.to_numpy()))
    tokens = np.array(sorted(set.intersection(*(set(t.index) for t, _ in parts))), dtype=float)
    us = sum(t.loc[tokens].to_numpy() for t, _ in parts)
    nbytes = sum(b[np.searchsorted(t.index.to_numpy(), tokens)] for t, b in parts)
    return tokens, us, nbytes


def fit_elementwise(key: ProfileKey, arch: ModelArchitecture, hardware: Hardware) -> ElementwiseFit:
    """``t = latency + bytes / (efficiency x bandwidth)`` of vLLM's element-wise kernels in one profile.

    ``key``: a ProfileKey, or anything with ``path`` (a folder holding ``dense.csv``), ``tp`` and ``describe()``.
    """
    import pandas as pd

    dense = pd.read_csv(Path(key.path) / "dense.csv")
    per_token = layer_memory_ops(LayerShapes.of(arch, key.tp), "bf16", "bf16")
    ops = dense[dense["layer"].isin(PROFILE_OPS)]
    nbytes = np.array([per_token[PROFILE_OPS[o][0]] * t for o, t in zip(ops["layer"], ops["tokens"], strict=True)])
    small = ops["tokens"].to_numpy() <= SMALL_TOKENS
    design = np.stack([np.ones(int(small.sum())), nbytes[small]], axis=1)
    latency_us = float(np.linalg.lstsq(design, ops["time_us"].to_numpy()[small], rcond=None)[0][0])
    big = int(np.argmax(nbytes))
    stream_us = float(ops["time_us"].to_numpy()[big]) - latency_us
    efficiency = nbytes[big] / (hardware.memory_bandwidth_gbps * 1e3 * stream_us)
    return ElementwiseFit(latency_us * 1e-6, float(efficiency), key.describe())


def model_layer_us(nbytes: np.ndarray, kernels: int, hardware: Hardware) -> np.ndarray:
    """What the composed model charges ``kernels`` memory-bound kernels moving ``nbytes`` in all."""
    bandwidth = hardware.memory_bandwidth_gbps * 1e9 * MEMORY_EFFICIENCY
    return 1e6 * (kernels * MEMORY_OP_LATENCY_S + np.asarray(nbytes, dtype=float) / bandwidth)


def layer_kernels() -> int:
    """Element-wise kernels a layer runs among those the profile times."""
    return sum(count for _, count in PROFILE_OPS.values())


def non_kernel_ms(row: dict, kind: str) -> float:
    """A step's time outside its GEMMs and attention (``kind``: measured or predicted), from a comparison row."""
    return row[f"{kind}_ms"] - row[f"{kind}_gemm_ms"] - row[f"{kind}_attention_ms"]


def family_layer_ops(arch: ModelArchitecture, sh: LayerShapes) -> dict[str, int]:
    """Bytes read and written per token by the element-wise kernels a family adds to every layer.

    Qwen3 normalises q and k per head before rotary (one fused kernel in vLLM 0.19: LLMServingSim
    times it as ``qk_norm``, 42.5 us a layer at 2,048 tokens for Qwen3-32B on an RTX PRO 6000).
    The composed model prices these as its other memory-bound kernels (3 us plus bytes at 80% of
    the bandwidth), which is at or above what vLLM's kernel took at every profiled token count
    (``tests/calibration/test_non_kernel.py``).
    """
    if arch.family in QK_NORM_FAMILIES:
        return {"qk_norm": 2 * (sh.heads + sh.kv_heads) * sh.head_dim * ACT_BYTES}
    return {}


def non_kernel_layer_ms(kernels, arch: ModelArchitecture, sh: LayerShapes, m: np.ndarray) -> np.ndarray:
    """One layer's family-specific element-wise kernels for steps of ``m`` tokens, in ms (0 for none)."""
    total = np.zeros(np.shape(m))
    for nbytes in family_layer_ops(arch, sh).values():
        total = total + np.where(np.asarray(m) > 0, kernels.memory_op_ms(np.asarray(m) * nbytes), 0.0)
    return total
