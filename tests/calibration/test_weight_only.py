"""Weight-only int4 (GPTQ, AWQ): memory with group scales, GEMMs bounded from measured bf16 ones;
and the host cost of prefix caching (block hashing)."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.catalog import load_model
from calibration.memory import weight_bytes
from calibration.registry import build_performance_model
from simulator.records.engine_config import EngineConfig
from simulator.records.performance import StepBatch


@pytest.fixture(scope="module")
def models():
    return {opt: build_performance_model("h100", "r1-distill-qwen-7b", opt, 2)
            for opt in ("none", "gptq_int4", "awq_int4")}


def test_int4_weights_free_memory_for_more_kv_blocks(models):
    bf16, int4 = models["none"], models["gptq_int4"]
    assert int4.memory(0.9).weights < 0.5 * bf16.memory(0.9).weights
    blocks = {k: m.kv_capacity(block_size=16, gpu_memory_utilization=0.9).num_blocks
              for k, m in models.items()}
    assert blocks["gptq_int4"] > blocks["none"]
    assert blocks["awq_int4"] == blocks["gptq_int4"]  # same bytes per weight


def test_group_scales_are_counted():
    arch = load_model("r1-distill-qwen-7b")
    plain = weight_bytes(arch, "bf16", 1)
    int4 = weight_bytes(arch, "int4", 1)
    h, v = arch.hidden_size, arch.vocab_size
    unquantized = v * h * (1 if arch.tie_word_embeddings else 2) + (2 * arch.num_layers + 1) * h
    quantized = arch.num_params - unquantized
    assert int4 > quantized * 0.5 + unquantized * 2  # more than the bare 4-bit weights
    assert int4 < plain


def test_int4_gemms_lie_between_the_weight_read_bound_and_bf16(models):
    kernels = models["gptq_int4"].kernels
    m = np.array([1, 8, 64, 512, 4096, 8192])
    for n, k in ((4608, 3584), (3584, 18944)):
        t16 = np.asarray(kernels.gemm_ms(m, n, k, "bf16"))
        t4 = np.asarray(kernels.gemm_ms(m, n, k, "int4"))
        assert np.all(t4 <= t16) and np.all(t4 >= 0.25 * t16)
        assert t4[0] < 0.6 * t16[0]  # a decode GEMM reads a quarter of the bytes
        assert t4[-1] > 0.9 * t16[-1]  # a big prefill GEMM is compute-bound: little to gain


def test_int4_decodes_faster_and_prefills_about_as_fast(models):
    decode = StepBatch(decode_context=[2000] * 16, decode_spec_tokens=[0] * 16)
    prefill = StepBatch(prefill_tokens=[8192], prefill_context=[0])
    bf16, int4 = models["none"], models["gptq_int4"]
    assert int4.step_time(decode) < 0.9 * bf16.step_time(decode)
    assert int4.step_time(prefill) == pytest.approx(bf16.step_time(prefill), rel=0.1)
    assert "int4 GEMMs bounded from the measured bf16 GEMMs" in int4.describe()["built_from"]


def test_prefix_caching_costs_hashing_per_token_and_bookkeeping_per_request():
    """Caching on, nothing hit: each step pays block hashing per token and the cache's
    bookkeeping per scheduled request (calibration.prefix_caching_cost); off pays neither."""
    from calibration.prefix_caching_cost import CACHE_S_PER_REQUEST, hash_s_per_token

    on = build_performance_model("h100", "r1-distill-qwen-7b", "none", 2, engine=EngineConfig())
    off = build_performance_model("h100", "r1-distill-qwen-7b", "none", 2,
                                  engine=EngineConfig(enable_prefix_caching=False))
    prefill = StepBatch(prefill_tokens=[4096], prefill_context=[0])
    decode = StepBatch(decode_context=[1000] * 64, decode_spec_tokens=[0] * 64)
    assert on.step_time(prefill) - off.step_time(prefill) == pytest.approx(
        4096 * hash_s_per_token(16) + CACHE_S_PER_REQUEST, rel=0.05)  # (dense cost is kept monotone)
    assert on.step_time(decode) - off.step_time(decode) == pytest.approx(
        64 * (hash_s_per_token(16) + CACHE_S_PER_REQUEST), rel=0.05)
    assert off.host_s_per_token == off.host_s_per_row == 0.0
    for batch in (prefill, decode):  # a percent-level cost, not more
        assert 0 < on.step_time(batch) / off.step_time(batch) - 1 < 0.05


def test_fp8_on_h200_follows_the_h100_measured_ratio():
    """H200 fp8 GEMM = H200 bf16 x (H100 fp8 / H100 bf16), at each size."""
    from calibration.kernel_tables import load_tables

    kernels = build_performance_model("h200", "r1-distill-qwen-7b", "fp8_weights", 1).kernels
    h100 = load_tables("h100_sxm")
    m = np.array([1, 64, 1024, 8192])
    ratio = h100.gemm_table("fp8").latency_ms(m, 4608, 3584) / h100.gemm_table("bf16").latency_ms(m, 4608, 3584)
    got = np.asarray(kernels.gemm_ms(m, 4608, 3584, "fp8")) / np.asarray(kernels.gemm_ms(m, 4608, 3584, "bf16"))
    assert got == pytest.approx(ratio, rel=1e-9)
    assert got[-1] < 0.8  # big fp8 GEMMs run on the faster fp8 tensor cores


def test_fp8_on_ampere_is_a_weight_only_read_bound():
    kernels = build_performance_model("a100", "r1-distill-qwen-7b", "fp8_weights", 1).kernels
    m = np.array([1, 8192])
    t16, t8 = (np.asarray(kernels.gemm_ms(m, 4608, 3584, d)) for d in ("bf16", "fp8"))
    assert t8[0] < 0.8 * t16[0]  # half the weight bytes to read
    assert t8[-1] == pytest.approx(t16[-1], rel=0.05)  # no fp8 tensor cores: the bf16 work stays
