"""Coverage without blind extrapolation: KV heads beyond the tables scale by bytes; extrapolations are counted."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.catalog import load_model
from calibration.composed import ComposedPerformanceModel, TableKernels
from calibration.kernel_tables import AttentionTable
from simulator.records.performance import StepBatch

BATCH = np.array([1.0, 2.0, 4.0, 8.0])
LENGTH = np.array([128.0, 512.0, 2048.0])
KV_HEADS = (1, 2, 4, 8)


def bytes_table(fixed_ms: float = 0.0) -> AttentionTable:
    """A decode table whose time is ``fixed_ms`` plus a time exactly proportional to the KV bytes read."""
    cell = BATCH[:, None] * LENGTH[None, :] * 1e-5
    slices = {(32, kv, "bfloat16"): fixed_ms + cell * kv for kv in KV_HEADS}
    return AttentionTable("generation", BATCH, LENGTH, slices)


def test_kv_heads_beyond_the_table_scale_by_bytes():
    table = bytes_table()
    got = table.grid(32, 32, "bf16").ms
    top = table.slices[(32, 8, "bfloat16")]
    np.testing.assert_allclose(got, top * 32 / 8, rtol=1e-9)
    # the old rule (the grid's minimum as a floor, the rest scaled by the row index) is not bytes-proportional
    old = top.min() + (top - top.min()) * 32 / 8
    assert not np.allclose(got, old, rtol=1e-3)


def test_a_fixed_cost_is_not_multiplied():
    fixed = 0.05
    got = bytes_table(fixed).grid(32, 32, "bf16").ms
    expected = fixed + BATCH[:, None] * LENGTH[None, :] * 1e-5 * 32
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_inside_the_measured_kv_heads_nothing_changes():
    table = bytes_table()
    np.testing.assert_array_equal(table.grid(32, 4, "bf16").ms, table.slices[(32, 4, "bfloat16")])
    assert table.kv_heads_measured("bf16") == 8


@pytest.fixture(scope="module")
def llama2_h100(h100_tables, h100):
    """Llama-2-7B: 32 KV heads (MHA), beyond the tables' 8."""
    return ComposedPerformanceModel(load_model("llama-2-7b"), h100, TableKernels(h100_tables, h100))


def fresh_counts(pm) -> None:
    for key in pm.extrapolations:
        pm.extrapolations[key] = 0


def test_queries_inside_the_tables_count_nothing(qwen7b_h100):
    pm = qwen7b_h100
    fresh_counts(pm)
    pm.step_time(StepBatch([512], [0], [1024] * 8))
    pm.decode_times(16, np.array([16 * 1000.0, 16 * 2000.0]))
    pm.step_time_arrays(np.array([256]), np.array([0]), np.array([4]), np.array([1000.0]))
    assert sum(pm.extrapolations.values()) == 0
    assert pm.describe()["extrapolated_queries"] == {}


def test_queries_outside_the_tables_are_counted(qwen7b_h100):
    pm = qwen7b_h100
    r = pm.measured_range
    fresh_counts(pm)
    seqs = int(r.decode_batch) * 2
    pm.step_time(StepBatch([], [], [100] * seqs))
    assert pm.extrapolations["decode_batch"] == 1
    pm.step_time(StepBatch([], [], [int(r.decode_context) * 2]))
    assert pm.extrapolations["decode_context"] == 1
    pm.step_time(StepBatch([int(r.prefill_length) * 2], [0], []))
    assert pm.extrapolations["prefill_length"] == 1
    pm.decode_times(1, np.array([r.decode_context * 4, 10.0, r.decode_context * 3]))
    assert pm.extrapolations["decode_context"] == 3
    assert pm.describe()["extrapolated_queries"]["decode_context"] == 3
    fresh_counts(pm)


def test_mha_model_counts_every_attention_query(llama2_h100):
    pm = llama2_h100
    assert pm.measured_range.decode_kv_heads_beyond
    fresh_counts(pm)
    pm.step_time(StepBatch([], [], [512] * 4))
    pm.step_time_arrays(np.array([0, 128]), np.array([0, 0]), np.array([2, 3]), np.array([300.0, 300.0]))
    pm.decode_times(4, np.array([2000.0, 4000.0]))
    assert pm.extrapolations["decode_kv_heads"] == 1 + 2 + 2
    assert pm.describe()["extrapolated_queries"]["decode_kv_heads"] == 5


def test_mha_attention_is_never_below_the_measured_rows(h100_tables):
    """More KV heads read more bytes: the 32-head grid is at least the largest measured (8-head) one."""
    for table in (h100_tables.generation,):
        new = table.grid(32, 32, "bf16").ms
        assert np.all(new >= table._at_kv(32, 8, "bfloat16"))


def test_decode_attention_is_never_faster_than_reading_the_kv(qwen7b_h100):
    """The decode-attention floor: the batch's KV read once at the achievable bandwidth."""
    pm = qwen7b_h100
    for seqs, kv in ((1, 100), (64, 4096), (256, 4096), (1024, 32768)):
        attention = pm.components(StepBatch([], [], [kv] * seqs))["generation_attention"]
        assert attention >= seqs * kv * pm.kv_read_s_per_token * (1 - 1e-9)


def test_calibration_list_shows_kv_head_extrapolation():
    from calibration.cmd_list import rows
    from simulator.records.engine_config import EngineConfig

    table = {r["model"]: r["extrapolated"] for r in rows(["h100"], ["llama-2-7b", "r1-distill-qwen-7b"],
                                                           ["none"], [1], "auto", EngineConfig(), False)}
    assert table["llama-2-7b"].startswith("decode kv_heads 32>8")
    assert table["r1-distill-qwen-7b"] == "-"
