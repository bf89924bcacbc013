"""The profiling grid (pure: no engine)."""

from __future__ import annotations

import pytest

from profiler.grid import GridSpec, ShapesSpec, build_points, kv_tokens_needed
from simulator.records.errors import ConfigError


def test_points_cover_the_product_in_measuring_order():
    grid = GridSpec(prefill_chunks=(32, 512), prefill_contexts=(0, 1024), decode_batches=(1, 8),
                    decode_contexts=(128, 4096), decode_max_batch_tokens=8192, decode_windows=1,
                    shapes=ShapesSpec(enabled=False))
    points, left_out = build_points(grid, (), max_model_len=32768, max_num_batched_tokens=2048)
    ids = [p.point_id for p in points]
    assert ids == [
        "prefill/chunk32/context0", "prefill/chunk512/context0",
        "prefill/chunk32/context1024", "prefill/chunk512/context1024",
        "decode/batch1/context128", "decode/batch8/context128", "decode/batch1/context4096",
        "mixed/requests32",
    ]  # (8, 4096) exceeds decode_max_batch_tokens: not part of the grid
    assert left_out == []
    assert len(set(ids)) == len(ids)


def test_decode_windows_measure_every_decode_point_again_after_the_other_phases():
    grid = GridSpec(prefill_chunks=(32,), prefill_contexts=(0,), decode_batches=(1, 8), decode_contexts=(128, 9000),
                    decode_windows=3)
    points, left_out = build_points(grid, ("spec",), max_model_len=8192, max_num_batched_tokens=2048)
    ids = [p.point_id for p in points]
    first = ["decode/batch1/context128", "decode/batch8/context128"]  # 9,000 tokens exceed max_model_len
    again = [f"{p}/window{w}" for w in (1, 2) for p in first]
    assert ids[1:3] == first
    shapes = [p for p in points if p.phase == "shapes"]
    assert ids[-len(shapes) - len(again):-len(shapes)] == again  # after mixed and spec, before the shapes
    assert "spec" in {p.phase for p in points[:-len(shapes) - len(again)]}
    assert [p["point_id"] for p in left_out if p["phase"] == "decode"] == ["decode/batch1/context9000"]
    window = next(p for p in points if p.point_id == "decode/batch8/context128/window2")
    assert (window.param("batch"), window.param("context"), window.phase) == (8, 128, "decode")
    assert kv_tokens_needed(window, grid, 128) == kv_tokens_needed(points[2], grid, 128)
    assert window.is_larger_or_equal(points[1])  # skipped when a smaller decode point ran out of memory
    once = build_points(GridSpec(decode_windows=1), (), 32768, 2048)[0]
    twice = [p.point_id for p in build_points(GridSpec(decode_windows=2), (), 32768, 2048)[0]]
    decode = [p.point_id for p in once if p.phase == "decode"]
    assert len(twice) == len(once) + len(decode)
    assert {f"{p}/window1" for p in decode} <= set(twice)


def test_points_the_engine_cannot_build_are_left_out_with_a_reason():
    grid = GridSpec(prefill_chunks=(512, 4096), prefill_contexts=(0, 7000), decode_batches=(1,),
                    decode_contexts=(128, 9000))
    points, left_out = build_points(grid, ("prefix", "spec"), max_model_len=8192, max_num_batched_tokens=2048)
    reasons = {p["point_id"]: p["reason"] for p in left_out}
    assert "max_num_batched_tokens 2048" in reasons["prefill/chunk4096/context0"]
    assert "max_model_len 8192" in reasons["prefill/chunk4096/context7000"] or \
        "max_num_batched_tokens" in reasons["prefill/chunk4096/context7000"]
    assert "max_model_len" in reasons["decode/batch1/context9000"]
    assert "prefill/chunk512/context7000" in [p.point_id for p in points]
    phases = {p.phase for p in points}
    assert {"prefix", "spec"} <= phases


def test_larger_points_are_recognised():
    points, _ = build_points(GridSpec(), (), 32768, 2048)
    by_id = {p.point_id: p for p in points}
    oom = by_id["decode/batch4/context4096"]
    assert by_id["decode/batch4/context16384"].is_larger_or_equal(oom) if "decode/batch4/context16384" in by_id else True
    assert by_id["decode/batch16/context1024"].is_larger_or_equal(by_id["decode/batch4/context1024"])
    assert not by_id["decode/batch1/context16384"].is_larger_or_equal(oom)
    assert not by_id["prefill/chunk2048/context8192"].is_larger_or_equal(oom)  # other phase


def test_kv_tokens_needed_counts_whole_blocks_per_request():
    grid = GridSpec(repeats=3)
    points, _ = build_points(grid, (), 32768, 2048)
    decode = next(p for p in points if p.point_id == "decode/batch4/context1024")
    assert kv_tokens_needed(decode, grid, block_size=128) == 4 * 9 * 128  # 1024 + 10 tokens -> 9 blocks
    prefill = next(p for p in points if p.point_id == "prefill/chunk512/context4096")
    assert kv_tokens_needed(prefill, grid, block_size=128) == 37 * 128


def test_shape_points_come_last_with_odd_counts_the_grid_never_uses():
    grid = GridSpec.from_dict({"prefill_chunks": [32, 512], "shapes": {"budget_shares": [0.05, 0.55, 1.0]}})
    points, left_out = build_points(grid, (), max_model_len=1000, max_num_batched_tokens=2048)
    shapes = [p for p in points if p.phase == "shapes"]
    assert points[-len(shapes):] == shapes  # after every other point
    counts = [p.param("tokens") for p in shapes]
    assert counts == [103, 105]  # 5% of 2048 -> 103 and 103 + 2; 55% (1127) exceeds max_model_len
    # 100% of the budget: 2049 and 2051 exceed it, so no point
    assert [p["point_id"] for p in left_out if p["phase"] == "shapes"] == ["shapes/tokens1127", "shapes/tokens1129"]
    assert not set(counts) & set(grid.prefill_chunks)
    assert kv_tokens_needed(shapes[0], grid, block_size=128) == 128
    off = GridSpec.from_dict({"shapes": {"enabled": False}})
    assert not [p for p in build_points(off, (), 32768, 2048)[0] if p.phase == "shapes"]
    # an engine without per-shape set-up (vLLM's torch fallback): the points are left out, saying why
    points, left_out = build_points(grid, (), max_model_len=32768, max_num_batched_tokens=2048, shape_cache=False)
    assert not [p for p in points if p.phase == "shapes"]
    assert [p["point_id"] for p in left_out] == [f"shapes/tokens{n}" for n in (103, 105, 1127, 1129)]
    assert all("not oneDNN" in p["reason"] for p in left_out)


@pytest.mark.parametrize("data, field", [
    ({"shapes": {"budget_shares": [0.0]}}, "grid.shapes.budget_shares"),
    ({"shapes": {"warm_repeats": 0}}, "grid.shapes.warm_repeats"),
    ({"shapes": {"enabled": "yes"}}, "grid.shapes.enabled"),
    ({"repeats": 0}, "grid.repeats"),
    ({"decode_windows": 0}, "grid.decode_windows"),
    ({"decode_batches": []}, "grid.decode_batches"),
    ({"bogus": 1}, "grid.bogus"),
    ({"mixed": {"requests": 3, "speed": 2}}, "grid.mixed.speed"),
    ({"repeats": "3"}, "grid.repeats"),
    ({"spec": {"batches": [1, 2.5]}}, "grid.spec.batches"),
])
def test_bad_grids_name_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        GridSpec.from_dict(data)
    assert err.value.field == field
