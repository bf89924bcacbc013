"""The shipped conf/ files: hardware specs with sources, model shapes from their config.json."""

from __future__ import annotations

import pytest

from calibration.catalog import load_hardware, load_model, load_optimization, names
from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError

PUBLISHED_PARAMS = {  # parameter counts published on the models' Hugging Face pages
    "r1-distill-qwen-1.5b": 1.78e9, "r1-distill-qwen-7b": 7.62e9, "r1-distill-qwen-14b": 14.8e9,
    "r1-distill-qwen-32b": 32.8e9, "r1-distill-llama-8b": 8.03e9, "r1-distill-llama-70b": 70.6e9,
    "qwq-32b": 32.8e9, "qwen3-8b": 8.19e9, "qwen3-32b": 32.8e9, "llama-3.1-8b": 8.03e9,
    "llama-2-7b": 6.74e9, "qwen2.5-7b": 7.62e9,
}


def test_every_issue_model_is_shipped():
    assert set(PUBLISHED_PARAMS) <= set(names("model"))


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_model_shapes(name):
    arch = load_model(name)
    assert arch.name == name
    assert arch.num_params == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01)
    assert arch.head_dim == 128
    assert arch.attention_bias == (arch.family == "qwen2")
    assert arch.hf_name


def test_qwen3_head_dim_is_not_hidden_over_heads():
    arch = load_model("qwen3-32b")
    assert arch.num_attention_heads * arch.head_dim == 8192 != arch.hidden_size


SPEC_FIELDS = ("memory_gib", "memory_bandwidth_gbps", "bf16_tflops", "fp8_tflops", "interconnect_gbps",
               "price_per_gpu_hour_usd")


@pytest.mark.parametrize("name", ["h100", "h200", "a100", "l40s", "b200"])
def test_hardware_has_specs_price_and_sources(name):
    hw = load_hardware(name)
    assert hw.name == name
    assert hw.price_per_gpu_hour_usd > 0
    for field in SPEC_FIELDS:
        assert hw.sources.get(field), f"{name} has no source for {field}"


def test_hardware_ordering_is_physical():
    h100, h200, a100, l40s, b200 = (load_hardware(n) for n in ("h100", "h200", "a100", "l40s", "b200"))
    assert h200.memory_bandwidth_gbps > h100.memory_bandwidth_gbps > a100.memory_bandwidth_gbps > l40s.memory_bandwidth_gbps
    assert b200.bf16_tflops > h100.bf16_tflops == h200.bf16_tflops > l40s.bf16_tflops > a100.bf16_tflops
    assert a100.fp8_tflops == 0
    assert b200.price_per_gpu_hour_usd > h200.price_per_gpu_hour_usd > h100.price_per_gpu_hour_usd > a100.price_per_gpu_hour_usd


@pytest.mark.parametrize("name", ["none", "fp8_weights", "fp8_kv", "prefix_cache", "prefix_off", "spec_ngram",
                                  "int8_weights", "gptq_int4", "awq_int4"])
def test_optimizations_load_into_an_engine_config(name):
    opt = load_optimization(name)
    assert opt["name"] == name
    # every shipped group says how long its model writes (simulator.workload.output_scale)
    required = {"name", "weight_dtype", "kv_cache_dtype", "enable_prefix_caching", "speculative",
                "output_length_scale"}
    # where draft rates come from; how int4 weights are quantized (documentation)
    assert required <= set(opt) <= required | {"speculative_rates", "weight_quantization"}
    assert ("speculative_rates" in opt) == (name == "spec_ngram")
    engine = EngineConfig.from_dict({"speculative": opt["speculative"] or {},
                                     "enable_prefix_caching": opt["enable_prefix_caching"]})
    assert engine.speculative.enabled == (name == "spec_ngram")


def test_optimization_copies_are_independent():
    load_optimization("none")["weight_dtype"] = "int4"
    assert load_optimization("none")["weight_dtype"] == "bf16"


def test_unknown_names():
    with pytest.raises(ConfigError, match=r"^model: unknown model 'x'; allowed: "):
        load_model("x")
    with pytest.raises(ConfigError, match=r"^hardware: unknown hardware 'x'; allowed: a100, b200, h100, h200"):
        load_hardware("x")
