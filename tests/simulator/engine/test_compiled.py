"""The compiled engine gives the step-by-step path's results, bit for bit (the differential test),
and the engine takes it where it applies and pays."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.engine import compiled
from simulator.engine.loop import Engine, simulate
from simulator.engine.run_log import StepLog
from simulator.records.engine_config import EngineConfig
from tests.simulator.conftest import VectorLinearModel, assert_identical, make_workload

pytestmark = pytest.mark.skipif(not compiled.available(), reason="numba is not installed")


def both(w, cfg, perf, async_scheduling):
    slow = simulate(w, cfg, perf, async_scheduling=async_scheduling, fast=False)
    fast = simulate(w, cfg, perf, async_scheduling=async_scheduling, compiled=True)
    assert fast.engine_path == "compiled"
    assert slow.engine_path == "step by step"
    return slow, fast


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("blocks", [None, 700])
def test_compiled_matches_step_by_step_on_reasoning_lengths(composed, async_scheduling, blocks):
    w = make_workload(n=80, seed=3, rate=4, output=(1, 3000))
    cfg = EngineConfig(num_gpu_blocks_override=blocks, max_model_len=8192)
    slow, fast = both(w, cfg, composed, async_scheduling)
    assert_identical(slow, fast)
    if blocks:  # the case covers preemption and a preempted request's hits on its own blocks
        assert slow.summary["preemptions"] > 0
        assert slow.summary["prefix_cache"]["hit_tokens"] == 0  # (first admissions only count)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 60),
    seed=st.integers(0, 1000),
    rate=st.floats(0.2, 40),
    blocks=st.sampled_from([None, 40, 120, 400]),
    max_num_seqs=st.sampled_from([1, 3, 16, 256]),
    budget=st.sampled_from([16, 100, 512, 8192]),
    caching=st.booleans(),
    chunked=st.booleans(),
    async_scheduling=st.booleans(),
    threshold=st.sampled_from([0, 0, 64]),
    max_len=st.sampled_from([1024, 2048]),
    timeout=st.sampled_from([None, None, 0.5, 3.0]),
    groups=st.sampled_from([0, 0, 1, 4]),
    outer=st.booleans(),
)
def test_compiled_matches_on_varied_workloads(composed, n, seed, rate, blocks, max_num_seqs, budget, caching,
                                              chunked, async_scheduling, threshold, max_len, timeout, groups, outer):
    w = make_workload(n=n, seed=seed, rate=rate, prompt=(1, 900), output=(1, 1200), prefix_groups=groups,
                      prefix_tokens=100 if groups else 0)
    if groups and outer:  # two-level sharing: the first 40 tokens of every prefix are group 99's
        w = dataclasses.replace(w, outer_group=np.full(n, 99), outer_tokens=np.full(n, 40))
    if timeout is not None:  # clients giving up, some of them (aborts: waiting, running, preempted)
        w = dataclasses.replace(w, timeout_s=np.where(np.arange(n) % 3 == 0, np.inf, timeout * (1 + np.arange(n) % 4)))
    if not chunked:  # (vLLM: without chunked prefill a whole prompt must fit the budget)
        budget = max(budget, max_len)
    cfg = EngineConfig(num_gpu_blocks_override=blocks, max_model_len=max_len,
                       max_num_seqs=min(max_num_seqs, budget), max_num_batched_tokens=budget,
                       enable_prefix_caching=caching, enable_chunked_prefill=chunked,
                       long_prefill_token_threshold=threshold)
    slow, fast = both(w, cfg, composed, async_scheduling)
    assert_identical(slow, fast)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_shared_prefixes_hit_as_on_the_step_by_step_path(composed, async_scheduling):
    """Requests sharing prefixes (two levels) hit each other's blocks, copies are evicted, and
    preempted requests come back to their own and the shared blocks."""
    w = make_workload(n=150, seed=8, rate=25, prompt=(300, 1500), output=(50, 1500), prefix_groups=5,
                      prefix_tokens=256)
    w = dataclasses.replace(w, outer_group=np.where(np.arange(len(w)) % 2 == 0, 7, -1), outer_tokens=np.full(len(w), 64))
    slow, fast = both(w, EngineConfig(num_gpu_blocks_override=500), composed, async_scheduling)
    assert slow.summary["prefix_cache"]["hit_tokens"] > 0 and slow.summary["preemptions"] > 0
    assert_identical(slow, fast)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_client_timeouts_abort_as_on_the_step_by_step_path(composed, async_scheduling):
    w = make_workload(n=120, seed=9, rate=30, output=(200, 2000))
    w = dataclasses.replace(w, timeout_s=np.where(np.arange(len(w)) % 2 == 0, np.inf, 4.0))
    slow, fast = both(w, EngineConfig(num_gpu_blocks_override=400), composed, async_scheduling)
    assert (slow.requests["status"] == "aborted").sum() > 5 and slow.summary["preemptions"] > 0
    assert_identical(slow, fast)


def test_rejected_requests_and_a_lone_request(composed):
    """Requests too long for the KV cache are rejected at their arrival, as on the Python path."""
    w = make_workload(n=30, seed=5, rate=2, prompt=(100, 3000), output=(1, 2000))
    cfg = EngineConfig(num_gpu_blocks_override=150, max_model_len=8192)
    slow, fast = both(w, cfg, composed, True)
    assert (slow.requests["status"] == "rejected").any()
    assert_identical(slow, fast)
    one = make_workload(n=1, seed=1)
    assert_identical(*both(one, EngineConfig(), composed, False))


def test_extrapolations_counted_as_step_time_counts_them(composed):
    """Steps beyond the measured range count on the model as ``step_time`` counts them."""
    w = make_workload(n=12, seed=2, rate=5, prompt=(30000, 40000), output=(1, 50))  # long prompts' chunks
    cfg = EngineConfig(max_model_len=65536)
    counts = []
    for path in ({"fast": False}, {"compiled": True}):
        composed.extrapolations = dict.fromkeys(composed.extrapolations, 0)
        simulate(w, cfg, composed, **path)
        counts.append(dict(composed.extrapolations))
    assert counts[0] == counts[1]
    assert sum(counts[0].values()) > 0


@pytest.mark.parametrize("case, reason", [
    ("speculative", "speculative decoding"),
    ("no tables", "gives no step-time tables"),
])
def test_runs_it_cannot_cover_take_the_python_path(composed, case, reason):
    w = make_workload(n=20, seed=1)
    cfg, perf = EngineConfig(), composed
    if case == "speculative":
        cfg = EngineConfig.from_dict({"speculative": {"method": "ngram", "num_speculative_tokens": 2,
                                                         "acceptance_rate": [0.6, 0.4]}})
    else:
        perf = VectorLinearModel()
    result = simulate(w, cfg, perf, compiled=True)
    assert result.engine_path == "fast"
    assert reason in result.not_compiled


def test_auto_compiles_heavy_runs_only(composed):
    """"auto" compiles a run of many requests that offers more than the replica decodes, not a
    light one nor a small one."""
    cfg = EngineConfig(max_model_len=8192, max_num_seqs=64)
    heavy = make_workload(n=compiled.AUTO_MIN_REQUESTS, seed=4, rate=200, prompt=(50, 300), output=(1, 600))
    light = dataclasses.replace(heavy, arrival_s=heavy.arrival_s * 1000)
    small = heavy.select(np.arange(compiled.AUTO_MIN_REQUESTS - 1))
    engine = Engine(heavy, cfg, composed, composed.kv_capacity(16, num_gpu_blocks_override=None))
    assert compiled.offered_load(heavy, cfg, engine.kv_capacity, composed) > 1
    assert simulate(heavy, cfg, composed).engine_path == "compiled"
    assert simulate(light, cfg, composed).engine_path == "fast"
    assert simulate(small, cfg, composed).engine_path == "fast"
    assert simulate(heavy, cfg, composed, compiled=False).engine_path == "fast"
    assert simulate(heavy, cfg, composed, fast=False).engine_path == "step by step"


def test_progress_and_a_stop_between_steps(composed):
    """The compiled run reports finishes as they come and stops at a step boundary when asked,
    keeping what it simulated."""
    w = make_workload(n=400, seed=6, rate=20, output=(50, 800))
    cfg = EngineConfig(num_gpu_blocks_override=300)
    kv = composed.kv_capacity(cfg.block_size, num_gpu_blocks_override=cfg.num_gpu_blocks_override)
    seen = []
    engine = Engine(w, cfg, composed, kv, on_progress=seen.append, compiled=True)
    run = engine.run()
    assert engine.took_compiled and sum(seen) == len(w) and len(seen) > 10

    def stop_soon(n):
        if engine.on_progress is not None:
            engine.request_stop()

    engine = Engine(w, cfg, composed, kv, on_progress=stop_soon, compiled=True)
    partial = engine.run()
    assert engine.interrupted
    statuses = [r.status for r in partial.requests]
    assert any(s < 3 for s in statuses)  # some still unfinished
    ends = partial.steps.columns()["end_s"]
    assert len(ends) and np.all(np.diff(ends) >= 0) and len(ends) < len(run.steps.columns()["end_s"])


def test_the_engine_drives_it_through_the_scheduler_interface(composed):
    """The compiled scheduler is a Scheduler the engine drives with ``advance`` alone: the runs'
    rows make the step log, the clock ends where the last run ends, and the interface's state
    (running, waiting, KV usage) is the kernel's."""
    from simulator.engine.interface import Scheduler, StepScheduler

    w = make_workload(n=300, seed=8, rate=30, output=(20, 900))
    cfg = EngineConfig(num_gpu_blocks_override=200, max_num_seqs=16)
    kv = composed.kv_capacity(cfg.block_size, num_gpu_blocks_override=cfg.num_gpu_blocks_override)
    engine = Engine(w, cfg, composed, kv, compiled=True, on_progress=lambda n: None)
    sched = engine.scheduler
    assert isinstance(sched, compiled.CompiledScheduler) and isinstance(sched, Scheduler)
    assert not isinstance(sched, StepScheduler) and engine.took_compiled  # (never asked for one step)
    runs, states = [], []
    advance = sched.advance

    def watched(*args, **kwargs):
        adv = advance(*args, **kwargs)
        if adv is not None:
            runs.append(adv)
            states.append((sched.num_running, sched.num_waiting, sched.kv.num_used_blocks))
        return adv

    sched.advance = watched
    run = engine.run()
    assert len(runs) > 10  # (progress: a run per 1% of the requests finished)
    assert sum(adv.k for adv in runs) == len(run.steps)
    cols = run.steps.columns()
    rows = np.cumsum([adv.k for adv in runs]) - 1
    for adv, row, (running, waiting, used) in zip(runs, rows, states, strict=True):
        if adv.k:  # each run's last row is the state it paused in
            assert (cols["running"][row], cols["waiting"][row], cols["kv_blocks_used"][row]) == (
                running, waiting, used)
    assert engine.env.now == run.end_s == runs[-1].end_s
    assert sum(len(adv.finished) for adv in runs) == sum(r.status == 3 for r in run.requests)
    assert not sched.has_requests() and sched.advance(engine.env.now) is None
    assert max(cols["waiting"]) > 0 and sum(cols["preempted"]) > 0  # (the case queues and preempts)


