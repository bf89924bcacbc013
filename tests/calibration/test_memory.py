"""Memory split and KV capacity, sized as vLLM sizes them."""

from __future__ import annotations

import pytest

from calibration.catalog import load_hardware, load_model
from calibration.memory import (
    MemoryModel,
    activation_peak_bytes,
    other_bytes,
    weight_bytes,
)
from simulator.records.hardware import GIB


def test_default_model_kv_capacity(qwen7b_h100):
    """R1-Distill-Qwen-7B on one H100 at 0.9: 57,344 KV bytes per token; ~15.2 GB of weights."""
    assert qwen7b_h100.kv_bytes_per_token() == 2 * 28 * 4 * 128 * 2 == 57344
    mem = qwen7b_h100.memory(0.9)
    assert mem.weights == pytest.approx(15.23e9, rel=0.005)
    assert mem.usable == pytest.approx(0.9 * 79.19 * GIB, abs=2)
    assert 0 < mem.activation_peak < 3 * GIB
    assert 0 < mem.other < 2 * GIB
    assert mem.kv_cache == mem.usable - mem.weights - mem.activation_peak - mem.other
    kv = qwen7b_h100.kv_capacity(block_size=16, gpu_memory_utilization=0.9)
    assert kv.num_blocks == mem.kv_cache // (57344 * 16)
    # roughly (0.9 x 79.19 GiB - 15.2 GB - a few GB) / (57344 x 16): 60-68k blocks, about a million tokens
    assert 60_000 < kv.num_blocks < 68_000
    assert qwen7b_h100.kv_capacity(16, 0.9, num_gpu_blocks_override=1234).num_blocks == 1234


def test_utilization_and_block_size_scale_capacity(qwen7b_h100):
    low = qwen7b_h100.kv_capacity(16, 0.5).num_blocks
    high = qwen7b_h100.kv_capacity(16, 0.95).num_blocks
    assert low < high
    assert qwen7b_h100.kv_capacity(32, 0.9).num_blocks == qwen7b_h100.kv_capacity(16, 0.9).num_blocks // 2


def test_weight_bytes_per_dtype_and_tp():
    arch = load_model("r1-distill-qwen-7b")
    bf16 = weight_bytes(arch, "bf16", 1)
    assert bf16 == arch.weight_bytes()
    fp8 = weight_bytes(arch, "fp8", 1)
    embed_and_head = 2 * arch.vocab_size * arch.hidden_size * 2
    assert fp8 == pytest.approx((bf16 - embed_and_head) / 2 + embed_and_head, rel=0.001)
    assert weight_bytes(arch, "bf16", 2) == bf16 // 2


def test_activation_and_other_grow_with_their_causes():
    arch = load_model("r1-distill-qwen-7b")
    assert activation_peak_bytes(arch, 1, 16384, 8) > activation_peak_bytes(arch, 1, 8192, 8)
    assert activation_peak_bytes(arch, 1, 8192, 2048) > activation_peak_bytes(arch, 1, 8192, 256)
    assert activation_peak_bytes(arch, 2, 8192, 8) < activation_peak_bytes(arch, 1, 8192, 8)
    assert other_bytes(arch, 2) > other_bytes(arch, 1)
    assert other_bytes(load_model("r1-distill-llama-70b"), 1) > other_bytes(arch, 1)


def test_fp8_kv_doubles_blocks():
    h100 = load_hardware("h100")
    arch = load_model("r1-distill-qwen-14b")
    bf16 = MemoryModel(arch, h100, kv_dtype="bf16")
    fp8 = MemoryModel(arch, h100, kv_dtype="fp8")
    assert fp8.kv_bytes_per_token() * 2 == bf16.kv_bytes_per_token()
    blocks = [m.breakdown(0.9).kv_cache // (m.kv_bytes_per_token() * 16) for m in (bf16, fp8)]
    assert abs(blocks[1] - 2 * blocks[0]) <= 1


def test_too_big_a_model_leaves_negative_kv():
    mem = MemoryModel(load_model("r1-distill-llama-70b"), load_hardware("h100")).breakdown(0.9)
    assert mem.kv_cache < 0
