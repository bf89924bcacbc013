"""Composing the profiler's configuration (conf/profiler.yaml) and the vLLM arguments it gives."""

from __future__ import annotations

import pytest

from profiler.__main__ import compose, split_overrides
from profiler.run import estimated_weight_bytes, llm_kwargs
from profiler.settings import PROFILES_DIR, settings_from_config
from simulator.errors import ConfigError
from simulator.model_arch import ModelArchitecture


def settings(*argv: str):
    return settings_from_config(compose(*split_overrides(list(argv))))


def test_defaults_and_an_optimization():
    s = settings("optimization=fp8_kv")
    assert (s.model, s.grid.name, s.optimization.name) == ("tiny-llama", "default", "fp8_kv")
    assert s.optimization.engine_args == {"kv_cache_dtype": "fp8"}
    assert s.output_path("cpu-amd-2c") == PROFILES_DIR / "cpu-amd-2c" / "tiny-llama" / "fp8_kv"
    assert settings("model=/models/Qwen3-8B").resolved_model_name == "qwen3-8b"


def test_overrides_reach_grid_engine_and_extra_args():
    s = settings("grid=smoke", "grid.repeats=5", "engine.max_model_len=4096", "engine.extra_args.swap_space=0")
    assert s.grid.repeats == 5 and s.grid.prefill_chunks == (32, 256)
    assert s.engine.max_model_len == 4096 and s.engine.extra_args == {"swap_space": 0}


def test_cpu_and_gpu_engine_arguments():
    s = settings("optimization=spec_ngram", "engine.block_size=64")
    cpu = llm_kwargs(s, "/m", cpu=True)
    assert cpu["kv_cache_memory_bytes"] == 2 * 1024**3 and "gpu_memory_utilization" not in cpu
    assert (cpu["max_num_batched_tokens"], cpu["block_size"], cpu["async_scheduling"]) == (2048, 64, False)
    assert cpu["speculative_config"]["num_speculative_tokens"] == 4
    gpu = llm_kwargs(s, "/m", cpu=False)
    assert gpu["gpu_memory_utilization"] == 0.9 and "kv_cache_memory_bytes" not in gpu
    assert gpu["max_num_batched_tokens"] == 8192


@pytest.mark.parametrize("argv, field", [
    (["engine.warp=9"], "engine"),
    (["colour=blue"], "profiler"),
    (["optimization=spec_eagle"], "optimization.engine_args.speculative_config.model"),
    (["grid.bogus=1"], "grid"),
    (["engine.gpu_memory_utilization=1.5"], "engine.gpu_memory_utilization"),
    (["grid=huge"], "grid"),
    (["just-a-word"], "arguments"),
])
def test_bad_settings_name_the_field(argv, field):
    with pytest.raises(ConfigError) as err:
        settings(*argv)
    assert err.value.field == field and "\n" not in str(err.value)


def test_weight_estimate_keeps_embeddings_in_model_dtype():
    arch = ModelArchitecture(name="t", num_layers=4, hidden_size=512, num_attention_heads=8,
                             num_key_value_heads=2, intermediate_size=1536, vocab_size=8192)
    bf16 = estimated_weight_bytes(arch, None, 1)
    int8 = estimated_weight_bytes(arch, "int8_per_channel_weight_only", 1)
    assert bf16 == 2 * arch.num_params
    embeddings = 2 * 8192 * 512 + 9 * 512
    assert int8 == (arch.num_params - embeddings) + 2 * embeddings
