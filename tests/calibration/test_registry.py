"""Selecting and building PerformanceModels; one-line errors for bad selections."""

from __future__ import annotations

import pytest

from calibration.catalog import load_hardware, load_model, names
from calibration.registry import build_performance_model, check_selection, resolve_source
from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError
from simulator.records.performance import StepBatch


@pytest.mark.parametrize("hardware", ["h100", "h200", "a100"])
def test_auto_uses_measured_tables_for_table_hardware(hardware):
    pm = build_performance_model(hardware, "r1-distill-qwen-7b", "none", 1, {"source": "auto"})
    assert pm.calibrated is True
    assert pm.name.startswith("aiconfigurator:")
    assert "aiconfigurator" in pm.describe()["built_from"]


@pytest.mark.parametrize("hardware", ["l40s", "b200"])
def test_auto_falls_back_to_uncalibrated_roofline(hardware):
    pm = build_performance_model(hardware, "r1-distill-qwen-7b", "none", 1, {"source": "auto"})
    assert pm.calibrated is False
    assert "UNCALIBRATED" in pm.name
    assert pm.describe()["calibrated"] is False


def test_auto_uses_layer_profiles_for_their_card_and_shape_twins():
    direct = build_performance_model("rtxpro6000", "llama-3.1-8b", "none", 1, {"source": "auto"})
    twin = build_performance_model("rtxpro6000", "r1-distill-llama-8b", "none", 1, {"source": "auto"})
    assert direct.name.startswith("llmservingsim:") and twin.name.startswith("llmservingsim:")
    assert twin.describe()["via_model"] == "llama-3.1-8b"
    batch = StepBatch(prefill_tokens=[300], prefill_context=[0], decode_context=[900] * 40)
    assert twin.step_time(batch) == direct.step_time(batch)


def test_default_engine_settings_flow_into_memory():
    small = build_performance_model("h100", "r1-distill-qwen-7b", "none", 1, None,
                                    engine=EngineConfig(max_num_batched_tokens=2048, max_num_seqs=64))
    large = build_performance_model("h100", "r1-distill-qwen-7b", "none", 1, None,
                                    engine=EngineConfig(max_num_batched_tokens=32768, max_num_seqs=1024))
    assert small.memory(0.9).activation_peak < large.memory(0.9).activation_peak
    assert small.kv_capacity(16).num_blocks > large.kv_capacity(16).num_blocks


def test_kv_dtype_from_engine_or_optimization():
    a = build_performance_model("h100", "r1-distill-qwen-7b", "fp8_kv", 1, None)
    b = build_performance_model("h100", "r1-distill-qwen-7b", "none", 1, None,
                                engine=EngineConfig(kv_cache_dtype="fp8"))
    c = build_performance_model("h100", "r1-distill-qwen-7b", "none", 1, None)
    assert a.kv_bytes_per_token() == b.kv_bytes_per_token() == c.kv_bytes_per_token() // 2


def test_unknown_names_list_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"^hardware: unknown hardware 'tpu'; allowed: a100, b200, h100"):
        build_performance_model("tpu", "r1-distill-qwen-7b", "none", 1)
    with pytest.raises(ConfigError, match=r"^model: unknown model 'gpt5'; allowed: .*r1-distill-qwen-7b"):
        build_performance_model("h100", "gpt5", "none", 1)
    with pytest.raises(ConfigError, match=r"^optimization: unknown optimization 'magic'"):
        build_performance_model("h100", "r1-distill-qwen-7b", "magic", 1)
    with pytest.raises(ConfigError, match=r"^perf.source: unknown source 'guess'; allowed: auto, aiconfigurator"):
        build_performance_model("h100", "r1-distill-qwen-7b", "none", 1, {"source": "guess"})


def test_tp_must_divide_the_heads():
    with pytest.raises(ConfigError, match=r"^tp: tp=8 does not divide num_attention_heads=28"):
        build_performance_model("h100", "r1-distill-qwen-7b", "none", 8)
    with pytest.raises(ConfigError, match=r"^tp: tp=16 exceeds the 8 GPUs"):
        build_performance_model("h100", "r1-distill-llama-70b", "none", 16)


def test_a_model_that_does_not_fit_names_hardware_tp_and_numbers():
    with pytest.raises(ConfigError) as err:
        build_performance_model("h100", "r1-distill-llama-70b", "none", 1)
    message = str(err.value)
    assert message.startswith("tp: r1-distill-llama-70b does not fit on h100 at tp=1")
    assert "131.4 GiB" in message and "71.3 GiB usable" in message and "try tp in [4, 8]" in message
    assert "\n" not in message
    # at tp=2 the weights fit but a 32k-token request does not: vLLM refuses to start
    with pytest.raises(ConfigError, match=r"^engine.max_model_len: .* less than max_model_len=32768"):
        build_performance_model("h100", "r1-distill-llama-70b", "none", 2, engine=EngineConfig())
    fits = build_performance_model("h100", "r1-distill-llama-70b", "none", 2,
                                   engine=EngineConfig(max_model_len=8192))
    assert fits.kv_capacity(16).num_tokens >= 8192


