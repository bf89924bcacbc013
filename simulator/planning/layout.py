"""A candidate layout, built once and simulated against any workload.

``simulate_layout`` is the one place the planner simulates a layout (its replicas behind its
router). Round robin splits the arrivals in turn and each replica is simulated on its own
(``route``); any other router runs the replicas together on one clock
(``simulator.cluster.simulate_cluster``), since its choices depend on their state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError
from simulator.records.metrics import SLO, goodput, percentiles, time_weighted_kv
from simulator.records.performance import PerformanceModel
from simulator.records.workload import Workload


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
    #: a mixture-of-experts model: its data-parallel ranks step together
    moe: bool = False

    def with_replicas(self, replicas: int) -> BuiltLayout:
        return replace(self, replicas=int(replicas))


def build_layout(job) -> BuiltLayout:
    """The layout of a planner job (``simulator.planning.planner.PointJob``); raises ConfigError when it
    cannot run (the model does not fit, TP does not divide the heads, no kernel tables)."""
    from calibration.registry import build_performance_model
    from simulator.configure import engine_config
    from simulator.records.hardware import Hardware
    from simulator.records.model_arch import ModelArchitecture

    hardware = Hardware.from_dict(job.hardware)
    model = ModelArchitecture.from_dict(job.model)
    engine = engine_config(job.engine, job.optimization)
    perf = build_performance_model(hardware, model, job.optimization, job.point.tp, job.perf,
                                   engine=engine)
    kv = perf.kv_capacity(engine.block_size, engine.gpu_memory_utilization,
                          engine.num_gpu_blocks_override)
    return BuiltLayout(engine, perf, job.point.replicas, job.router, job.seed, int(kv.num_tokens), model.is_moe)


def simulate_layout(layout: BuiltLayout, workload: Workload, slo: SLO) -> dict[str, Any]:
    """The layout's metrics on ``workload`` (``fleet_metrics`` plus ``backlog``).

    A replica of ``engine.data_parallel_size`` = dp > 1 is dp engine ranks on one clock behind
    vLLM's DP coordinator (in lock-step for a mixture-of-experts model), as ``python -m simulator``
    runs it (``simulator.cluster.cluster.data_parallel_ranks``);
    several such replicas behind a router that reads their state are not modelled (infeasible).
    """
    from simulator.cluster import ClusterSpec, simulate_cluster
    from simulator.cluster.cluster import data_parallel_ranks
    from simulator.engine.loop import simulate

    dp = layout.engine.data_parallel_size
    ranks = data_parallel_ranks(ClusterSpec(), dp, layout.moe)
    if layout.router == "round_robin" or (dp > 1 and layout.replicas == 1):  # replicas simulated apart
        results = []
        for r, index in enumerate(route(workload, layout.replicas)):
            if not len(index):
                continue
            share = workload.select(index)
            if dp == 1:
                results.append(simulate(share, layout.engine, layout.perf, slo=slo, seed=layout.seed + r))
            else:
                ranked = simulate_cluster(share, layout.engine, layout.perf, ranks, slo=slo, seed=layout.seed + r)
                results += [x for x in ranked.replicas if len(x.requests["arrival_s"])]
    elif dp > 1:
        raise ConfigError("engine.data_parallel_size", f"{dp} with {layout.replicas} replicas behind "
                                                       f"{layout.router} (replicas of data-parallel engines) is not "
                                                       f"modelled; use round_robin or one replica")
    else:  # a router that looks at the replicas: all of them on one clock
        spec = ClusterSpec(replicas=layout.replicas, router=layout.router)
        cluster = simulate_cluster(workload, layout.engine, layout.perf, spec, slo=slo, seed=layout.seed)
        results = [r for r in cluster.replicas if len(r.requests["arrival_s"])]
    metrics = fleet_metrics(results, layout.replicas * dp, slo)
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


def route(workload: Workload, replicas: int, router: str = "round_robin") -> list[np.ndarray]:
    """Request indices per replica (each sorted by arrival)."""
    if router != "round_robin":
        raise ConfigError("plan.router", f"unknown router {router!r}; allowed: {'round_robin'}")
    order = np.arange(len(workload))
    return [order[r::replicas] for r in range(replicas)]


def fleet_metrics(results: list, replicas: int, slo: SLO) -> dict[str, Any]:
    """Merge the replicas' (engine ranks') RunResults into one set of metrics over all requests
    (``replicas``: how many engines, those given no request included).

    Latency percentiles and goodput are over the merged requests; the run spans from
    the first arrival to the last replica's end; KV usage is each replica's
    time-weighted mean over that span, averaged over the replicas (idle ones count 0),
    and the peak of any replica.
    """
    columns = ("status", "arrival_s", "output_tokens", "ttft_s", "ttfvt_s", "tpot_s", "e2e_s",
               "preemptions")
    reqs = {c: np.concatenate([r.requests[c] for r in results]) for c in columns}
    firsts = [float(np.min(r.requests["arrival_s"])) for r in results]
    start = min(firsts)
    end = max(f + r.summary.duration_s for f, r in zip(firsts, results, strict=True))
    duration = max(end - start, 1e-9)
    done = reqs["status"] == "completed"
    kv = [time_weighted_kv(r.timeline["time_s"], r.timeline["kv_usage"], end) for r in results]
    good = goodput(reqs, slo, duration)
    tokens_per_s = float(reqs["output_tokens"][done].sum()) / duration
    stats = {k: percentiles(reqs[k][done]) for k in ("ttft_s", "tpot_s", "e2e_s")}
    return {
        "requests": int(len(done)),
        "completed": int(done.sum()),
        "rejected": int((reqs["status"] == "rejected").sum()),
        "attainment": float(good["attainment"]),
        "goodput_rps": float(good["requests_per_s"]),
        "meets_slo": bool(good["meets_slo"]),
        **{f"{k[:-2]}_{p}_s": _nan(stats[k][p]) for k in stats for p in ("p50", "p99")},
        "kv_mean": float(sum(k["mean"] for k in kv) / replicas),
        "kv_peak": float(max(k["peak"] for k in kv)),
        "preemptions": int(reqs["preemptions"].sum()),
        "output_tokens_per_s": tokens_per_s,
        "duration_s": float(duration),
    }


def _nan(value) -> float:
    return math.nan if value is None else float(value)
