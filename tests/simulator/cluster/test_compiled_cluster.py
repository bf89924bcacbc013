"""The compiled cluster gives the Python cluster's tables and summaries, bit for bit, and the
cluster takes it where it applies and pays."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.cluster import ClusterSpec, simulate_cluster
from simulator.cluster.compiled_cluster import CompiledCluster
from simulator.engine import compiled
from simulator.records.engine_config import EngineConfig
from simulator.records.metrics import SLO
from tests.simulator.conftest import assert_identical, make_workload

pytestmark = pytest.mark.skipif(not compiled.available(), reason="numba is not installed")

ROUTERS = ["round_robin", "least_outstanding", "least_kv", "prefix_affinity", "power_of_two"]


def both(w, cfg, perf, spec, async_scheduling):
    slow = simulate_cluster(w, cfg, perf, spec, fast=False, async_scheduling=async_scheduling, compiled=False)
    fast = simulate_cluster(w, cfg, perf, spec, async_scheduling=async_scheduling, compiled=True)
    assert (slow.engine_path, fast.engine_path) == ("python", "compiled"), fast.not_compiled
    return slow, fast


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize(("async_scheduling", "staleness"), [(False, 0.0), (True, 0.0), (True, 0.5)])
def test_compiled_cluster_equals_the_step_by_step_cluster(composed, router, async_scheduling, staleness):
    w = make_workload(n=150, seed=3, rate=8, output=(1, 2000), prefix_groups=3, prefix_tokens=64)
    cfg = EngineConfig(num_gpu_blocks_override=500, max_model_len=2048)  # (some too long: rejected)
    slow, fast = both(w, cfg, composed, ClusterSpec(replicas=3, router=router, staleness_s=staleness),
                      async_scheduling)
    assert_identical(slow.result, fast.result)
    for a, b in zip(slow.replicas, fast.replicas, strict=True):
        assert_identical(a, b)
    summary = slow.result.summary
    assert summary["preemptions"] > 0 and summary["rejected"] > 0  # the case covers both
    assert summary["prefix_cache"]["hit_tokens"] > 0


def test_block_tables_grow_as_requests_are_routed(composed, monkeypatch):
    """A replica's block tables and rows start small and grow as requests come (prefix caching's
    names and the waiting queue, a ring, too)."""
    monkeypatch.setattr(compiled, "ROUTED_ROOM", 8)
    monkeypatch.setattr(compiled, "ROUTED_ROWS", 2)
    w = make_workload(n=120, seed=9, rate=10, output=(1, 1500), prefix_groups=2, prefix_tokens=64)
    cfg = EngineConfig(num_gpu_blocks_override=200, max_model_len=4096, max_num_seqs=8)  # (queues)
    slow, fast = both(w, cfg, composed, ClusterSpec(replicas=2, router="least_kv"), True)
    assert_identical(slow.result, fast.result)


def test_growing_rows_keeps_the_waiting_queue_in_order(composed, monkeypatch):
    """The waiting queue is a ring: grown, it keeps its order from its head (which wrapped)."""
    from simulator.engine import compiled_kernel as k

    monkeypatch.setattr(compiled, "ROUTED_ROWS", 4)
    w = make_workload(n=10, seed=1)
    cfg = EngineConfig()
    kv = composed.kv_capacity(cfg.block_size, num_gpu_blocks_override=None)
    sched = compiled.CompiledScheduler(cfg, kv, w, composed, async_scheduling=True,
                                       rows=compiled.RequestRows.of(w, cfg, kv), routed=True)
    ring = sched._arrays["waiting"]  # the queue 7, 8, 9 with its head at the ring's last slot
    ring[3], ring[0], ring[1] = 7, 8, 9
    sched._S[k.WHEAD], sched._S[k.WLEN] = 3, 3
    sched._grow_rows(8)
    grown = sched._arrays["waiting"]
    assert len(grown) == 8 and [k._wait_at(sched._S, grown, i) for i in range(3)] == [7, 8, 9]
    assert len(sched._arrays["ri"]) == 8 and (sched._arrays["ri"][4:, k.STATUS] == k.NOT_ARRIVED).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 60),
    seed=st.integers(0, 1000),
    rate=st.floats(0.5, 40),
    replicas=st.integers(2, 4),
    router=st.sampled_from(ROUTERS),
    staleness=st.sampled_from([0.0, 0.3, 1.0]),
    async_scheduling=st.booleans(),
    blocks=st.sampled_from([None, 60, 200]),
    max_num_seqs=st.sampled_from([2, 16, 256]),
    caching=st.booleans(),
    groups=st.sampled_from([0, 2]),
)
def test_compiled_cluster_matches_on_varied_clusters(composed, n, seed, rate, replicas, router, staleness,
                                                     async_scheduling, blocks, max_num_seqs, caching, groups):
    w = make_workload(n=n, seed=seed, rate=rate, output=(1, 1200), prefix_groups=groups, prefix_tokens=48)
    cfg = EngineConfig(num_gpu_blocks_override=blocks, max_model_len=4096, max_num_seqs=max_num_seqs,
                       enable_prefix_caching=caching)
    slow, fast = both(w, cfg, composed, ClusterSpec(replicas=replicas, router=router, staleness_s=staleness),
                      async_scheduling)
    assert_identical(slow.result, fast.result)


@pytest.mark.parametrize("case, reason", [
    ("timeouts", "client timeouts"),
    ("disaggregated", "disaggregation"),
    ("speculative", "speculative decoding"),
])
def test_clusters_it_cannot_cover_take_the_python_path(composed, case, reason):
    w = make_workload(n=30, seed=1)
    cfg, spec = EngineConfig(max_model_len=8192), ClusterSpec(replicas=2, router="least_kv")
    if case == "timeouts":
        w = dataclasses.replace(w, timeout_s=np.full(len(w), 30.0))
    elif case == "disaggregated":
        spec = ClusterSpec(prefill_replicas=1, decode_replicas=1, link_gbps=50.0)
    else:
        cfg = EngineConfig.from_dict({"max_model_len": 8192, "speculative": {
            "method": "ngram", "num_speculative_tokens": 2, "acceptance_rate": [0.6, 0.4]}})
    out = simulate_cluster(w, cfg, composed, spec, compiled=True)
    assert out.engine_path == "python" and reason in out.not_compiled


def test_auto_compiles_clusters_whose_router_reads_reports(composed):
    cfg = EngineConfig(max_model_len=8192)
    w = make_workload(n=compiled.AUTO_MIN_REQUESTS, seed=4, rate=2, prompt=(50, 300), output=(1, 200))
    assert simulate_cluster(w, cfg, composed, ClusterSpec(replicas=2, router="least_kv")).engine_path == "compiled"
    light = simulate_cluster(w, cfg, composed, ClusterSpec(replicas=2, router="round_robin"))
    assert light.engine_path == "python"  # (reads no reports, and the load is light: the fast path)
    small = w.select(np.arange(100))
    assert simulate_cluster(small, cfg, composed, ClusterSpec(replicas=2, router="least_kv")).engine_path == "python"
    assert simulate_cluster(w, cfg, composed, ClusterSpec(replicas=2, router="least_kv"),
                            compiled=False).engine_path == "python"


def test_progress_counts_every_request_and_a_stop_keeps_what_ran(composed):
    w = make_workload(n=200, seed=6, rate=20, output=(50, 800))
    cfg, spec = EngineConfig(num_gpu_blocks_override=300), ClusterSpec(replicas=2, router="least_outstanding")
    seen = []
    CompiledCluster(w, cfg, composed, spec, on_progress=seen.append).run(SLO())
    assert sum(seen) == len(w) and len(seen) > 5

    cluster = None

    def stop_soon(n):
        cluster.request_stop()

    cluster = CompiledCluster(w, cfg, composed, spec, on_progress=stop_soon)
    partial = cluster.run(SLO()).result
    assert partial.summary["partial"]["unfinished"] > 0
    assert 0 < partial.summary["partial"]["not_arrived"] < len(w)
    assert (partial.requests["status"] == "unfinished").any()
    # round robin routes every request at once: the stop comes while the replicas run on
    cluster = CompiledCluster(w, cfg, composed, ClusterSpec(replicas=2, router="round_robin"), on_progress=stop_soon)
    partial = cluster.run(SLO()).result
    assert partial.summary["partial"]["unfinished"] > 0 and (partial.requests["status"] == "completed").any()
    assert partial.requests["arrival_s"].max() <= partial.summary["partial"]["interrupted_at_s"]


def test_command_line_cluster_records_the_path(tmp_path):
    repo = Path(__file__).resolve().parents[3]
    cmd = [sys.executable, "-m", "simulator", f"hydra.run.dir={tmp_path}", "progress=false", "plots=false",
           "workload=gamma", "workload.num_requests=40", "cluster.replicas=2", "cluster.router=least_kv",
           "compiled=true"]
    subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True, timeout=300)
    meta = json.loads((tmp_path / "summary.json").read_text())["metadata"]
    assert meta["engine_path"] == "compiled" and "not_compiled" not in meta
    requests = __import__("pandas").read_parquet(tmp_path / "requests.parquet")
    assert set(requests["replica"]) == {0, 1}
