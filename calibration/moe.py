"""The fused mixture-of-experts layer as vLLM runs it: cost from the experts a batch touches.

vLLM's FusedMoE routes each of a step's ``n`` tokens to ``k`` of ``E`` experts and
runs all (token, expert) pairs in two grouped GEMMs (gate/up, then down). Each
expert any token chose has its weights read once; the FLOPs follow the ``n k``
pairs. With routing spread evenly, the expected number of distinct experts is
``E (1 - (1 - k/E)^n)``: ``k`` for one token, ``E`` for many.

The layer's time is ``fixed + weight bytes / (bandwidth x BW_EFF) + FLOPs / (peak x FLOP_EFF)``,
the three constants fitted (non-negative least squares on relative error; the
bandwidth share capped at the copy ceiling, so no step beats physics) to
LLMServingSim's measured fused-MoE layer on an H100 (vLLM 0.19, Qwen3.6-35B-A3B:
256 experts of 2048 x 512, 8 per token, 1-1024 tokens x 8-256 activated experts;
``calibration/data/llmservingsim/perf/H100/.../moe.csv``). The fit reproduces the
51 rows within 33% (most within 10%). Other cards scale by their bandwidth and
peak (the same kernels' efficiency assumed); other expert shapes by their bytes
and FLOPs. The fixed part (router top-k, token alignment, launches: measured in
eager mode) is a per-layer constant.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

PROFILE = (Path(__file__).parent / "data" / "llmservingsim" / "perf" / "H100" / "Qwen" / "Qwen3.6-35B-A3B"
           / "bf16" / "tp1" / "moe.csv")
#: the profiled model's MoE shape (Qwen/Qwen3.6-35B-A3B config.json) and card (conf/hardware/h100.yaml)
PROFILE_HIDDEN, PROFILE_INTER, PROFILE_TOPK = 2048, 512, 8
PROFILE_BANDWIDTH, PROFILE_PEAK = 3350e9, 989e12
#: no kernel streams faster than the card's copy ceiling (calibration.composed.COPY_CEILING_FRACTION)
BW_CEILING = 4242 / 4800


def expected_experts(n, k: int, num_experts: int) -> np.ndarray:
    """Expected distinct experts ``n`` tokens touch when each picks ``k`` of ``num_experts`` at random."""
    n = np.asarray(n, dtype=float)
    return num_experts * (1.0 - (1.0 - k / num_experts) ** n)


@dataclass(frozen=True)
class MoEFit:
    """Fused-MoE layer time = fixed_s + bytes / (bandwidth x bw_eff) + flops / (peak x flop_eff)."""

    fixed_s: float
    bw_eff: float
    flop_eff: float
    source: str
    max_rel_error: float

    def seconds(self, weight_bytes, flops, bandwidth: float, peak: float) -> np.ndarray:
        return (self.fixed_s + np.asarray(weight_bytes, dtype=float) / (bandwidth * self.bw_eff)
                + np.asarray(flops, dtype=float) / (peak * self.flop_eff))

    def describe(self) -> str:
        return (f"fused MoE fitted to {self.source}: {self.fixed_s * 1e6:.0f} us + weights at "
                f"{self.bw_eff:.2f} x bandwidth + FLOPs at {self.flop_eff:.2f} x peak "
                f"(max error {self.max_rel_error:.0%})")


@lru_cache(maxsize=1)
def measured_fit(path: str = str(PROFILE)) -> MoEFit:
    """Fit MoEFit to the H100 fused-MoE profile (tokens, activated experts, time_us)."""
    from scipy.optimize import nnls

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    n = np.array([float(r["tokens"]) for r in rows])
    active = np.array([float(r["activated_experts"]) for r in rows])
    t = np.array([float(r["time_us"]) for r in rows]) * 1e-6
    expert_bytes = 3 * PROFILE_HIDDEN * PROFILE_INTER * 2
    flops = 2 * n * PROFILE_TOPK * 3 * PROFILE_HIDDEN * PROFILE_INTER
    x = np.c_[np.ones_like(n), active * expert_bytes / PROFILE_BANDWIDTH, flops / PROFILE_PEAK]
    coef, _ = nnls(x / t[:, None], np.ones_like(t))
    if coef[1] < 1 / BW_CEILING:  # faster than the card can stream: pin the bytes at the ceiling
        rest = t - x[:, 1] / BW_CEILING
        sub, _ = nnls(x[:, [0, 2]] / t[:, None], rest / t)
        coef = np.array([sub[0], 1 / BW_CEILING, sub[1]])
    fixed, inv_bw, inv_flop = (float(c) for c in coef)
    pred = x @ coef
    return MoEFit(fixed, 1 / inv_bw, 1 / inv_flop if inv_flop > 0 else np.inf,
                  "LLMServingSim H100 Qwen3.6-35B-A3B moe.csv", float(np.abs(pred / t - 1).max()))


def moe_layer_seconds(m, *, hidden: int, inter: int, num_experts: int, top_k: int, expert_bytes: float,
                      tp: int, bandwidth: float, peak: float, fit: MoEFit | None = None) -> np.ndarray:
    """Routed experts of one MoE layer for steps of ``m`` tokens, per GPU under tp (0 for m = 0).

    Tensor and expert parallelism read the same bytes per GPU on average (1/tp of each
    touched expert, or the touched experts among 1/tp of them) and do 1/tp of the FLOPs.
    """
    fit = fit or measured_fit()
    m = np.asarray(m, dtype=float)
    touched = expected_experts(m, top_k, num_experts)
    nbytes = touched * 3 * hidden * inter * expert_bytes / tp
    flops = 2 * m * top_k * 3 * hidden * inter / tp
    return np.where(m > 0, fit.seconds(nbytes, flops, bandwidth, peak), 0.0)


def busiest_rank_experts(n, k: int, num_experts: int, ranks: int) -> np.ndarray:
    """Expected distinct experts on the busiest of ``ranks`` GPUs holding ``num_experts / ranks`` each.

    Each local expert is touched with probability ``p = 1 - (1 - k/E)^n``; taking the ranks'
    counts as independent binomials, ``E[max] = sum_x (1 - F(x)^ranks)``. Under expert
    parallelism the layer waits for that rank (vLLM's EP has no load balancer by default).
    """
    from scipy.stats import binom

    n = np.atleast_1d(np.asarray(n, dtype=float))
    local = num_experts // ranks
    p = 1.0 - (1.0 - k / num_experts) ** n
    x = np.arange(local)
    cdf = binom.cdf(x[None, :], local, p[:, None])
    return (1.0 - cdf ** ranks).sum(axis=1)


def moe_ep_layer_seconds(m, *, hidden: int, inter: int, num_experts: int, top_k: int, expert_bytes: float,
                         ranks: int, bandwidth: float, peak: float, fit: MoEFit | None = None) -> np.ndarray:
    """Routed experts of one MoE layer under expert parallelism over ``ranks`` GPUs, ``m`` tokens in all.

    The busiest rank reads its touched experts whole (``busiest_rank_experts``) and does an
    even share of the ``m k`` token-expert pairs' FLOPs.
    """
    fit = fit or measured_fit()
    m = np.asarray(m, dtype=float)
    nbytes = busiest_rank_experts(m, top_k, num_experts, ranks).reshape(m.shape) * 3 * hidden * inter * expert_bytes
    flops = 2 * m * top_k * 3 * hidden * inter / ranks
    return np.where(m > 0, fit.seconds(nbytes, flops, bandwidth, peak), 0.0)


class MeetingExperts:
    """All MoE layers' seconds by the tokens of every data-parallel rank meeting there: a table
    indexed by tokens, growing beyond its end at the slope of its last 1,024 tokens
    (``PerformanceModel.experts_time`` of the composed and layer-profile models)."""

    def __init__(self, seconds: np.ndarray):
        self.seconds = np.maximum.accumulate(np.asarray(seconds, dtype=float)).tolist()
        self.slope = (self.seconds[-1] - self.seconds[-1025]) / 1024

    def __call__(self, tokens: int) -> float:
        table = self.seconds
        if tokens <= 0:
            return 0.0
        if tokens < len(table):
            return table[tokens]
        return table[-1] + (tokens - len(table) + 1) * self.slope
