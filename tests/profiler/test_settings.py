"""Composing the profiler's configuration (conf/profiler.yaml) and the vLLM arguments it gives."""

from __future__ import annotations

import pytest

from profiler.__main__ import compose, split_overrides
from profiler.run import estimated_weight_bytes, llm_kwargs
from profiler.settings import settings_from_config
from simulator.records.errors import ConfigError
from simulator.records.model_arch import ModelArchitecture


def settings(*argv: str):
    return settings_from_config(compose(*split_overrides(list(argv))))


def test_defaults_and_an_optimization():
    s = settings("optimization=fp8_kv")
    assert (s.model, s.grid.name, s.optimization.name) == ("tiny-llama", "default", "fp8_kv")
    assert s.optimization.engine_args == {"kv_cache_dtype": "fp8"}
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
    assert cpu["dtype"] == "auto"


def test_a_tiny_model_built_in_float32_is_profiled_in_float32(tmp_path):
    """vLLM's dtype auto would cast it to bf16 (profiler.tiny_model.engine_dtype); engine.dtype wins."""
    import json

    (tmp_path / "rllm_sim_model.json").write_text(json.dumps({"name": "tiny-llama", "dtype": "float32"}))
    assert llm_kwargs(settings(), tmp_path, cpu=True)["dtype"] == "float32"
    assert llm_kwargs(settings("engine.dtype=bfloat16"), tmp_path, cpu=True)["dtype"] == "bfloat16"


@pytest.mark.parametrize("argv, field", [
    (["engine.warp=9"], "engine.warp"),
    (["colour=blue"], "colour"),
    (["optimization=spec_eagle"], "optimization.engine_args.speculative_config.model"),
    (["grid.bogus=1"], "grid.bogus"),
    (["grid.mixed.request=1"], "grid.mixed.request"),
    (["seed=abc"], "seed"),
    (["resume=maybe"], "resume"),
    (["progress=1"], "progress"),
    (["grid.repeats=abc"], "grid.repeats"),
    (["grid.prefill_chunks=abc"], "grid.prefill_chunks"),
    (["grid.prefill_chunks=[1,x]"], "grid.prefill_chunks"),
    (["grid.mixed.prompt_tokens=[1,2,3]"], "grid.mixed.prompt_tokens"),
    (["grid.spec=3"], "grid.spec"),
    (["engine.block_size=abc"], "engine.block_size"),
    (["engine.kv_cache_space_gib=lots"], "engine.kv_cache_space_gib"),
    (["engine.enforce_eager=maybe"], "engine.enforce_eager"),
    (["engine.extra_args=3"], "engine.extra_args"),
    (["model_name=5"], "model_name"),
    (["optimization=nope"], "optimization"),
    (["seed=${oops}"], "seed"),
    (["grid.prefill_chunks=[1,2"], "grid.prefill_chunks"),
    (["hydra.run.dir=/proc/x"], "hydra.run.dir"),
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


@pytest.mark.parametrize("argv, field, hint", [
    (["engin.block_size=3"], "engin", "did you mean engine"),
    (["engine.max_num_seq=5"], "engine.max_num_seq", "did you mean engine.max_num_seqs "),
    (["grid.repeat=5"], "grid.repeat", "did you mean grid.repeats?"),
])
def test_a_mistyped_key_names_the_closest_valid_ones(argv, field, hint):
    with pytest.raises(ConfigError) as err:
        settings(*argv)
    assert err.value.field == field and hint in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("arg, field", [
    ("seed=abc", "seed"), ("resume=maybe", "resume"), ("engin.block_size=3", "engin"),
    ("grid.repeats=abc", "grid.repeats"), ("hydra.run.dir=/proc/x", "hydra.run.dir"),
    ("optimization=nope", "optimization"), ("model=", "model"),
])
def test_the_command_line_gives_one_line_and_exit_2(arg, field, capsys):
    from profiler.__main__ import main

    code = main(["model=tiny-llama", arg])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {field}: ")


def test_a_tiny_model_shape_is_part_of_the_models_name():
    s = settings("model=tiny-llama", "model.layers=6", "model.hidden=768", "model.heads=12", "model.kv_heads=4")
    assert s.model == "tiny-llama" and s.model_shape == {"layers": 6, "hidden": 768, "heads": 12, "kv_heads": 4}
    assert s.resolved_model_name == "tiny-llama-layers6-hidden768-heads12-kv_heads4"
    assert settings("model.layers=4").resolved_model_name == "tiny-llama"  # the default shape
    assert settings("model.layers=2").resolved_model_name != settings("model.layers=3").resolved_model_name


@pytest.mark.parametrize("argv, field", [
    (["model.layers=0"], "model.layers"),
    (["model.layers=abc"], "model.layers"),
    (["model.depth=3"], "model.depth"),
    (["model.hidden=500", "model.heads=8"], "model.heads"),
    (["model.kv_heads=3"], "model.kv_heads"),
    (["model=/nonexistent/m", "model.layers=2"], "model.layers"),
])
def test_bad_shapes_name_the_field(argv, field):
    with pytest.raises(ConfigError) as err:
        settings(*argv)
    assert err.value.field == field and "\n" not in str(err.value)
