"""vLLM's hybrid KV allocator: grouping of layers, sliding-window blocks capped at the window."""

from __future__ import annotations

import pytest

from calibration.catalog import load_model
from simulator.engine.kv_cache import TICKS_PER_S, cdiv
from simulator.engine.kv_layout import HybridKVCacheManager
from simulator.records.kv_groups import KVGroups, kv_groups, model_kv_groups


@pytest.mark.parametrize(("full", "sliding", "expected"), [
    (12, 12, (12, 1, 1)),   # gpt-oss-20b: alternating layers, two groups of 12
    (10, 20, (10, 1, 2)),   # vLLM's docstring example: (1 full, 2 sliding) x 10
    (20, 25, (25, 1, 1)),   # under 1.5x apart: the larger count, the smaller kind padded
    (32, 0, (32, 1, 0)),    # a dense model: one group of every layer
])
def test_layers_are_grouped_as_vllm_groups_them(full, sliding, expected):
    g = kv_groups(full, sliding, 128)
    assert (g.group_size, g.full_groups, g.sliding_groups) == expected


def test_gpt_oss_kv_per_token_slot_is_one_group_of_layers():
    arch = load_model("gpt-oss-20b")
    g = model_kv_groups(arch)
    assert g.hybrid and g.sliding_window == 128
    # 2 (K, V) x 12 layers per group x 8 KV heads x head_dim 64 x 2 bytes, per GPU
    assert arch.kv_bytes_per_token() == 2 * 12 * 8 * 64 * 2
    assert arch.kv_bytes_per_token(tp=8) == 2 * 12 * 1 * 64 * 2


def test_mla_kv_per_token_is_the_latent_vector_on_every_rank():
    arch = load_model("deepseek-r1")
    # (kv_lora_rank 512 + rope 64) x 61 layers x 2 bytes; no per-head K and V, not split by tp
    assert arch.kv_bytes_per_token() == (512 + 64) * 61 * 2
    assert arch.kv_bytes_per_token(tp=8) == arch.kv_bytes_per_token()
    assert arch.kv_bytes_per_token("fp8") == (512 + 64) * 61
    dense_equivalent = 2 * 61 * 128 * 192 * 2  # 128 heads of K and V at head_dim 192
    assert arch.kv_bytes_per_token() < dense_equivalent / 50


def decode_one(kv: HybridKVCacheManager, rid: int, prompt: int, total: int) -> list[tuple[int, int, int]]:
    """Prefill ``prompt`` tokens then decode one token a step up to ``total``:
    (tokens, blocks the request holds, blocks used in the pool) after each allocation."""
    out = []
    for n in [prompt, *range(prompt + 1, total + 1)]:
        assert kv.allocate(rid, n)
        out.append((n, kv.num_blocks_of(rid), kv.num_used_blocks))
    return out


def test_sliding_window_blocks_stop_growing_at_the_window():
    bs, window = 16, 128
    groups = KVGroups(group_size=12, full_groups=1, sliding_groups=1, sliding_window=window)
    kv = HybridKVCacheManager(1000, bs, False, groups)
    held = decode_one(kv, 7, 100, 2000)
    for tokens, blocks, used in held:
        full = cdiv(tokens, bs)
        sliding = blocks - full
        assert 0 < sliding <= cdiv(window, bs) + 1, (tokens, sliding)
        assert used == blocks  # every block the request holds comes from the one pool
    # long past the window the sliding group holds the window's blocks only: 8 or 9 of 16 tokens
    assert held[-1][1] - cdiv(2000, bs) in (window // bs, window // bs + 1)
    kv.free(7, finished=True)
    assert kv.num_used_blocks == 0


def test_block_seconds_count_the_sliding_blocks_while_held():
    # blocks held between allocations x the time between them, in whole ticks of the clocks
    groups = KVGroups(group_size=12, full_groups=1, sliding_groups=2, sliding_window=32)
    kv = HybridKVCacheManager(200, 16, False, groups)
    expected, held, since = 0, 0, 0
    for step, tokens in enumerate([20, *range(21, 300)]):
        kv.clock = 0.0137 * step + 0.003
        now = round(kv.clock * TICKS_PER_S)
        expected += held * (now - since)
        assert kv.allocate(3, tokens)
        held, since = kv.num_blocks_of(3), now
    kv.clock = 9.87
    kv.free(3, finished=True)
    expected += held * (round(kv.clock * TICKS_PER_S) - since)
    assert kv.block_seconds[3] == expected / TICKS_PER_S


def test_sliding_blocks_out_of_the_window_are_reused_by_others():
    bs = 16
    groups = KVGroups(group_size=12, full_groups=1, sliding_groups=1, sliding_window=32)
    kv = HybridKVCacheManager(40, bs, False, groups)  # 39 usable blocks
    decode_one(kv, 1, 16, 400)  # 25 full + at most 3 sliding blocks
    assert kv.num_used_blocks <= 25 + 3
    # a dense layout of two groups would hold 2 x 25 = 50 blocks: more than the pool
    assert kv.allocate(2, 64)  # room remains for another request's 4 + 4 blocks


def test_a_request_that_cannot_get_its_sliding_blocks_is_refused_unchanged():
    groups = KVGroups(group_size=1, full_groups=1, sliding_groups=1, sliding_window=64)
    kv = HybridKVCacheManager(5, 16, False, groups)  # 4 usable blocks
    assert not kv.allocate(1, 48)  # 3 full + 3 sliding blocks
    assert kv.num_used_blocks == 0 and kv.num_blocks_of(1) == 0
    assert kv.blocks_needed(1, 48) == 6


def one_request(prompt: int, output: int):
    import numpy as np

    from simulator.records.workload import Workload

    return Workload(arrival_s=np.zeros(1), prompt_tokens=np.array([prompt]), output_tokens=np.array([output]),
                    reasoning_tokens=np.zeros(1, np.int64), domain=np.array(["chat"], object), name="one")


def test_a_gpt_oss_request_holds_its_full_blocks_plus_a_window_in_the_engine():
    import numpy as np

    from calibration.registry import build_performance_model
    from simulator.engine.loop import simulate
    from simulator.records.engine_config import EngineConfig

    perf = build_performance_model("h100", "gpt-oss-20b", None, 1)
    config = EngineConfig(max_model_len=8192)
    result = simulate(one_request(1000, 3000), config, perf)
    assert (np.asarray(result.requests["status"]) == "completed").all()
    peak = int(np.max(result.timeline["kv_blocks_used"]))
    full = cdiv(4000, 16)
    assert full < peak <= full + cdiv(128, 16) + 1  # not 2 x full: the sliding group stays at its window


def test_sliding_window_models_refuse_the_vllm_scheduler():
    from calibration.registry import build_performance_model
    from simulator.engine.loop import simulate
    from simulator.records.engine_config import EngineConfig
    from simulator.records.errors import ConfigError

    perf = build_performance_model("h100", "gpt-oss-20b", None, 1)
    with pytest.raises(ConfigError, match="^engine.scheduler: native"):
        simulate(one_request(100, 10), EngineConfig(max_model_len=8192, scheduler="vllm"), perf)
