"""A candidate layout, built once and simulated against any workload.

``simulate_layout`` is the one place the planner simulates a layout (its replicas behind its
router). Round robin splits the arrivals in turn and each replica is simulated on its own
(``simulator.planner.route``); any other router runs the replicas together on one clock
(``simulator.cluster.simulate_cluster``), since its choices depend on their state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from simulator.engine_config import EngineConfig
from simulator.metrics import SLO
from simulator.performance import PerformanceModel
from simulator.workload import Workload


@dataclass(frozen=True)
class BuiltLayout:
    """What simulating a layout needs: the engine settings, the step-time model of one
    replica, how many replicas and how requests reach them."""

    engine: EngineConfig
    perf: PerformanceModel
    replicas: int
    router: str
    seed: int
    kv_capacity_tokens: int

    def with_replicas(self, replicas: int) -> BuiltLayout:
        return replace(self, replicas=int(replicas))


def build_layout(job) -> BuiltLayout:
    """The layout of a planner job (``simulator.planner.PointJob``); raises ConfigError when it
    cannot run (the model does not fit, TP does not divide the heads, no kernel tables)."""
    from calibration.registry import build_performance_model
    from simulator.configure import engine_config
    from simulator.hardware import Hardware
    from simulator.model_arch import ModelArchitecture

    hardware = Hardware.from_dict(job.hardware)
    model = ModelArchitecture.from_dict(job.model)
    engine = engine_config(job.engine, job.optimization)
    perf = build_performance_model(hardware, model, job.optimization, job.point.tp, job.perf,
                                   engine=engine)
    kv = perf.kv_capacity(engine.block_size, engine.gpu_memory_utilization,
                          engine.num_gpu_blocks_override)
    return BuiltLayout(engine, perf, job.point.replicas, job.router, job.seed, int(kv.num_tokens))


def simulate_layout(layout: BuiltLayout, workload: Workload, slo: SLO) -> dict[str, Any]:
    """The layout's metrics on ``workload`` (``simulator.planner.fleet_metrics`` plus ``backlog``)."""
    from simulator.engine import simulate
    from simulator.planner import fleet_metrics, route

    if layout.router == "round_robin":  # replicas that never interact: simulated apart
        results = []
        for r, index in enumerate(route(workload, layout.replicas, layout.router)):
            if len(index):
                results.append(simulate(workload.select(index), layout.engine, layout.perf, slo=slo,
                                        seed=layout.seed + r))
    else:  # a router that looks at the replicas: all of them on one clock
        from simulator.cluster import ClusterSpec, simulate_cluster

        spec = ClusterSpec(replicas=layout.replicas, router=layout.router)
        cluster = simulate_cluster(workload, layout.engine, layout.perf, spec, slo=slo, seed=layout.seed)
        results = [r for r in cluster.replicas if len(r.requests["arrival_s"])]
    metrics = fleet_metrics(results, layout.replicas, slo)
    metrics["backlog"] = backlog([r.requests for r in results])
    return metrics


def backlog(requests: list[dict[str, np.ndarray]]) -> float:
    """Share of the requests still waiting (arrived, never scheduled) when the last one arrives.

    A layout keeping up with its arrivals holds at most a burst's worth of requests in its queue
    at any time; one that does not holds a share growing with the run's length.
    """
    arrival = np.concatenate([r["arrival_s"] for r in requests])
    queue = np.concatenate([r["queue_s"] for r in requests]).astype(float)
    status = np.concatenate([r["status"] for r in requests])
    if not len(arrival):
        return 0.0
    last = float(arrival.max())
    started = arrival + np.where(np.isfinite(queue), queue, math.inf)
    waiting = (status != "rejected") & (arrival < last) & (started > last)
    return float(waiting.sum()) / len(arrival)