def test_a_run_leaves_the_engine_cached(composed):
    """After a compiled run numba finds the engine in its cache (no compile note next time)."""
    simulate(make_workload(n=5, seed=1), EngineConfig(), composed, compiled=True)
    assert not compiled.cold()


def test_step_log_joins_steps_given_whole_after_single_steps():
    log = StepLog()
    log.add_step(0.0, 1.0, 5, 1, 0, 10, 0, 1, 0)
    times = np.array([[2.0, 1.0], [3.0, 1.0]])
    counts = np.array([[6, 2, 1, 0, 2, 2, 0], [7, 2, 0, 0, 2, 2, 1]])
    log.add_columns(times, counts)
    log.add_step(3.0, 4.5, 8, 3, 0, 0, 3, 3, 0)
    cols = log.columns()
    assert len(log) == 4
    np.testing.assert_array_equal(cols["end_s"], [1.0, 2.0, 3.0, 4.5])
    np.testing.assert_array_equal(cols["kv_blocks_used"], [5, 6, 7, 8])
    np.testing.assert_array_equal(cols["running"], [1, 2, 2, 3])
    np.testing.assert_array_equal(cols["preempted"], [0, 0, 1, 0])
    np.testing.assert_array_equal(cols["decode_tokens"], [0, 2, 2, 3])


@pytest.mark.parametrize("switch, path", [("compiled=true", "compiled"), ("compiled=false", "fast")])
def test_command_line_switch_and_the_path_in_the_metadata(tmp_path, switch, path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    cmd = [sys.executable, "-m", "simulator", f"hydra.run.dir={tmp_path}", "progress=false", "plots=false",
           "workload=gamma", "workload.num_requests=30", switch]
    subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True, timeout=300)
    assert json.loads((tmp_path / "summary.json").read_text())["metadata"]["engine_path"] == path
