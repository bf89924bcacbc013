"""The tiny model: built locally, deterministic, loadable as a Hugging Face folder."""

from __future__ import annotations

import filecmp
import json

import pytest

from simulator.records.model_arch import ModelArchitecture

pytest.importorskip("transformers")
pytest.importorskip("torch")


@pytest.fixture(scope="module")
def cached():
    from profiler.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


def test_build_is_byte_identical(tmp_path, cached):
    from profiler.tiny_model import build_tiny_model

    fresh = build_tiny_model(tmp_path / "tiny")
    names = sorted(p.name for p in cached.iterdir())
    assert names == sorted(p.name for p in fresh.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(cached, fresh, names, shallow=False)
    assert mismatch == [] and errors == []


def test_architecture_and_tokenizer(cached):
    config = json.loads((cached / "config.json").read_text())
    arch = ModelArchitecture.from_hf_config(config, name="tiny-llama")
    assert (arch.num_layers, arch.hidden_size, arch.num_key_value_heads, arch.vocab_size) == (4, 512, 2, 8192)
    assert 20e6 < arch.num_params < 21e6
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cached)
    ids = tok("def main():\n    return 0\n")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "def main():\n    return 0\n"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith(tok.bos_token) and text.endswith("<|assistant|>\n")


def test_ensure_is_cached(cached):
    from profiler.tiny_model import ensure_tiny_model

    mtime = (cached / "model.safetensors").stat().st_mtime
    assert ensure_tiny_model() == cached
    assert (cached / "model.safetensors").stat().st_mtime == mtime


def test_another_shape_is_another_model(tmp_path, cached):
    from profiler.tiny_model import ensure_tiny_model, identity

    shape = {"layers": 2, "hidden": 256, "heads": 4, "kv_heads": 1}
    folder = ensure_tiny_model(tmp_path, shape=shape)
    assert folder.name == "tiny-llama-layers2-hidden256-heads4-kv_heads1" != cached.name
    config = json.loads((folder / "config.json").read_text())
    arch = ModelArchitecture.from_hf_config(config)
    assert (arch.num_layers, arch.hidden_size, arch.num_attention_heads, arch.num_key_value_heads,
            arch.intermediate_size) == (2, 256, 4, 1, 768)
    assert identity(shape)["recipe"] != identity()["recipe"]
    marker = json.loads((folder / "rllm_sim_model.json").read_text())
    assert marker["recipe"] == identity(shape)["recipe"] and marker["name"] == folder.name
    assert ensure_tiny_model(tmp_path, shape=shape) == folder  # cached, not rebuilt


@pytest.mark.parametrize("avx512, cuda, machine, expected", [
    (True, False, "x86_64", "bfloat16"), (False, False, "x86_64", "float32"),
    (False, True, "x86_64", "bfloat16"), (False, False, "aarch64", "bfloat16")])
def test_the_weight_dtype_follows_vllms_cpu_kernels(monkeypatch, avx512, cuda, machine, expected):
    """bf16 unless vLLM's CPU build would load its AVX2 kernels (x86 without AVX-512, no GPU),
    which cannot build oneDNN bf16 linear layers."""
    import platform

    import torch

    from profiler.tiny_model import weight_dtype

    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: avx512)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert weight_dtype.__wrapped__() == expected


def test_the_built_model_has_this_machines_dtype(cached):
    from profiler.tiny_model import identity, weight_dtype

    config = json.loads((cached / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == weight_dtype() == identity()["dtype"]
    arch = ModelArchitecture.from_hf_config(config)
    assert arch.dtype == {"bfloat16": "bf16", "float32": "fp32"}[weight_dtype()]
