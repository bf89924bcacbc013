"""Cluster layouts evaluated as Ray tasks on a real local Ray (as the planner runs candidates):
the same results as in this process, and least-outstanding no worse than round robin."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.cluster import ClusterSpec, simulate_cluster
from simulator.records.engine_config import EngineConfig
from tests.simulator.cluster.test_routers import bursty_workload
from tests.simulator.conftest import VectorLinearModel


def p99_ttft_and_routes(router: str) -> tuple[float, np.ndarray]:
    out = simulate_cluster(bursty_workload(), EngineConfig(max_num_seqs=4, max_model_len=8192), VectorLinearModel(),
                           ClusterSpec(replicas=4, router=router), seed=3)
    return out.result.summary["ttft_s"]["p99"], out.result.requests["replica"]


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_layouts_on_ray_match_in_process_and_least_outstanding_wins_the_tail(ray_local):
    task = ray_local.remote(num_cpus=1)(p99_ttft_and_routes)
    routers = ("round_robin", "least_outstanding")
    remote = dict(zip(routers, ray_local.get([task.remote(r) for r in routers]), strict=True))
    for router in routers:
        p99, routes = p99_ttft_and_routes(router)
        assert remote[router][0] == p99
        np.testing.assert_array_equal(remote[router][1], routes)
    assert remote["least_outstanding"][0] <= remote["round_robin"][0]
