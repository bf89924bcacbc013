"""Mixture-of-experts and latent-attention models: memory decides what fits, physics bounds the step."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.catalog import load_hardware, load_model
from calibration.memory import weight_bytes
from calibration.moe import expected_experts
from calibration.registry import build_performance_model
from simulator.records.errors import ConfigError
from simulator.records.model_arch import dtype_bytes
from simulator.records.performance import StepBatch

GIB = 1024**3


@pytest.mark.parametrize(("name", "total", "active"), [
    ("deepseek-r1", 671e9, 37e9), ("qwen3-30b-a3b", 30.5e9, 3.3e9), ("qwen3-235b-a22b", 235e9, 22e9),
    ("mixtral-8x7b", 46.7e9, 12.9e9), ("gpt-oss-120b", 117e9, 5.1e9), ("gpt-oss-20b", 21e9, 3.6e9),
    ("kimi-k2-thinking", 1.04e12, 32e9)])
def test_parameter_counts_match_the_published_ones(name, total, active):
    arch = load_model(name)
    assert arch.num_params == pytest.approx(total, rel=0.02)
    # published active counts differ on whether embeddings count: within 20%
    assert arch.active_params == pytest.approx(active, rel=0.2)


def test_checkpoint_dtypes_set_the_weight_bytes():
    r1, oss = load_model("deepseek-r1"), load_model("gpt-oss-120b")
    assert 620 * GIB < weight_bytes(r1, "fp8", 1) < 640 * GIB  # FP8: ~1 byte per parameter
    assert weight_bytes(oss, "bf16", 1) < 70 * GIB  # MXFP4 experts: ~60 GiB, fits one 80 GB card
    assert weight_bytes(oss, "bf16", 1) < oss.num_params * dtype_bytes("bf16") / 3
    # Kimi-K2-Thinking's INT4 experts with their group scales: its ~594 GB checkpoint
    assert weight_bytes(load_model("kimi-k2-thinking"), "bf16", 1) == pytest.approx(594e9, rel=0.02)


@pytest.mark.parametrize(("hardware", "tp"), [("h100", 8), ("h200", 4), ("h100", 4)])
def test_r1_on_too_few_gpus_is_refused_naming_tp_and_memory(hardware, tp):
    with pytest.raises(ConfigError) as err:
        build_performance_model(hardware, "deepseek-r1", None, tp)
    assert err.value.field == "tp"
    assert "does not fit" in str(err.value) and "GiB" in str(err.value) and f"tp={tp}" in str(err.value)


@pytest.fixture(scope="module")
def r1_h200():
    return build_performance_model("h200", "deepseek-r1", None, 8)


def test_r1_fits_on_eight_h200_and_labels_its_sources(r1_h200):
    assert r1_h200.kv_capacity(16, 0.9).num_tokens > 100_000
    described = r1_h200.describe()
    sources = described["step_time_sources"]
    assert "roofline" in sources["attention"] and "moe.csv" in sources["moe"]
    # H200 tables measure bf16 GEMMs: the FP8 ones are derived or roofline, and say so
    assert "fp8_gemm" in sources or "fp8 GEMMs" in described["built_from"]


@pytest.mark.parametrize("batch", [1, 8, 64, 256])
@pytest.mark.parametrize("kv_len", [1024, 8192])
def test_r1_decode_step_is_not_faster_than_reading_its_weights_and_kv(r1_h200, batch, kv_len):
    arch, hw = load_model("deepseek-r1"), load_hardware("h200")
    tp = 8
    expert_bytes = 3 * arch.hidden_size * arch.moe_intermediate_size * dtype_bytes("fp8")
    touched = expected_experts(batch, arch.num_experts_per_tok, arch.num_experts)
    non_expert = weight_bytes(arch, "fp8", tp) - arch.expert_params * dtype_bytes("fp8") / tp
    per_gpu = (non_expert + arch.moe_layers * touched * expert_bytes / tp
               + batch * kv_len * arch.kv_bytes_per_token(tp=tp))
    floor_s = per_gpu / (hw.memory_bandwidth_gbps * 1e9)
    step = r1_h200.step_time(StepBatch(decode_context=[kv_len] * batch))
    assert step >= floor_s
    assert step < 20 * floor_s + 0.01  # and not absurdly slower


def test_sliding_window_attention_stops_growing_at_the_window():
    pm = build_performance_model("h100", "gpt-oss-20b", None, 1)
    short, long = (pm.components(StepBatch(decode_context=[n] * 32))["sliding_attention"] for n in (4096, 65536))
    assert short == pytest.approx(long)
    full = [pm.components(StepBatch(decode_context=[n] * 32))["generation_attention"] for n in (4096, 65536)]
    assert full[1] > 4 * full[0]
    times = pm.decode_times(32, np.array([32 * 4096.0, 32 * 65536.0]))
    assert times[0] == pytest.approx(pm.step_time(StepBatch(decode_context=[4096] * 32)), rel=1e-6)


def test_data_parallel_engines_split_the_experts_not_the_attention():
    arch = load_model("qwen3-30b-a3b")
    one, spread = weight_bytes(arch, "bf16", 1), weight_bytes(arch, "bf16", 1, expert_ranks=2)
    assert spread == pytest.approx(one - arch.expert_params * 2 / 2, rel=1e-6)


def test_a_data_parallel_step_holds_its_experts_for_every_rank_loaded_as_itself():
    """``step_time`` of one of two data-parallel engines prices the shared experts for twice its own
    tokens: without them (``experts_time(2m)``) it is the same step whatever the other engine does;
    only a data-parallel mixture of experts has such a part (``experts_time`` 0 otherwise)."""
    from simulator.records.engine_config import EngineConfig

    engine = EngineConfig(data_parallel_size=2, enable_expert_parallel=True, max_num_batched_tokens=2048)
    pm = build_performance_model("h100", "qwen3-30b-a3b", "none", 1, {"source": "aiconfigurator"}, engine=engine)
    dense_dp1 = build_performance_model("h100", "qwen3-30b-a3b", "none", 1, {"source": "aiconfigurator"},
                                        engine=EngineConfig(enable_expert_parallel=True))
    assert dense_dp1.experts_time(1024) == 0.0 and pm.experts_time(0) == 0.0
    times = [pm.experts_time(t) for t in (1, 64, 1024, 4096, 40000)]
    assert all(a < b for a, b in zip(times, times[1:], strict=False))
    for m in (1, 256, 2048):
        batch = StepBatch(prefill_tokens=[m], prefill_context=[0])
        rest = pm.step_time(batch) - pm.experts_time(2 * m)
        assert 0 < rest < pm.step_time(batch)
        # the step without its experts is this engine's alone: the same as at data parallel 1 without them
        alone = dense_dp1.step_time(batch) - dense_dp1.sparse.experts_layer_ms(np.array([m]))[0] * 1e-3 * 48
        assert rest == pytest.approx(alone, rel=0.05)
