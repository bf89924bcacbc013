"""Hypothesis strategies for simulator property tests: small engines and small workloads.

A drawn ``Case`` holds an EngineConfig, a Workload, the test performance model's
KV setting and the run's options; sizes stay small so that one simulation takes
a fraction of a second on the step-by-step path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from simulator.records.engine_config import EngineConfig, SpeculativeConfig
from simulator.records.model_arch import dtype_bytes
from simulator.records.workload import Workload
from simulator.workload.arrivals import gamma_arrivals
from tests.simulator.conftest import VectorLinearModel

#: KV-cache bytes per token per element byte of the test model (a 16-layer, 8-head-ish shape)
KV_ELEMENTS_PER_TOKEN = 256


class TinyGPU(VectorLinearModel):
    """The linear step-time model (with bulk decode times, so the fast path runs) on a
    device whose KV memory holds a few hundred blocks; the KV dtype sets the bytes a
    token takes (fp8 doubles the blocks against bf16) and scales the KV read time."""

    name = "test-tiny-gpu"

    def __init__(self, kv_cache_dtype: str = "auto", kv_memory_bytes: int = 1 << 20):
        dtype = "bf16" if kv_cache_dtype == "auto" else kv_cache_dtype
        per_token = int(KV_ELEMENTS_PER_TOKEN * dtype_bytes(dtype, "engine.kv_cache_dtype"))
        super().__init__(kv_read=1e-8 * per_token / (2 * KV_ELEMENTS_PER_TOKEN), kv_bytes=per_token)
        self.kv_memory_bytes = kv_memory_bytes

    def memory(self, gpu_memory_utilization: float):
        breakdown = super().memory(gpu_memory_utilization)
        return type(breakdown)(breakdown.total, breakdown.usable, breakdown.weights,
                               breakdown.activation_peak, breakdown.other, self.kv_memory_bytes)


@dataclass(frozen=True)
class Case:
    """One drawn configuration: what ``simulate`` is called with."""

    engine: EngineConfig
    workload: Workload
    kv_memory_bytes: int
    async_scheduling: bool | None
    seed: int
    arrivals: str  # how the arrival times were drawn (for the statistics)

    def model(self) -> TinyGPU:
        return TinyGPU(self.engine.kv_cache_dtype, self.kv_memory_bytes)

    def num_blocks(self) -> int:
        """The KV blocks the engine gets (null block included)."""
        e = self.engine
        return self.model().kv_capacity(e.block_size, e.gpu_memory_utilization, e.num_gpu_blocks_override).num_blocks


#: KV capacity, in full contexts (max_model_len tokens)
CONTEXTS_OF_KV = st.sampled_from([0.3, 0.8, 1.0, 1.2, 1.5, 1.5, 2.0, 2.0, 3.0, 5.0, 20.0])


@st.composite
def engines(draw) -> EngineConfig:
    """vLLM engine settings: block size, lengths, budgets, chunked prefill and its long-prefill
    threshold, prefix caching, n-gram speculation, KV dtype and (often small) KV capacity."""
    block_size = draw(st.sampled_from([1, 8, 16, 32, 64]))
    target = draw(st.sampled_from([16, 100, 512, 1000, 2048, 4096]) | st.integers(16, 4096))
    max_model_len = max(2, -(-target // block_size) * block_size)
    max_num_seqs = draw(st.sampled_from([1, 2, 3, 8, 32, 256, 256]))
    chunked = draw(st.sampled_from([True, True, False]))  # on by default in vLLM
    if chunked:
        budget = draw(st.sampled_from([1, 16, 61, 256, 2048, 8192]))
        budget = max(budget, max_num_seqs, block_size)
    else:
        budget = max_model_len * draw(st.sampled_from([1, 1, 2])) + draw(st.sampled_from([0, 0, 7]))
        budget = max(budget, max_num_seqs)
    threshold = draw(st.sampled_from([0, 0, 1, 24, 300])) if chunked else 0
    num_spec = draw(st.sampled_from([0, 0, 0, 0, 0, 1, 2, 4]))
    # (a budget under 1 + num_spec can stall the engine: 'scheduler stalled', see the lead's report)
    budget = max(budget, 1 + num_spec)
    speculative = SpeculativeConfig(
        method="ngram",
        num_speculative_tokens=num_spec,
        acceptance_rate=tuple(draw(st.lists(st.floats(0, 1), min_size=1, max_size=1) | st.lists(
            st.floats(0, 1), min_size=num_spec, max_size=num_spec))) if num_spec else (),
        proposal_rate=draw(st.sampled_from([1.0, 0.6, 0.0])) if num_spec else 1.0,
    )
    # KV capacity in contexts of max_model_len: under 1 rejects the longest requests, a few
    # make preemptions likely; None sizes it from the device's KV memory (cases())
    override = None
    if draw(st.booleans()):
        override = max(2, round(draw(CONTEXTS_OF_KV) * max_model_len / block_size) + 1)
    return EngineConfig(
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        enable_chunked_prefill=chunked,
        long_prefill_token_threshold=threshold,
        enable_prefix_caching=draw(st.sampled_from([True, True, False])),  # on by default in vLLM
        num_gpu_blocks_override=override,
        kv_cache_dtype=draw(st.sampled_from(["auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"])),
        speculative=speculative,
    )


def _lengths(rng: np.random.Generator, regime: str, n: int, max_model_len: int) -> np.ndarray:
    """Token counts of one regime: 'one' (1 token), 'short', 'mixed', 'long' (up to half the
    context) or 'edge' (up to the whole context: with the rest of a request, often too long)."""
    high = {"one": 1, "short": 16, "mixed": 600, "long": max_model_len // 2, "edge": max_model_len}[regime]
    low = max(1, high // 2) if regime in ("long", "edge") else 1
    return rng.integers(low, max(low, high) + 1, n)


@st.composite
def workloads(draw, max_model_len: int = 2048, max_requests: int = 80) -> tuple[Workload, str]:
    """A small workload and the name of its arrival process: Poisson, Gamma with cv from 0.25
    to 4, bursts of simultaneous arrivals, or all at once; prompts and outputs from 1 token to
    the whole context, reasoning none, part or all of the output, optional shared prefixes."""
    n = draw(st.sampled_from([1, 2, max_requests // 4, max_requests // 2, max_requests]) | st.integers(1, max_requests))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rate = draw(st.sampled_from([0.5, 5.0, 50.0, 1000.0]) | st.floats(0.2, 500))
    kind = draw(st.sampled_from(["poisson", "gamma", "burst", "all_at_once"]))
    if kind == "poisson":
        arrival = gamma_arrivals(rng, rate, 1.0, n)
    elif kind == "gamma":
        arrival = gamma_arrivals(rng, rate, draw(st.sampled_from([0.25, 0.5, 2.0, 4.0])), n)
    elif kind == "burst":
        size = draw(st.integers(2, 8))
        arrival = np.repeat(gamma_arrivals(rng, rate / size, 1.0, -(-n // size)), size)[:n]
    else:
        arrival = np.zeros(n)
    # lengths: each request draws its regime from the mix this example allows
    regimes = st.sampled_from(["one", "short", "mixed", "mixed", "long", "long", "edge"])
    prompt_regimes = draw(st.lists(regimes, min_size=1, max_size=3))
    output_regimes = draw(st.lists(regimes, min_size=1, max_size=3))
    prompt = np.empty(n, np.int64)
    output = np.empty(n, np.int64)
    for values, regimes in ((prompt, prompt_regimes), (output, output_regimes)):
        pick = rng.integers(0, len(regimes), n)
        for i, regime in enumerate(regimes):
            values[pick == i] = _lengths(rng, regime, int((pick == i).sum()), max_model_len)
    reasoning_mode = draw(st.sampled_from(["none", "part", "whole", "mixed"]))
    share = {"none": np.zeros(n), "part": rng.uniform(0, 1, n), "whole": np.ones(n),
             "mixed": rng.choice([0.0, 0.5, 1.0], n)}[reasoning_mode]
    reasoning = np.minimum((output * share).astype(np.int64), output)
    groups = draw(st.sampled_from([0, 0, 1, 3, 8]))
    if groups:
        prefix = int(draw(st.integers(1, 300)))
        group = rng.integers(-1, groups, n)  # -1: some requests share nothing
        prompt = np.where(group >= 0, np.maximum(prompt, prefix + rng.integers(0, 2, n) * rng.integers(0, 50, n)),
                          prompt)
        prefix_tokens = np.where(group >= 0, prefix, 0)
    else:
        group = np.full(n, -1)
        prefix_tokens = np.zeros(n, np.int64)
    workload = Workload(arrival_s=arrival, prompt_tokens=prompt, output_tokens=output, reasoning_tokens=reasoning,
                        domain=np.full(n, "math", object), prefix_group=group, prefix_tokens=prefix_tokens)
    workload.validate()
    return workload, kind


@st.composite
def cases(draw, max_requests: int = 80) -> Case:
    """An engine, a workload sized to its context length, and the run's options."""
    engine = draw(engines())
    workload, kind = draw(workloads(engine.max_model_len, max_requests))
    if engine.speculative.enabled:  # vLLM runs n-gram speculation synchronously
        async_scheduling = draw(st.sampled_from([None, False]))
    else:
        async_scheduling = draw(st.sampled_from([None, True, False]))
    bf16_blocks = max(2, round(draw(CONTEXTS_OF_KV) * engine.max_model_len / engine.block_size) + 1)
    kv_memory = bf16_blocks * engine.block_size * 2 * KV_ELEMENTS_PER_TOKEN
    return Case(engine, workload, kv_memory, async_scheduling, draw(st.integers(0, 2**31 - 1)), kind)
