"""The fast path gives the step-by-step path's results (issue 5's differential test)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.engine import simulate
from simulator.engine_config import EngineConfig
from tests.simulator.conftest import VectorLinearModel, make_workload


def assert_same(slow, fast):
    assert slow.summary["steps"] == fast.summary["steps"]
    for table in ("requests", "timeline"):
        a, b = getattr(slow, table), getattr(fast, table)
        for key in a:
            x, y = a[key], b[key]
            if x.dtype.kind == "f":
                np.testing.assert_allclose(y, x, rtol=1e-9, atol=1e-9, err_msg=f"{table}.{key}")
            else:
                np.testing.assert_array_equal(y, x, err_msg=f"{table}.{key}")


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("blocks", [None, 300])
def test_fast_path_matches_step_by_step_on_reasoning_lengths(async_scheduling, blocks):
    w = make_workload(n=60, seed=3, rate=2, output=(1, 3000))
    cfg = EngineConfig(num_gpu_blocks_override=blocks, max_model_len=8192)
    slow = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False)
    fast = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    assert_same(slow, fast)
    if blocks:
        assert slow.summary["preemptions"] > 0  # the case covers preemption


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    seed=st.integers(0, 1000),
    rate=st.floats(0.2, 30),
    blocks=st.sampled_from([None, 60, 150]),
    max_num_seqs=st.sampled_from([2, 8, 256]),
    budget=st.sampled_from([32, 512, 8192]),
    prefix=st.booleans(),
    groups=st.sampled_from([0, 3]),
    async_scheduling=st.booleans(),
)
def test_fast_path_matches_on_varied_workloads(n, seed, rate, blocks, max_num_seqs, budget, prefix,
                                                groups, async_scheduling):
    w = make_workload(n=n, seed=seed, rate=rate, prompt=(1, 700), output=(1, 900),
                      prefix_groups=groups, prefix_tokens=48 if groups else 0)
    cfg = EngineConfig(num_gpu_blocks_override=blocks, max_model_len=2048, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=budget, enable_prefix_caching=prefix)
    slow = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False)
    fast = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    assert_same(slow, fast)
