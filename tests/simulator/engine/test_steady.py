"""SteadyScheduler makes NativeScheduler's decisions, step for step, with steady decoders kept lazily."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.engine.loop import Engine
from simulator.engine.native import NativeScheduler
from simulator.engine.steady import SteadyScheduler
from simulator.engine.tabulate import tabulate
from simulator.records.engine_config import EngineConfig
from simulator.records.metrics import SLO
from tests.simulator.conftest import VectorLinearModel, make_workload


def run_engine(workload, cfg, factory, async_scheduling, stop_after=None):
    """Step by step (no runs of identical steps), with the given scheduler; optionally
    stopped once ``stop_after`` requests have finished."""
    perf = VectorLinearModel()
    kv = perf.kv_capacity(cfg.block_size, cfg.gpu_memory_utilization, cfg.num_gpu_blocks_override)
    engine = Engine(workload, cfg, perf, kv, async_scheduling=async_scheduling, scheduler_factory=factory,
                    fast=False, keep_decisions=True)
    if stop_after is not None:
        done = [0]

        def progress(n):
            done[0] += n
            if done[0] >= stop_after:
                engine.request_stop()

        engine.on_progress = progress
    run = engine.run()
    return engine, run, tabulate(run, workload, SLO())


def assert_same_decisions(native, steady):
    """Every step schedules the same requests (listed or steady) with the same batch."""
    assert len(native) == len(steady)
    for a, b in zip(native, steady, strict=True):
        assert a.step == b.step
        assert (a.preempted, a.new, a.resumed) == (b.preempted, b.new, b.resumed), a.step
        assert len(a.num_scheduled) == len(b.num_scheduled) + b.num_steady, a.step
        assert all(a.num_scheduled[rid] == n for rid, n in b.num_scheduled.items()), a.step
        assert sum(a.num_scheduled.values()) == sum(b.num_scheduled.values()) + b.num_steady, a.step
        x, y = a.batch, b.batch
        assert (x.prefill_tokens, x.prefill_context) == (y.prefill_tokens, y.prefill_context), a.step
        assert (len(x.decode_context), sum(x.decode_context)) == (len(y.decode_context), sum(y.decode_context))


def assert_same_results(a, b):
    for table in ("requests", "timeline"):
        x, y = getattr(a, table), getattr(b, table)
        for key in x:
            if x[key].dtype.kind == "f" and key != "kv_block_seconds":  # (block-seconds: exact tick sums)
                np.testing.assert_allclose(y[key], x[key], rtol=1e-12, atol=1e-12, err_msg=f"{table}.{key}")
            else:
                np.testing.assert_array_equal(y[key], x[key], err_msg=f"{table}.{key}")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    seed=st.integers(0, 10_000),
    rate=st.floats(0.2, 40),
    blocks=st.sampled_from([None, 40, 90, 200]),
    max_num_seqs=st.sampled_from([2, 8, 256]),
    budget=st.sampled_from([24, 300, 8192]),
    prefix=st.booleans(),
    groups=st.sampled_from([0, 3]),
    max_model_len=st.sampled_from([704, 2048]),
    async_scheduling=st.booleans(),
)
def test_steady_scheduler_decides_as_the_native_one(n, seed, rate, blocks, max_num_seqs, budget, prefix,
                                                     groups, max_model_len, async_scheduling):
    # varied pressure: short and long decodes, KV caches that force preemptions, budgets that
    # cut the running requests short, shared prefixes, outputs that hit max_model_len
    w = make_workload(n=n, seed=seed, rate=rate, prompt=(1, 500), output=(1, 900),
                      prefix_groups=groups, prefix_tokens=48 if groups else 0)
    cfg = EngineConfig(num_gpu_blocks_override=blocks, max_model_len=max_model_len,
                       max_num_seqs=min(max_num_seqs, budget), max_num_batched_tokens=budget,
                       enable_prefix_caching=prefix)
    native, _, a = run_engine(w, cfg, NativeScheduler, async_scheduling)
    steady, _, b = run_engine(w, cfg, SteadyScheduler, async_scheduling)
    assert_same_decisions(native.decisions, steady.decisions)
    assert_same_results(a, b)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_most_decode_work_is_steady_under_load(async_scheduling):
    # 120 long decodes at once, a KV cache that preempts: the point is that nearly every
    # request-step is handled without per-request work, and the results still agree
    w = make_workload(n=120, seed=5, rate=200, prompt=(50, 400), output=(200, 1500))
    cfg = EngineConfig(num_gpu_blocks_override=2500, max_model_len=4096)
    native, _, a = run_engine(w, cfg, NativeScheduler, async_scheduling)
    steady, _, b = run_engine(w, cfg, SteadyScheduler, async_scheduling)
    assert a.summary["preemptions"] > 0
    assert_same_decisions(native.decisions, steady.decisions)
    assert_same_results(a, b)
    listed = sum(len(out.num_scheduled) for out in steady.decisions)
    lazy = sum(out.num_steady for out in steady.decisions)
    assert lazy > 8 * listed


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_stopped_run_reports_steady_requests_as_they_are(async_scheduling):
    # stopped mid-run: the unfinished requests' tokens and times are brought up to date
    w = make_workload(n=30, seed=9, rate=20, output=(300, 900))
    cfg = EngineConfig(num_gpu_blocks_override=400, max_model_len=2048)
    _, run_a, a = run_engine(w, cfg, NativeScheduler, async_scheduling, stop_after=8)
    _, run_b, b = run_engine(w, cfg, SteadyScheduler, async_scheduling, stop_after=8)
    assert len(run_a.requests) == len(run_b.requests)
    assert any(r.status.name == "RUNNING" and r.num_output > 0 for r in run_b.requests)
    for x, y in zip(run_a.requests, run_b.requests, strict=True):
        assert (x.status, x.num_output, x.num_computed, x.last_token_s) == \
               (y.status, y.num_output, y.num_computed, y.last_token_s), x.rid
    assert_same_results(a, b)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    blocks=st.sampled_from([None, 400, 1500]),
    prefix=st.booleans(),
    async_scheduling=st.booleans(),
)
def test_steady_decoders_and_decode_runs_together_match_the_step_by_step_path(seed, blocks, prefix,
                                                                                async_scheduling):
    # many requests at once: the fast path alternates runs of identical steps with steady
    # decoders (and hands requests from one to the other) and must still give the reference results
    from simulator.engine.loop import simulate

    w = make_workload(n=90, seed=seed, rate=60, prompt=(20, 400), output=(50, 1200),
                      prefix_groups=3 if prefix else 0, prefix_tokens=48 if prefix else 0)
    cfg = EngineConfig(num_gpu_blocks_override=blocks, max_model_len=2048, enable_prefix_caching=prefix)
    slow = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False)
    fast = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    assert slow.summary["steps"] == fast.summary["steps"]
    assert_same_results(slow, fast)


def test_the_fast_path_uses_both_mechanisms_under_load(monkeypatch):
    # prompts prefilled in 64-token chunks while many others decode: steps runs cannot cover
    w = make_workload(n=90, seed=1, rate=60, prompt=(20, 400), output=(50, 1200))
    cfg = EngineConfig(num_gpu_blocks_override=1500, max_model_len=2048, long_prefill_token_threshold=64)
    perf = VectorLinearModel()
    kv = perf.kv_capacity(cfg.block_size, cfg.gpu_memory_utilization, cfg.num_gpu_blocks_override)
    scheduled = []
    schedule = SteadyScheduler.schedule
    monkeypatch.setattr(SteadyScheduler, "schedule", lambda self: scheduled.append(1) or schedule(self))
    engine = Engine(w, cfg, perf, kv, fast=True)
    run = engine.run()
    assert isinstance(engine.scheduler, SteadyScheduler)
    steps = len(run.steps)
    assert len(scheduled) < steps / 3  # most steps come from runs of identical steps
    assert engine.scheduler.steady_request_steps > 500  # and steady decoders carry the ordinary ones