def test_fp8_weights_measured_or_derived_and_labelled():
    assert build_performance_model("h100", "r1-distill-qwen-7b", "fp8_weights", 1).weight_dtype == "fp8"
    # H200 and A100 tables lack fp8 GEMMs: derived from their bf16 ones (calibration.weight_only), labelled
    h200 = build_performance_model("h200", "r1-distill-qwen-7b", "fp8_weights", 1)
    assert "fp8 / bf16 ratio measured on h100_sxm" in h200.describe()["built_from"]
    a100 = build_performance_model("a100", "r1-distill-qwen-7b", "fp8_weights", 1)
    assert "fp8 GEMMs bounded from the measured bf16 GEMMs" in a100.describe()["built_from"]
    with pytest.raises(ConfigError, match=r"^optimization.weight_dtype: int8 weights"):
        build_performance_model("h100", "r1-distill-qwen-7b", "int8_weights", 1)
    rough = build_performance_model("h200", "r1-distill-qwen-7b", "fp8_weights", 1, {"source": "roofline"})
    assert rough.calibrated is False


def test_explicit_sources_that_do_not_cover_the_selection():
    with pytest.raises(ConfigError, match=r"^perf.source: no aiconfigurator kernel tables for l40s; allowed hardware: a100, h100, h200"):
        build_performance_model("l40s", "r1-distill-qwen-7b", "none", 1, {"source": "aiconfigurator"})
    with pytest.raises(ConfigError, match=r"^perf.source: no LLMServingSim profile for h100"):
        build_performance_model("h100", "r1-distill-qwen-7b", "none", 1, {"source": "llmservingsim"})
    with pytest.raises(ConfigError, match=r"^perf.source: no BLIS coefficients for h200/qwq-32b/tp1"):
        build_performance_model("h200", "qwq-32b", "none", 1, {"source": "blis"})


def test_profile_source_needs_a_path():
    with pytest.raises(ConfigError, match=r"^perf.profile: source=profile needs perf.profile"):
        build_performance_model("h100", "r1-distill-qwen-7b", "none", 1, {"source": "profile", "profile": None})


def test_profile_source_without_fit_module(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "calibration.fit", None)  # make the import fail
    with pytest.raises(ConfigError, match=r"^perf.source: source=profile needs calibration.fit"):
        build_performance_model("h100", "r1-distill-qwen-7b", "none", 1, {"source": "profile", "profile": "x"})


def test_every_shipped_table_selection_builds():
    """Every shipped model on H100 (H200 if no H100 node holds it: DeepSeek-R1) at the smallest tp
    that holds it: calibrated, positive, finite."""
    batch = StepBatch(prefill_tokens=[1500], prefill_context=[500], decode_context=[3000] * 100)
    engine = EngineConfig(max_model_len=8192)
    for name in names("model"):
        arch = load_model(name)
        for hardware, tp in [(hw, tp) for hw in ("h100", "h200") for tp in (1, 2, 4, 8)]:
            if arch.num_attention_heads % tp:
                continue
            try:
                pm = build_performance_model(hardware, arch, "none", tp, engine=engine)
            except ConfigError as err:
                assert err.field == "tp"
                continue
            assert pm.calibrated and 0 < pm.step_time(batch) < 10
            assert resolve_source(pm.hardware, arch, {}, tp).source == "aiconfigurator"
            break
        else:
            pytest.fail(f"{name} fits on no H100 or H200 tp")


@pytest.mark.parametrize("source", ["roofline", "aiconfigurator"])
def test_data_parallel_ranks_split_the_experts_and_replicate_the_rest(source):
    """Known answer (bf16 Qwen3-30B-A3B, tp 2, expert parallel): at dp 2 each GPU holds half the
    expert bytes it holds at dp 1 (experts over dp x tp = 4 GPUs, not 2); the rest (attention,
    embeddings, norms, routers) stays tp-split only."""
    arch = load_model("qwen3-30b-a3b")
    experts = arch.expert_params * 2  # bf16

    def weights(dp: int) -> tuple[int, int]:
        engine = EngineConfig(enable_expert_parallel=True, data_parallel_size=dp)
        pm = build_performance_model("h100", arch, "none", 2, {"source": source}, engine=engine)
        listed = check_selection(load_hardware("h100"), arch, {}, 2, {"source": source}, engine)[1]
        return pm.memory(0.9).weights, listed.weights

    (one, one_listed), (two, two_listed) = weights(1), weights(2)
    assert one_listed == one and two_listed == two
    assert abs((one - two) - experts / 4) <= 1  # the expert share per GPU halves: E/2 -> E/4
    assert abs((one - experts / 2) - (two - experts / 4)) <= 1  # the non-expert share per GPU stays


def test_a_dense_model_at_data_parallel_2_is_two_plain_replicas():
    one, two = (build_performance_model("h100", "llama-3.1-8b", "none", 1, {"source": "roofline"},
                                        engine=EngineConfig(data_parallel_size=dp)) for dp in (1, 2))
    assert one.memory(0.9) == two.memory(0.9)
    assert two.describe().get("data_parallel_size") is None


def test_data_parallel_size_must_be_a_positive_integer():
    for bad in (0, -1, "2", 1.5, True):
        with pytest.raises(ConfigError, match=r"engine\.data_parallel_size"):
            EngineConfig(data_parallel_size=bad)
