"""Check 2: the composed H100 models against BLIS's H100 coefficients.

BLIS (inference-sim) fitted ``step_us = beta0 + beta1 x prefill_tokens + beta2 x
decode_tokens`` to real vLLM 0.11 runs on one H100 for Llama-3.1-8B-Instruct and
Qwen2.5-7B-Instruct. The composed model is built only from aiconfigurator's
kernel tables plus one per-step overhead (0.7 ms, which is the Qwen2.5-7B beta0
minus the composed GPU time of a single short decode: agreement at that one
point is by construction, nowhere else).

Where they agree (asserted below, within 20%):

- Qwen2.5-7B: decode-only steps of 1-128 sequences and prefill chunks of
  2k-8k tokens (alone or with up to 128 decodes), at ~1k tokens of decode KV.
- Llama-3.1-8B: decode-only steps of 1-8 sequences and prefill chunks of 2k-4k
  tokens with up to 8 decodes.

Where and why they differ (also asserted, as directions):

1. Context length. BLIS has no KV-length term: its beta2 is a decode's average
   cost at the contexts of the runs it was fitted on (~1-2k tokens). Decode
   attention reads the whole KV, so at 4k tokens and 128 sequences the composed
   step is far costlier than BLIS, and at 256 tokens cheaper. Reasoning
   workloads live at long contexts; this is why the composed model is the default.
2. Small and mid prefill chunks (128-512 tokens). BLIS charges beta1 = 19.5 us
   for every prefill token from the first, while the measured GEMMs stay bound
   by the weight read until a few hundred tokens, so BLIS is 15-30% higher there.
3. Llama-3.1-8B's decode slope. Its vLLM 0.11 H100 fit has beta2 = 304 us per
   decode token, 12x its Qwen2.5-7B fit on the same GPU and version: a 128-way
   decode step would take 45 ms, which no H100 shows for an 8B model (the
   composed step is ~14 ms). Large decode batches are therefore left out of the
   Llama grid; at 8k-token prefills the composed step is ~20% above BLIS, whose
   beta1 implies ~90% tensor-core utilisation including attention.
"""

from __future__ import annotations

import itertools

import pytest

from calibration.blis import find_coefficients
from calibration.catalog import load_hardware, load_model
from calibration.composed import ComposedPerformanceModel, TableKernels
from calibration.kernel_tables import load_tables
from simulator.records.performance import StepBatch

TOLERANCE = 0.20
KV = 1024
GRIDS = {
    "qwen2.5-7b": {"prefill": [0, 2048, 4096, 8192], "decodes": [0, 1, 8, 32, 64, 128]},
    "llama-3.1-8b": {"prefill": [0, 2048, 4096], "decodes": [0, 1, 8]},
}


def composed(model: str) -> ComposedPerformanceModel:
    h100 = load_hardware("h100")
    return ComposedPerformanceModel(load_model(model), h100, TableKernels(load_tables("h100_sxm"), h100))


def step(prefill: int, decodes: int, kv: int = KV) -> StepBatch:
    return StepBatch(prefill_tokens=[prefill] if prefill else [], prefill_context=[0] if prefill else [],
                     decode_context=[kv] * decodes)


@pytest.mark.parametrize("model", sorted(GRIDS))
def test_composed_agrees_with_blis_on_its_grid(model):
    pm = composed(model)
    blis = find_coefficients("h100", model, 1)
    assert blis.vllm_version == "v0.11.0"
    errors = {}
    for p, d in itertools.product(GRIDS[model]["prefill"], GRIDS[model]["decodes"]):
        if p == 0 and d == 0:
            continue
        reference = blis.step_us(p, d) * 1e-6
        errors[(p, d)] = pm.step_time(step(p, d)) / reference - 1
    worst = max(errors, key=lambda k: abs(errors[k]))
    assert abs(errors[worst]) < TOLERANCE, f"{model}: worst cell (prefill, decodes)={worst}: {errors[worst]:+.1%}"
    assert len(errors) >= 8


def test_where_they_differ_context_length():
    pm = composed("qwen2.5-7b")
    blis = find_coefficients("h100", "qwen2.5-7b", 1)
    long = pm.step_time(step(0, 128, kv=4096)) / (blis.step_us(0, 128) * 1e-6)
    short = pm.step_time(step(0, 128, kv=256)) / (blis.step_us(0, 128) * 1e-6)
    assert long > 1.3 and short < 0.95


def test_where_they_differ_small_prefill_chunks():
    pm = composed("qwen2.5-7b")
    blis = find_coefficients("h100", "qwen2.5-7b", 1)
    assert pm.step_time(step(512, 0)) < 0.85 * blis.step_us(512, 0) * 1e-6


def test_where_they_differ_llama_decode_slope():
    pm = composed("llama-3.1-8b")
    blis = find_coefficients("h100", "llama-3.1-8b", 1)
    assert blis.beta2 > 10 * find_coefficients("h100", "qwen2.5-7b", 1).beta2
    assert pm.step_time(step(0, 128)) < 0.5 * blis.step_us(0, 128) * 1e-6
