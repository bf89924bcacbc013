"""The BLIS coefficient model."""

from __future__ import annotations

import pytest

from calibration.blis import BlisPerformanceModel, find_coefficients, load_coefficients
from calibration.catalog import load_hardware, load_model
from simulator.records.errors import ConfigError
from simulator.records.performance import StepBatch


def test_rows_are_unique_and_complete():
    rows = load_coefficients()
    keys = [(r.model, r.gpu, r.tp, r.vllm_version) for r in rows]
    assert len(keys) == len(set(keys))
    assert all(r.total_kv_blocks > 0 and r.beta0 > 0 for r in rows)


def test_step_time_is_the_linear_fit():
    row = find_coefficients("h100", "qwen2.5-7b", 1)
    pm = BlisPerformanceModel(row, load_model("qwen2.5-7b"), load_hardware("h100"))
    batch = StepBatch(prefill_tokens=[300, 200], prefill_context=[0, 50], decode_context=[10] * 7,
                      decode_spec_tokens=[1] * 7)
    assert pm.step_time(batch) == pytest.approx((row.beta0 + row.beta1 * 500 + row.beta2 * 14) * 1e-6)
    assert pm.step_time(StepBatch()) == 0.0


def test_kv_blocks_are_blis_per_gpu_count():
    """BLIS's total_kv_blocks is (0.9 x 80 GiB - weights) / block bytes summed over ranks."""
    arch = load_model("qwen2.5-7b")
    for tp in (1, 2, 4):
        row = find_coefficients("h100", "qwen2.5-7b", tp)
        pm = BlisPerformanceModel(row, arch, load_hardware("h100"))
        expected = (0.9 * 80 * 2**30 - arch.weight_bytes(None, tp)) / (16 * arch.kv_bytes_per_token(None, tp))
        assert pm.kv_capacity(16).num_blocks == pytest.approx(expected, rel=0.002)
        assert pm.kv_capacity(32).num_blocks == pm.kv_capacity(16).num_blocks // 2


def test_unknown_rows_list_what_exists():
    with pytest.raises(ConfigError, match=r"^perf.source: no BLIS coefficients for h100/llama-3.1-8b/tp8; allowed:"):
        find_coefficients("h100", "llama-3.1-8b", 8)
